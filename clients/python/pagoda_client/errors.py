"""Typed errors for the gRPC status codes a Pagoda service answers with.

Callers catch the subclass they can act on (retry elsewhere on UNAVAILABLE, back off on
RESOURCE_EXHAUSTED, fix the request on INVALID_ARGUMENT) and ``PagodaError`` for the rest.
"""

from __future__ import annotations

import grpc


class PagodaError(Exception):
    """A call failed; ``code`` is its gRPC status and ``details`` the service's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(PagodaError):
    """The request can never succeed as it is (bad parameter, prompt too long, duplicate request id)."""


class FailedPreconditionError(PagodaError):
    """The service cannot do this at all, e.g. Chat on a model without a chat template."""


class ResourceExhaustedError(PagodaError):
    """A queue or cap is full (an engine's waiting queue, the service's streams in flight) or a message is too
    large: retry later or elsewhere, or send less."""


class UnauthenticatedError(PagodaError):
    """The service requires a bearer token and the call carried none, or a wrong one (``Client(token=...)``)."""


class UnavailableError(PagodaError):
    """The service is unreachable, or no engine behind it is serving (starting, stopping or dead)."""


_BY_CODE: dict[grpc.StatusCode, type[PagodaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def from_rpc_error(error: grpc.RpcError) -> PagodaError:
    """The typed error for a failed call (sync or asyncio)."""
    code = error.code()  # type: ignore[attr-defined]  # every RpcError a call raises is also a grpc.Call
    details = error.details() or code.name  # type: ignore[attr-defined]
    return _BY_CODE.get(code, PagodaError)(code, details)
