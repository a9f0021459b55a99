"""RequestError: a request that fails with a gRPC status code and a message the caller can act on."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
