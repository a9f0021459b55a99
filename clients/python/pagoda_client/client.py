"""Sync and asyncio clients for the tokenizer service, Pagoda's public text API.

    from pagoda_client import Client

    with Client("localhost:50052") as client:
        for delta in client.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=64):
            print(delta, end="", flush=True)

``AsyncClient`` has the same methods as coroutines and async iterators. Both are thin layers over the
generated stubs (``pagoda.v1``): they build the request messages, turn the response stream into text
deltas and failed calls into typed errors (``pagoda_client.errors``). Anything they do not expose (n > 1,
penalties, min_p, stop-string options) is one ``sampling=`` argument or a direct stub call away.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, TypedDict, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagoda.v1 import engine_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from pagoda_client.errors import PagodaError, UnavailableError, from_rpc_error

DEFAULT_TARGET = "localhost:50052"

# A chat message: {"role": ..., "content": ...} or the wire type itself.
Message = Mapping[str, str] | tokenizer_pb2.ChatMessage


class GenerateOptions(TypedDict, total=False):
    """Keyword options of generate() and chat(). Unset sampling fields keep the service's defaults
    (temperature 1, up to the max model length)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    # Token id -> bias added to its logit, in [-100, 100]; ids may be decimal strings, as in OpenAI's JSON.
    logit_bias: Mapping[int | str, float]
    # Only these token ids may be drawn; EOS is not implied (list it to let the answer stop).
    allowed_token_ids: Sequence[int]
    # Each generated token's logprob and its k most likely alternatives (0: the token's only), in
    # stream.logprobs; at most ModelInfo.max_logprobs (the engine's --max-logprobs, 20 by default).
    logprobs: int
    # The same for every prompt token from the second on (vLLM's prompt_logprobs), in stream.prompt_logprobs.
    prompt_logprobs: int
    # Structured output (set at most one): the answer fully matches this regex; is an instance of this JSON
    # Schema (a dict or its JSON text); is exactly one of these strings; is a JSON object (True).
    regex: str
    json_schema: Mapping[str, Any] | str
    choice: Sequence[str]
    json_object: bool
    # Strings that end the answer (one string, or several); the text is cut before the match.
    stop: str | Sequence[str]
    # Every other SamplingParams field (penalties, min_p, ...); the options above override it.
    sampling: engine_pb2.SamplingParams
    # For abort(); empty: the service assigns one (TextStream.request_id).
    request_id: str
    # Deadline of the whole stream, in seconds; unset: none.
    timeout: float


_SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs", "prompt_logprobs")


class _Stream:
    """What a text stream has received so far; filled in as it is iterated."""

    def __init__(self, sampling: engine_pb2.SamplingParams | None = None) -> None:
        # What the request asked for, so that summary() lists logprobs (even none) exactly when asked.
        self._wants_logprobs = sampling is not None and sampling.HasField("logprobs")
        self._wants_prompt_logprobs = sampling is not None and sampling.HasField("prompt_logprobs")
        self.request_id = ""
        self.text = ""
        self.token_ids: list[int] = []
        # One entry per token when the request asked for logprobs (logprobs=k).
        self.logprobs: list[engine_pb2.TokenLogprobs] = []
        # With prompt_logprobs=k: one entry per prompt token from the second on
        # (entry i is for prompt token i + 1), gathered from the messages up to the first token.
        self.prompt_logprobs: list[engine_pb2.TokenLogprobs] = []
        # "stop", "length" or "abort" once the stream has ended; None before.
        self.finish_reason: str | None = None
        self.usage: engine_pb2.Usage | None = None

    def _take(self, response: tokenizer_pb2.TextGenerateResponse) -> str:
        self.request_id = response.request_id
        self.text += response.text
        self.token_ids.extend(response.token_ids)
        self.logprobs.extend(response.logprobs)
        self.prompt_logprobs.extend(response.prompt_logprobs)
        if response.finish_reason:
            name = engine_pb2.FinishReason.Name(response.finish_reason)
            self.finish_reason = name.removeprefix("FINISH_REASON_").lower()
            self.usage = response.usage
        return response.text

    def summary(self) -> dict[str, Any]:
        """The finished answer as plain JSON-able values; with "logprobs" and "prompt_logprobs" (as
        logprob_dicts() writes them) when the request asked for them."""
        usage = self.usage or engine_pb2.Usage()
        summary: dict[str, Any] = {
            "request_id": self.request_id,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                      "cached_prompt_tokens": usage.cached_prompt_tokens},
        }
        if self._wants_logprobs:
            summary["logprobs"] = logprob_dicts(self.logprobs)
        if self._wants_prompt_logprobs:
            summary["prompt_logprobs"] = logprob_dicts(self.prompt_logprobs)
        return summary


