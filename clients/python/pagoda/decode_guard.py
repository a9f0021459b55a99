"""A request that does not parse as its protobuf message is the caller's mistake: INVALID_ARGUMENT.

gRPC's Python server deserializes each request before the handler runs, and a parse error there (a
string field holding invalid UTF-8, a truncated or corrupt message) surfaces as UNKNOWN with a Python
traceback in the server's log. ``DecodeGuard``, a server interceptor both services install, swaps each
unary-request handler's deserializer for one that keeps the parse error, and answers it as
INVALID_ARGUMENT before the servicer sees the request. A stream-request handler (reflection) parses each
message as it reads it, so there the guard wraps the request iterator instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


def _refusal(error: DecodeError) -> str:
    return f"the request is not a valid protobuf message: {error}"


class _Undecodable:
    def __init__(self, error: DecodeError):
        self.message = _refusal(error)


class DecodeGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.request_streaming:
            # Messages parse one by one as the servicer iterates: the iterator is what needs the guard.
            if handler.stream_unary is not None:
                return grpc.stream_unary_rpc_method_handler(_guard_requests(handler.stream_unary),
                                                            handler.request_deserializer, handler.response_serializer)
            return grpc.stream_stream_rpc_method_handler(_guard_requests(handler.stream_stream),
                                                         handler.request_deserializer, handler.response_serializer)
        deserialize = _keeping_errors(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_guard_unary(handler.unary_unary), deserialize,
                                                       handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(_guard_stream(handler.unary_stream), deserialize,
                                                    handler.response_serializer)


def _keeping_errors(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            return _Undecodable(error)

    return parse


def _guard_unary(behavior: Callable) -> Callable:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return guarded


def _guard_stream(behavior: Callable) -> Callable:
    # A streaming handler either yields its responses (an async generator) or writes them (a coroutine).
    if inspect.isasyncgenfunction(behavior):
        async def guarded_generator(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for response in behavior(request, context):
                yield response

        return guarded_generator

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return guarded


def _guard_requests(behavior: Callable) -> Callable:
    # grpc tells a generator from a coroutine by the function itself, so the wrapper must be of the same kind.
    if inspect.isasyncgenfunction(behavior):
        async def guarded_generator(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in behavior(_parsed(requests, context), context):
                yield response

        return guarded_generator

    async def guarded(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(_parsed(requests, context), context)

    return guarded


async def _parsed(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    # The iterator's read is where grpc parses each message; what the servicer raises stays its own.
    iterator = aiter(requests)
    while True:
        try:
            request = await anext(iterator)
        except StopAsyncIteration:
            return
        except DecodeError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(error))
        yield request
