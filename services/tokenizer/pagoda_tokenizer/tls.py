"""TLS credentials from the PEM files the config names: the server's, for clients, and the channel's, to engines."""

from __future__ import annotations

from pathlib import Path

import grpc

from pagoda_tokenizer.config import TokenizerConfig


def server_credentials(config: TokenizerConfig) -> grpc.ServerCredentials | None:
    """TLS for this service's clients, or None (plaintext) when no certificate is configured. With a client
    CA, a client must present a certificate it signed: one without is refused in the handshake."""
    if config.tls_cert_file is None:
        return None
    client_ca = _read(config.tls_client_ca_file)
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key_file), _read(config.tls_cert_file))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def engine_channel_credentials(config: TokenizerConfig) -> grpc.ChannelCredentials | None:
    """TLS to the engines, or None (plaintext) when no engine CA is configured."""
    if config.engine_tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(config.engine_tls_ca_file),
        private_key=_read(config.engine_tls_key_file),
        certificate_chain=_read(config.engine_tls_cert_file),
    )


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None