def logprob_dicts(entries: Sequence[engine_pb2.TokenLogprobs]) -> list[dict[str, Any]]:
    """TokenLogprobs as JSON-able dicts, one per position: {"token_id", "token" (its text, "" where the
    response has none), "logprob", "rank", "top": [{"token_id", "token", "logprob"}, ...]}. "rank" is the
    token's place among the top alternatives (1: the most likely), or None when it is not among them (it is
    then below the top; the wire does not say where). Logprobs are float32 on the wire and written as such."""
    dicts = []
    for entry in entries:
        top = [_logprob_dict(alternative) for alternative in entry.top]
        rank = next((i for i, alternative in enumerate(entry.top, start=1)
                     if alternative.token_id == entry.sampled.token_id), None)
        dicts.append({**_logprob_dict(entry.sampled), "rank": rank, "top": top})
    return dicts


def _logprob_dict(logprob: engine_pb2.Logprob) -> dict[str, Any]:
    return {"token_id": logprob.token_id, "token": logprob.token, "logprob": _shortest_float32(logprob.logprob)}


def _shortest_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (-0.1 rather than -0.10000000149011612)."""
    if not math.isfinite(value):
        return value
    for digits in range(6, 10):
        short = float(f"{value:.{digits}g}")
        if struct.unpack("f", struct.pack("f", short))[0] == value:
            return short
    return value


class TextStream(_Stream):
    """Iterates over the text deltas of one answer; iterating again goes on where the last loop stopped.
    Leaving a ``with`` block or ``cancel()`` stops the generation on the server at once; leaving a loop
    early does not (the stream may be read on), so a stream given up half-way should be cancelled."""

    def __init__(self, call: Any, sampling: engine_pb2.SamplingParams | None = None):
        super().__init__(sampling)
        self._call = call

    def __iter__(self) -> Iterator[str]:
        try:
            for response in self._call:
                # Text lags tokens while a character or a possible stop string is incomplete.
                if delta := self._take(response):
                    yield delta
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def read(self) -> str:
        """The rest of the answer; returns the whole text."""
        for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class AsyncTextStream(_Stream):
    """TextStream for asyncio: ``async for delta in stream``."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, sampling: engine_pb2.SamplingParams | None = None):
        super().__init__(sampling)
        self._call = call

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for response in self._call:
                if delta := self._take(response):
                    yield delta
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def read(self) -> str:
        async for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


class _ClientBase:
    """Request building shared by Client and AsyncClient."""

    def __init__(self, token: str | None, timeout: float | None):
        # Plain metadata rather than call credentials: it also reaches a service behind a TLS-terminating proxy
        # over an insecure hop, which call credentials refuse.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = timeout

    def _text_request(self, prompt: str, options: GenerateOptions) -> tokenizer_pb2.TextGenerateRequest:
        return tokenizer_pb2.TextGenerateRequest(prompt=prompt, **_common_fields(options))

    def _chat_request(self, messages: Sequence[Message], options: GenerateOptions) -> tokenizer_pb2.ChatRequest:
        return tokenizer_pb2.ChatRequest(messages=_chat_messages(messages), **_common_fields(options))


class Client(_ClientBase):
    """A blocking client. ``timeout`` is the deadline of the unary calls (streams take their own)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, timeout: float | None = 30.0,
                 options: Sequence[tuple[str, Any]] = ()):
        super().__init__(token, timeout)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = tokenizer_pb2_grpc.TokenizerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> TextStream:
        """Complete ``prompt``; iterate the result for text deltas."""
        return self._stream(self._stub.Generate, self._text_request(prompt, options), options)

    def chat(self, messages: Sequence[Message], **options: Unpack[GenerateOptions]) -> TextStream:
        """Answer the conversation ``messages`` (oldest first) with the model's chat template."""
        return self._stream(self._stub.Chat, self._chat_request(messages, options), options)

    def tokenize(self, text_or_messages: str | Sequence[Message]) -> tokenizer_pb2.TokenizeResponse:
        """Token ids of a text, or of a conversation as chat() would send it."""
        return self._unary(self._stub.Tokenize, _tokenize_request(text_or_messages))

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        request = tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return self._unary(self._stub.Detokenize, request).text

    def model_info(self) -> tokenizer_pb2.TokenizerModelInfo:
        return self._unary(self._stub.GetModelInfo, engine_pb2.GetModelInfoRequest())

    def abort(self, request_id: str, indices: Sequence[int] = ()) -> bool:
        """Stop a running generation by id (only the samples of ``indices`` when given); False when none
        was running."""
        return self._unary(self._stub.Abort, engine_pb2.AbortRequest(request_id=request_id, indices=indices)).found

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status: "SERVING" once an engine behind the service serves, else "NOT_SERVING"."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        """Poll health until SERVING; UnavailableError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        status = "UNREACHABLE"
        while time.monotonic() < deadline:
            try:
                status = self.health()
                if status == "SERVING":
                    return
            except PagodaError as error:
                status = str(error)
            time.sleep(interval)
        raise UnavailableError(grpc.StatusCode.UNAVAILABLE, f"not serving after {timeout:g} s (last: {status})")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _stream(self, method: Any, request: Any, options: GenerateOptions) -> TextStream:
        return TextStream(method(request, metadata=self._metadata, timeout=options.get("timeout")),
                          request.sampling_params)

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


