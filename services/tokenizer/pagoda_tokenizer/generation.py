"""Generation: one Generate or Chat request, sent to an engine and streamed back as text.

The request goes to the engine the pool picks. If that engine refuses it before producing anything
(unreachable, or its queue is full), the next engine is tried: nothing was sent to the client yet, so
nothing is lost or repeated. Once tokens have flowed, an engine failure ends the stream with the engine's
status (UNAVAILABLE when it died). Leaving the stream early (client cancel, deadline) cancels the engine
call, which aborts the request on the engine.

An Abort may come before the engine knows the request: while the prompt is tokenized, or before the
engine's first message (the Generate call and the Abort call race to the engine). It is kept here and sent
on once the first message shows the engine has the request; a request aborted whole before any engine
call never reaches one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from pagoda.v1 import engine_pb2, tokenizer_pb2
from pagoda_tokenizer.engine_pool import EngineClient, EnginePool
from pagoda_tokenizer.errors import RequestError
from pagoda_tokenizer.sample_stream import SampleStream, TextOptions
from pagoda_tokenizer.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

# Refusals another engine may not share.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class _Refused(Exception):
    def __init__(self, error: RequestError):
        self.error = error


class Generation:
    def __init__(self, pool: EnginePool, tokenizer: TextTokenizer, request_id: str, prompt_ids: Sequence[int],
                 params: engine_pb2.SamplingParams, options: TextOptions):
        self.request_id = request_id
        self._pool = pool
        self._tokenizer = tokenizer
        self._prompt_ids = list(prompt_ids)
        self._params = params
        self._options = options
        self._num_samples = max(params.n, 1)
        self._engine: EngineClient | None = None
        # The engine has sent a message, so it knows the request: aborts can go to it.
        self._engine_has_request = False
        # Samples aborted before that, to be aborted on the engine once it has the request.
        self._early_aborts: set[int] = set()
        # Every sample's last message has been produced: the request is over.
        self.finished = False

    async def stream(self) -> AsyncIterator[tokenizer_pb2.TextGenerateResponse]:
        if len(self._early_aborts) == self._num_samples:
            *outs, last = self._aborted_before_any_engine()
            for out in outs:
                yield out
            self.finished = True
            yield last
            return
        tried: set[str] = set()
        refusal: RequestError | None = None
        while (engine := self._pool.pick(self._prompt_ids, exclude=tried)) is not None:
            tried.add(engine.address)
            try:
                async for out in self._stream_from(engine):
                    yield out
                return
            except _Refused as refused:
                logger.info("engine %s refused %s: %s", engine.address, self.request_id, refused.error.message)
                refusal = refused.error
        raise refusal or RequestError(grpc.StatusCode.UNAVAILABLE, "no engine is serving")

    async def abort(self, indices: Sequence[int] = ()) -> bool:
        """Abort the samples of ``indices`` (none given: all); their streams then end with FINISH_REASON_ABORT.
        False when it names no sample the request has (or, on the engine, none still running)."""
        if self._engine_has_request:
            return await self._engine.abort(self.request_id, indices)
        targets = set(range(self._num_samples)) if not indices else set(indices) & set(range(self._num_samples))
        self._early_aborts |= targets
        return bool(targets)

    def _aborted_before_any_engine(self) -> list[tokenizer_pb2.TextGenerateResponse]:
        """Every sample's last message, for a request aborted whole before it was sent to an engine."""
        usage = engine_pb2.Usage(prompt_tokens=len(self._prompt_ids))
        return [
            SampleStream(self._tokenizer, self.request_id, i, self._prompt_ids, self._options).on_engine_message(
                engine_pb2.GenerateResponse(request_id=self.request_id, index=i, usage=usage,
                                            finish_reason=engine_pb2.FINISH_REASON_ABORT))
            for i in range(self._num_samples)
        ]

    async def _stream_from(self, engine: EngineClient) -> AsyncIterator[tokenizer_pb2.TextGenerateResponse]:
        samples = [
            SampleStream(self._tokenizer, self.request_id, i, self._prompt_ids, self._options, self._params.min_tokens)
            for i in range(self._num_samples)
        ]
        request = engine_pb2.GenerateRequest(
            request_id=self.request_id, prompt_token_ids=self._prompt_ids, sampling_params=self._params
        )
        self._engine = engine
        received = False
        aborted: set[int] = set()
        last: tokenizer_pb2.TextGenerateResponse | None = None
        with engine.track(self._num_samples):
            call = engine.stub.Generate(request)
            try:
                async for message in call:
                    if not received:
                        received = True
                        await self._on_first_message(engine)
                    sample = samples[message.index]
                    out = sample.on_engine_message(message)
                    if out is not None and all(s.finished for s in samples):
                        last = out  # held until the engine closes the call, which frees the id there too
                    elif out is not None:
                        yield out
                    if sample.output_done and not sample.finished and message.index not in aborted:
                        # A stop string ended the sample: stop the engine spending steps on it. Its final
                        # message, with the usage, goes out when the engine's comes back.
                        aborted.add(message.index)
                        await self.abort([message.index])
            except grpc.aio.AioRpcError as exc:
                engine.count_error(exc.code())
                raise self._engine_error(engine, exc, received) from exc
            finally:
                call.cancel()
        if last is None:
            raise RequestError(grpc.StatusCode.INTERNAL, f"engine {engine.address} ended the stream early")
        self.finished = True
        yield last

    async def _on_first_message(self, engine: EngineClient) -> None:
        self._engine_has_request = True
        if self._early_aborts:
            await engine.abort(self.request_id, sorted(self._early_aborts))

    def _engine_error(self, engine: EngineClient, exc: grpc.aio.AioRpcError, received: bool) -> Exception:
        # A message past this service's own receive limit is not the engine refusing: another engine would
        # send the same one, after computing the whole request again.
        too_large = "larger than max" in (exc.details() or "")
        if not received and exc.code() in RETRYABLE and not too_large:
            return _Refused(RequestError(exc.code(), f"engine {engine.address}: {exc.details()}"))
        if received and exc.code() == grpc.StatusCode.UNAVAILABLE:
            return RequestError(exc.code(), f"engine {engine.address} failed mid-stream: {exc.details()}")
        return RequestError(exc.code(), exc.details() or f"engine {engine.address} failed")

