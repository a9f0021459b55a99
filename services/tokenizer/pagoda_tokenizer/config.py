"""TokenizerConfig: every knob of the tokenizer service. Each field is also a command-line flag
(``max_stop_strings`` -> ``--max-stop-strings``) and an environment variable (``PAGODA_MAX_STOP_STRINGS``);
a flag beats the variable, which beats the default."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ENV_PREFIX = "PAGODA_"


@dataclass
class TokenizerConfig:
    # Model directory holding tokenizer.json and tokenizer_config.json (the engines' model).
    model: str
    # Engine addresses (host:port), comma-separated on the command line.
    engines: list[str] = field(default_factory=lambda: ["localhost:50051"])
    host: str = "0.0.0.0"
    # 0 picks a free port (the chosen one is logged).
    port: int = 50052
    # Processes serving the port (SO_REUSEPORT: the kernel spreads client connections over them). One
    # process's gRPC per-message work caps its streamed tokens/s below an engine's; more workers lift the cap.
    # Each worker has its own engine connections, and max_concurrent_streams is per worker; Abort works from
    # any connection (a worker that does not hold the stream passes it on to the engines).
    workers: int = 1
    # Prometheus metrics over HTTP (/metrics) on this port, on the same host; 0: off. With several workers the
    # supervisor serves them, summed over the workers.
    metrics_port: int = 0
    # Caps on a request's stop strings: how many, and how long each may be (in characters).
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    # How often each engine's GetLoad is polled for least-loaded routing.
    load_poll_interval_s: float = 0.2
    # Longest wait between attempts to reach an engine that is down (gRPC's reconnect backoff cap).
    reconnect_max_s: float = 1.0
    # Prefix affinity: prompts are hashed in whole KV blocks, up to this many leading blocks.
    affinity_prefix_blocks: int = 16
    # The engine that served the same prefix is preferred unless it runs this many more sequences than
    # the least loaded engine.
    affinity_max_extra_load: int = 32
    # Prefix hashes remembered (least recently used forgotten first).
    affinity_table_size: int = 65536
    # Seconds in-flight streams get to finish on shutdown.
    shutdown_grace_s: float = 5.0
    # Generate/Chat streams in flight at once; beyond it a new one gets RESOURCE_EXHAUSTED.
    max_concurrent_streams: int = 1024
    # Largest gRPC message received or sent, from clients and to and from engines (gRPC answers
    # RESOURCE_EXHAUSTED beyond it). Bounds the text a request can make this service tokenize.
    max_message_bytes: int = 4 * 1024 * 1024
    # TLS for clients: PEM certificate chain and private key. With a client CA as well, clients must present
    # a certificate that CA signed (mutual TLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # TLS to the engines, trusting this CA; with a certificate and key, this service presents them to
    # engines that require client certificates.
    engine_tls_ca_file: str | None = None
    engine_tls_cert_file: str | None = None
    engine_tls_key_file: str | None = None
    # Bearer token every call but health and reflection must carry, or a file holding it (so that it need
    # not sit in the environment). repr=False: a logged config does not show it.
    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: str | None = None
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.engines:
            raise ValueError("at least one engine address is needed")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.workers > 1 and self.port == 0:
            raise ValueError("workers > 1 needs a fixed port: with port 0 each worker would pick its own")
        if not (0 <= self.port < 65536 and 0 <= self.metrics_port < 65536):
            raise ValueError(f"port and metrics_port must be in [0, 65535], got {self.port}, {self.metrics_port}")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port must differ from port ({self.port})")
        if self.max_stop_strings < 0 or self.max_stop_string_chars < 1:
            raise ValueError("max_stop_strings must be >= 0 and max_stop_string_chars >= 1")
        # Written so that NaN fails too (every comparison with it is false), and inf where it would overflow.
        if not (0 < self.load_poll_interval_s < math.inf and 0 < self.reconnect_max_s < math.inf):
            raise ValueError("load_poll_interval_s and reconnect_max_s must be finite and > 0")
        if not (0 <= self.shutdown_grace_s < math.inf and self.affinity_max_extra_load >= 0):
            raise ValueError("shutdown_grace_s must be finite and >= 0, affinity_max_extra_load >= 0")
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}")
        if self.affinity_prefix_blocks < 0 or self.affinity_table_size < 1:
            raise ValueError("affinity_prefix_blocks must be >= 0 and affinity_table_size >= 1")
        if self.max_concurrent_streams < 1 or self.max_message_bytes < 1:
            raise ValueError("max_concurrent_streams and max_message_bytes must be >= 1")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if (self.engine_tls_cert_file is None) != (self.engine_tls_key_file is None):
            raise ValueError("engine_tls_cert_file and engine_tls_key_file go together")
        if self.engine_tls_cert_file is not None and self.engine_tls_ca_file is None:
            raise ValueError("engine_tls_cert_file needs engine_tls_ca_file (TLS to the engines)")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("set auth_token or auth_token_file, not both")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token must not be empty")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> TokenizerConfig:
        """Build the config from flags, then PAGODA_* environment variables, then the defaults."""
        env = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        parser = argparse.ArgumentParser(prog="python -m pagoda_tokenizer", description="Pagoda's tokenizer service")
        for f in dataclasses.fields(cls):
            env_name = ENV_PREFIX + f.name.upper()
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = "required" if required else f"default {_default_of(f)}"
            convert = _parser_for(hints[f.name])
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=convert,
                # Converted here, so that a bad value is reported under the variable's name, not the flag's.
                default=_env_value(parser, env_name, env[env_name], convert) if env_name in env else None,
                required=required and env_name not in env,
                help=f"env {env_name}; {default}",
            )
        values = {name: value for name, value in vars(parser.parse_args(argv)).items() if value is not None}
        try:
            return cls(**values)
        except ValueError as error:  # values of the right types that do not go together
            parser.error(str(error))


def _env_value(parser: argparse.ArgumentParser, name: str, text: str, convert: typing.Callable[[str], object]
               ) -> object:
    try:
        return convert(text)
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(f"{name}={text!r}: {error}")


def _default_of(f: dataclasses.Field) -> object:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return ",".join(value) if isinstance(value, list) else value


def _parser_for(hint: object) -> typing.Callable[[str], object]:
    """How to read a field of this type from one string; ``X | None`` reads "" and "none" as None."""
    if typing.get_origin(hint) is list:
        return lambda text: [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(hint, types.UnionType) and type(None) in hint.__args__:
        (inner,) = (arg for arg in hint.__args__ if arg is not type(None))
        return lambda text: None if text.strip().lower() in ("", "none") else inner(text)
    return typing.cast(typing.Callable[[str], object], hint)

