"""The engine's TLS server credentials, from the PEM files the config names."""

from __future__ import annotations

from pathlib import Path

import grpc

from pagoda_engine.config import EngineConfig


def server_credentials(config: EngineConfig) -> grpc.ServerCredentials | None:
    """TLS, or None (plaintext) when no certificate is configured. With a client CA, a caller must present a
    certificate it signed: one without is refused in the handshake."""
    if config.tls_cert_file is None:
        return None
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