class AsyncClient(_ClientBase):
    """The asyncio client: Client's methods as coroutines; generate() and chat() return async iterators.
    Create it inside the event loop that uses it (``async with AsyncClient(...) as client``)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, timeout: float | None = 30.0,
                 options: Sequence[tuple[str, Any]] = ()):
        super().__init__(token, timeout)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = tokenizer_pb2_grpc.TokenizerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> AsyncTextStream:
        return self._stream(self._stub.Generate, self._text_request(prompt, options), options)

    def chat(self, messages: Sequence[Message], **options: Unpack[GenerateOptions]) -> AsyncTextStream:
        return self._stream(self._stub.Chat, self._chat_request(messages, options), options)

    async def tokenize(self, text_or_messages: str | Sequence[Message]) -> tokenizer_pb2.TokenizeResponse:
        return await self._unary(self._stub.Tokenize, _tokenize_request(text_or_messages))

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        request = tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return (await self._unary(self._stub.Detokenize, request)).text

    async def model_info(self) -> tokenizer_pb2.TokenizerModelInfo:
        return await self._unary(self._stub.GetModelInfo, engine_pb2.GetModelInfoRequest())

    async def abort(self, request_id: str, indices: Sequence[int] = ()) -> bool:
        request = engine_pb2.AbortRequest(request_id=request_id, indices=indices)
        return (await self._unary(self._stub.Abort, request)).found

    async def health(self, service: str = "") -> str:
        response = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_until_serving(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        if await self.health() == "SERVING":
                            return
                    except PagodaError:
                        pass
                    await asyncio.sleep(interval)
        except TimeoutError:
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, f"not serving after {timeout:g} s") from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _stream(self, method: Any, request: Any, options: GenerateOptions) -> AsyncTextStream:
        return AsyncTextStream(method(request, metadata=self._metadata, timeout=options.get("timeout")),
                               request.sampling_params)

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


def sampling_params(options: GenerateOptions) -> engine_pb2.SamplingParams:
    """The wire SamplingParams of generate()/chat() options."""
    params = engine_pb2.SamplingParams()
    if "sampling" in options:
        params.CopyFrom(options["sampling"])
    for name in _SAMPLING_OPTIONS:
        if options.get(name) is not None:
            setattr(params, name, options[name])
    # The map and the list replace the sampling message's, as the scalars above do.
    if options.get("logit_bias") is not None:
        params.ClearField("logit_bias")
        params.logit_bias.update({int(token): bias for token, bias in options["logit_bias"].items()})
    if options.get("allowed_token_ids") is not None:
        params.ClearField("allowed_token_ids")
        params.allowed_token_ids.extend(options["allowed_token_ids"])
    _set_structured_output(params, options)
    if params.n > 1:
        # A text stream interleaves samples; keeping it to one keeps deltas simple to consume.
        raise ValueError("generate() and chat() stream one sample; for n > 1 call the pagoda.v1 stubs")
    return params


def _set_structured_output(params: engine_pb2.SamplingParams, options: GenerateOptions) -> None:
    """The structured-output option, if any, replaces the sampling message's."""
    kinds = [name for name in ("regex", "json_schema", "choice", "json_object") if options.get(name)]
    if len(kinds) > 1:
        raise ValueError(f"set at most one of regex, json_schema, choice and json_object, got {kinds}")
    if not kinds:
        return
    spec = params.structured_output
    if kinds == ["regex"]:
        spec.regex = options["regex"]
    elif kinds == ["json_schema"]:
        schema = options["json_schema"]
        spec.json_schema = schema if isinstance(schema, str) else json.dumps(schema)
    elif kinds == ["choice"]:
        spec.choice.choices.extend(options["choice"])
    else:
        spec.json_object = True


def _common_fields(options: GenerateOptions) -> dict[str, Any]:
    unknown = options.keys() - GenerateOptions.__annotations__.keys()
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(GenerateOptions.__annotations__)}")
    stop = options.get("stop") or ()
    return {"request_id": options.get("request_id", ""), "stop": [stop] if isinstance(stop, str) else list(stop),
            "sampling_params": sampling_params(options)}


def _chat_messages(messages: Sequence[Message]) -> list[tokenizer_pb2.ChatMessage]:
    return [m if isinstance(m, tokenizer_pb2.ChatMessage) else tokenizer_pb2.ChatMessage(role=m["role"],
                                                                                        content=m["content"])
            for m in messages]


def _tokenize_request(text_or_messages: str | Sequence[Message]) -> tokenizer_pb2.TokenizeRequest:
    if isinstance(text_or_messages, str):
        return tokenizer_pb2.TokenizeRequest(text=text_or_messages)
    return tokenizer_pb2.TokenizeRequest(chat=tokenizer_pb2.ChatMessages(messages=_chat_messages(text_or_messages)))
