"""Bearer-token authentication: a server interceptor that refuses calls without the configured token.

Health checks and reflection stay open: load balancers and compose probe health without credentials, and
reflection describes only the public contract. The token is compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from pagoda_tokenizer.config import TokenizerConfig

logger = logging.getLogger(__name__)

OPEN_SERVICES = (f"/{health.SERVICE_NAME}/", f"/{reflection.SERVICE_NAME}/")
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def configured_token(config: TokenizerConfig) -> str | None:
    """The token calls must carry: auth_token, or the contents of auth_token_file; None: no authentication."""
    # Stripped like the token a call carries: a file usually ends in a newline, a pasted variable in a space.
    if config.auth_token_file is None:
        return config.auth_token.strip() if config.auth_token is not None else None
    token = Path(config.auth_token_file).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"auth_token_file {config.auth_token_file} is empty")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its ``authorization`` metadata is ``Bearer <token>``; else UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._digest = _digest(token)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler  # an unknown method stays UNIMPLEMENTED
        problem = self._problem(details.invocation_metadata or ())
        if problem is None:
            return handler
        logger.info("refused %s: %s", details.method, problem)
        return _refusal(handler, problem)

    def _problem(self, metadata: tuple) -> str | None:
        """Why the call's credentials fail, in words that never include a token; None when they pass."""
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return "missing 'authorization: Bearer <token>' metadata"
        scheme, _, credential = values[0].partition(" ")
        if scheme.lower() != "bearer":
            return "the authorization metadata must be 'Bearer <token>'"
        # Digests of equal length, compared in constant time: timing reveals neither a prefix nor the length.
        if not hmac.compare_digest(_digest(credential.strip()), self._digest):
            return "invalid bearer token"
        return None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _refusal(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED."""
    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(refuse, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
