"""The gRPC front door: pagoda.v1.Tokenizer, grpc.health.v1 and reflection on one asyncio server, and its
Prometheus metrics over HTTP.

Health is SERVING only while at least one engine serves, so a load balancer or compose health check
sees the pair, not just this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagoda.decode_guard import DecodeGuard
from pagoda.v1 import engine_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from pagoda_tokenizer import tls
from pagoda_tokenizer.auth import BearerTokenInterceptor, configured_token
from pagoda_tokenizer.chat_template import ChatTemplate, ChatTemplateError
from pagoda_tokenizer.config import TokenizerConfig
from pagoda_tokenizer.engine_pool import EnginePool
from pagoda_tokenizer.errors import RequestError
from pagoda_tokenizer.generation import Generation
from pagoda_tokenizer.metrics import CallMetrics, StreamTimer, TokenizerMetrics, serve_http
from pagoda_tokenizer.sample_stream import TextOptions
from pagoda_tokenizer.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Every message of a stream echoes its request id: an unbounded one made every message that large.
MAX_REQUEST_ID_BYTES = 256
_Answer = TypeVar("_Answer", tokenizer_pb2.TokenizeResponse, tokenizer_pb2.DetokenizeResponse)


class TokenizerService(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, config: TokenizerConfig, tokenizer: TextTokenizer, pool: EnginePool,
                 metrics: TokenizerMetrics):
        self._config = config
        self._tokenizer = tokenizer
        self._pool = pool
        self._metrics = metrics
        self._chat_template, self._no_chat_template_reason = _load_chat_template(tokenizer)
        self._running: dict[str, Generation] = {}
        # Requests being tokenized, by id: they hold a stream's place (the cap, a duplicate id) meanwhile,
        # and collect the Aborts (their indices) that come before their Generation exists.
        self._tokenizing: dict[str, list[Sequence[int]]] = {}

    async def Generate(self, request: tokenizer_pb2.TextGenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[tokenizer_pb2.TextGenerateResponse]:
        async for out in self._generate("Generate", request, context, lambda: self._encode_text(request)):
            yield out

    async def Chat(self, request: tokenizer_pb2.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[tokenizer_pb2.TextGenerateResponse]:
        def encode() -> list[int]:
            add_generation_prompt = _flag(request, "add_generation_prompt")
            prompt = self._render_chat(request.messages, add_generation_prompt, request.chat_template_kwargs)
            return self._tokenizer.encode(prompt, add_special_tokens=False)  # the template wrote them

        async for out in self._generate("Chat", request, context, encode):
            yield out

    async def Tokenize(self, request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
                       ) -> tokenizer_pb2.TokenizeResponse:
        try:
            with self._metrics.timing_tokenization("Tokenize"):
                response = await asyncio.to_thread(self._tokenize, request)
            return self._fitting(response)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)

    async def Detokenize(self, request: tokenizer_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
                         ) -> tokenizer_pb2.DetokenizeResponse:
        try:
            # In a thread, as Tokenize: millions of ids would hold every stream of this worker for a second.
            return self._fitting(await asyncio.to_thread(self._detokenize, request))
        except RequestError as exc:
            await context.abort(exc.code, exc.message)

    def _detokenize(self, request: tokenizer_pb2.DetokenizeRequest) -> tokenizer_pb2.DetokenizeResponse:
        token_ids = list(request.token_ids)
        if token_ids and max(token_ids) >= self._tokenizer.vocab_size:
            unknown = [i for i in token_ids if i >= self._tokenizer.vocab_size]
            raise RequestError(INVALID, f"token ids {unknown[:5]} are not in the vocabulary "
                                        f"(size {self._tokenizer.vocab_size})")
        text = self._tokenizer.decode(token_ids, _flag(request, "skip_special_tokens"))
        return tokenizer_pb2.DetokenizeResponse(text=text)

    def _fitting(self, response: _Answer) -> _Answer:
        """``response``, if it fits in one message: a Tokenize answer is several times its request (the prompt,
        then each token's id and text), so a request within the limit can have an answer past it."""
        size, limit = response.ByteSize(), self._config.max_message_bytes
        if size > limit:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the answer would be {size} bytes, more than "
                                                                   f"this service's {limit}-byte message limit: "
                                                                   "send less text or fewer ids per call")
        return response

    async def GetModelInfo(self, request: engine_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> tokenizer_pb2.TokenizerModelInfo:
        model = self._pool.model_info
        eos_ids = list(model.eos_token_ids) if model is not None else []
        return tokenizer_pb2.TokenizerModelInfo(
            model=model,
            has_chat_template=self._chat_template is not None,
            bos_token=self._tokenizer.bos_token or "",
            eos_tokens=[self._tokenizer.token_text(i) for i in eos_ids],
            tokenizer_vocab_size=self._tokenizer.vocab_size,
            max_stop_strings=self._config.max_stop_strings,
            num_engines=len(self._pool.engines),
            num_healthy_engines=len(self._pool.healthy_engines),
        )

    async def Abort(self, request: engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> engine_pb2.AbortResponse:
        generation = self._running.get(request.request_id)
        if generation is not None:
            return engine_pb2.AbortResponse(found=await generation.abort(request.indices))
        if (aborts := self._tokenizing.get(request.request_id)) is not None:
            aborts.append(list(request.indices))
            return engine_pb2.AbortResponse(found=True)
        # Not ours: with --workers N another worker may run it, under the same id on an engine.
        return engine_pb2.AbortResponse(found=await self._pool.abort(request.request_id, request.indices))

    async def _generate(self, method: str, request: tokenizer_pb2.TextGenerateRequest | tokenizer_pb2.ChatRequest,
                        context: grpc.aio.ServicerContext, encode: Callable[[], list[int]]
                        ) -> AsyncIterator[tokenizer_pb2.TextGenerateResponse]:
        arrival = time.monotonic()
        try:
            request_id = self._admit(request)
            try:
                # Off the event loop, which a long prompt would otherwise hold for seconds (every stream
                # of this worker waiting), and after the checks that need no tokens.
                with self._metrics.timing_tokenization(method):
                    prompt_ids = await asyncio.to_thread(encode)
            finally:
                early_aborts = self._tokenizing.pop(request_id)
            await self._pool.settle()
            generation = self._new_generation(request, request_id, prompt_ids)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        for indices in early_aborts:
            await generation.abort(indices)  # kept until the engine has the request
        self._running[generation.request_id] = generation
        timer = StreamTimer(self._metrics, method, len(prompt_ids), arrival)
        try:
            # aclosing: when the client leaves, close the stream now (cancelling the engine call, which aborts
            # the request there) rather than whenever the generator is garbage-collected.
            async with contextlib.aclosing(generation.stream()) as stream:
                async for out in stream:
                    if generation.finished:  # the id is free for reuse once the client has this message
                        self._forget(generation)
                    timer.record(out)
                    yield out
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        finally:
            self._forget(generation)

    def _forget(self, generation: Generation) -> None:
        if self._running.get(generation.request_id) is generation:  # not a later request under the same id
            del self._running[generation.request_id]

    def _admit(self, request: tokenizer_pb2.TextGenerateRequest | tokenizer_pb2.ChatRequest) -> str:
        """The checks that need no tokens; returns the request's id, which holds its place until it runs."""
        request_id = request.request_id or uuid.uuid4().hex
        if (size := len(request_id.encode())) > MAX_REQUEST_ID_BYTES:
            raise RequestError(INVALID, f"request_id is {size} bytes; at most {MAX_REQUEST_ID_BYTES} (UTF-8) "
                                        "are accepted")
        in_flight = len(self._running) + len(self._tokenizing)
        if in_flight >= self._config.max_concurrent_streams:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{in_flight} streams are in flight, the most this service runs at once; "
                               "try again later")
        if request_id in self._running or request_id in self._tokenizing:
            raise RequestError(INVALID, f"request_id {request_id!r} is already running")
        self._check_stop_strings(list(request.stop))
        self._tokenizing[request_id] = []
        return request_id

    def _new_generation(self, request: tokenizer_pb2.TextGenerateRequest | tokenizer_pb2.ChatRequest,
                        request_id: str, prompt_ids: list[int]) -> Generation:
        self._check_against_model(prompt_ids, request.sampling_params)
        options = TextOptions(tuple(request.stop), request.include_stop_str_in_output,
                              _flag(request, "skip_special_tokens"))
        return Generation(self._pool, self._tokenizer, request_id, prompt_ids, request.sampling_params, options)

    def _encode_text(self, request: tokenizer_pb2.TextGenerateRequest) -> list[int]:
        if not request.prompt:
            raise RequestError(INVALID, "prompt must not be empty")
        return self._tokenizer.encode(request.prompt, _flag(request, "add_special_tokens"))

    def _tokenize(self, request: tokenizer_pb2.TokenizeRequest) -> tokenizer_pb2.TokenizeResponse:
        kind = request.WhichOneof("input")
        if kind == "text":
            prompt = request.text
            token_ids = self._tokenizer.encode(prompt, _flag(request, "add_special_tokens"))
        elif kind == "chat":
            add_generation_prompt = _flag(request, "add_generation_prompt")
            prompt = self._render_chat(request.chat.messages, add_generation_prompt, request.chat_template_kwargs)
            token_ids = self._tokenizer.encode(prompt, add_special_tokens=False)
        else:
            raise RequestError(INVALID, "set either text or chat")
        model = self._pool.model_info
        return tokenizer_pb2.TokenizeResponse(
            token_ids=token_ids, tokens=self._tokenizer.tokens(token_ids), prompt=prompt,
            max_model_len=model.max_model_len if model is not None else 0,
        )

    def _render_chat(self, messages: list[tokenizer_pb2.ChatMessage], add_generation_prompt: bool,
                     kwargs: struct_pb2.Struct) -> str:
        if self._chat_template is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"{self._no_chat_template_reason}: use Generate")
        if not messages:
            raise RequestError(INVALID, "messages must not be empty")
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._chat_template.render(conversation, add_generation_prompt, **_struct_to_dict(kwargs))
        except ChatTemplateError as exc:
            raise RequestError(INVALID, str(exc)) from exc

    def _check_stop_strings(self, stop: list[str]) -> None:
        limit, longest = self._config.max_stop_strings, self._config.max_stop_string_chars
        if len(stop) > limit:
            raise RequestError(INVALID, f"{len(stop)} stop strings given; at most {limit} are accepted")
        if any(not s for s in stop):
            raise RequestError(INVALID, "stop strings must not be empty")
        if any(len(s) > longest for s in stop):
            raise RequestError(INVALID, f"stop strings may be at most {longest} characters long")

    def _check_against_model(self, prompt_ids: list[int], params: engine_pb2.SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError(INVALID, "the prompt is empty after tokenization")
        model = self._pool.model_info if self._pool.healthy_engines else None
        if model is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no engine is serving")
        # Here and not only on the engine: this service keeps per-sample state, and an n of 2^32 - 1 (which
        # fuzzing sent) made it build that many samples before the engine could refuse, until it ran out of memory.
        if params.n > model.max_n:
            raise RequestError(INVALID, f"n must be in [1, {model.max_n}] (the engines' max_n), got {params.n}")
        room = model.max_model_len - len(prompt_ids)
        if room < 1:
            raise RequestError(INVALID, f"the prompt is {len(prompt_ids)} tokens; the model's max length is "
                                        f"{model.max_model_len}, including at least one output token")
        if params.HasField("max_tokens") and params.max_tokens > room:
            raise RequestError(INVALID, f"max_tokens {params.max_tokens} does not fit: the prompt is "
                                        f"{len(prompt_ids)} tokens and the max length is {model.max_model_len}")


def _flag(request: object, name: str) -> bool:
    """An optional bool field of the tokenizer API: every one of them is true when unset."""
    return getattr(request, name) if request.HasField(name) else True


def _load_chat_template(tokenizer: TextTokenizer) -> tuple[ChatTemplate | None, str]:
    """The model's chat template, or None and why. A template that does not compile leaves Chat unavailable
    rather than the whole service (Generate, Tokenize), as transformers and vLLM fail only when it is used."""
    if not tokenizer.chat_template:
        return None, "the model has no chat template"
    try:
        return ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens), ""
    except ChatTemplateError as exc:
        logger.error("Chat is unavailable: %s", exc)
        return None, str(exc)


def _struct_to_dict(struct: struct_pb2.Struct) -> dict:
    """chat_template_kwargs as plain Python values. JSON numbers arrive as floats, so whole ones become ints
    (templates compare and index with them). Read field by field rather than with json_format, which raises
    on the infinities and NaNs a Struct can carry (and the service answered UNKNOWN)."""
    return {key: _plain(value) for key, value in struct.fields.items()}


def _plain(value: struct_pb2.Value) -> object:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() else number  # is_integer() is False for inf and NaN
    if kind in ("string_value", "bool_value"):
        return getattr(value, kind)
    return None  # null_value, or a Value with nothing set


async def serve(config: TokenizerConfig, worker: int | None = None) -> int:
    """Run the service until SIGINT or SIGTERM, then drain for shutdown_grace_s; returns the exit code.

    ``worker``: this process's index among config.workers sharing the port (pagoda_tokenizer.workers); a
    worker stops on SIGTERM only, as its supervisor forwards SIGINT."""
    try:
        token = configured_token(config)
        credentials = tls.server_credentials(config)
        engine_credentials = tls.engine_channel_credentials(config)
    except (OSError, ValueError) as error:  # a wrong path or an empty token file: say which, not a traceback
        logger.error("cannot read the TLS or token files: %s", error)
        return 1
    try:
        tokenizer = TextTokenizer.from_dir(config.model)
    except Exception as error:  # noqa: BLE001 - a missing directory or a corrupt file: one line, not a traceback
        logger.error("cannot load the tokenizer from %s: %s", config.model, error)
        return 1
    metrics = TokenizerMetrics()
    health_servicer = health.aio.HealthServicer()
    health_updates = _HealthPublisher(health_servicer)
    pool = EnginePool(config, on_health_change=health_updates.publish, credentials=engine_credentials,
                      metrics=metrics)
    # Workers share the port on purpose (the supervisor checked it was free); one process alone must not.
    server = _build_server(config, token, metrics, share_port=worker is not None)
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerService(config, tokenizer, pool, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = listen_address(config.host, config.port)
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError as error:  # gRPC's "Failed to bind": the port is taken or the host is not ours
        logger.error("cannot listen on %s: %s", address, error)
        return 1
    # A worker's metrics are served by its supervisor, summed with the other workers' (pagoda_tokenizer.workers).
    serves_metrics = bool(config.metrics_port) and worker is None
    try:
        stop_metrics = serve_http(metrics.registry, config.host, config.metrics_port) if serves_metrics else None
    except OSError as error:  # the port is taken or the host is not ours
        logger.error("cannot listen on %s (metrics): %s", metrics_url(config), error)
        return 1
    try:
        await health_updates.set(serving=False)
        await server.start()
        pool.start()
        logger.info("pagoda tokenizer listening on %s%s (%s), engines %s (%s)", listen_address(config.host, port),
                    "" if worker is None else f" as worker {worker} of {config.workers} (pid {os.getpid()})",
                    _security(credentials is not None, config.tls_client_ca_file, token),
                    ",".join(config.engines), "TLS" if config.engine_tls_ca_file else "plaintext")
        if serves_metrics:
            logger.info("metrics on %s", metrics_url(config))
        await _stop_signal(worker)
        logger.info("shutting down")
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.shutdown_grace_s)
        await pool.close()
    finally:
        if stop_metrics is not None:
            stop_metrics()
    return 0


async def _stop_signal(worker: int | None) -> None:
    """Wait for SIGINT or SIGTERM; a worker for SIGTERM only, as its supervisor forwards SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM) if worker is None else (signal.SIGTERM,):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def listen_address(host: str, port: int) -> str:
    """``host:port`` as gRPC takes it, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def metrics_url(config: TokenizerConfig) -> str:
    return f"http://{listen_address(config.host, config.metrics_port)}/metrics"


def _build_server(config: TokenizerConfig, token: str | None, metrics: TokenizerMetrics,
                  share_port: bool) -> grpc.aio.Server:
    return grpc.aio.server(
        # Metrics outermost, so that they count the calls refused inside too. Then the token: a caller without
        # it learns nothing, not even whether its request parsed.
        interceptors=[CallMetrics(metrics, SERVICE_NAME),
                      *([BearerTokenInterceptor(token)] if token is not None else []), DecodeGuard()],
        options=[("grpc.max_send_message_length", config.max_message_bytes),
                 ("grpc.max_receive_message_length", config.max_message_bytes),
                 # With --workers every worker binds the same port and the kernel spreads connections over
                 # them; otherwise off (gRPC's default is on): a second instance would share the traffic.
                 ("grpc.so_reuseport", int(share_port))],
    )


def _security(tls: bool, client_ca: str | None, token: str | None) -> str:
    """How clients are checked, for the start-up log line (never the token itself)."""
    transport = "mutual TLS" if client_ca else "TLS" if tls else "plaintext"
    return f"{transport}, {'bearer token required' if token else 'no token'}"


class _HealthPublisher:
    """Sets this service's health ("" and pagoda.v1.Tokenizer) from the engine pool's synchronous callback."""

    def __init__(self, servicer: health.aio.HealthServicer):
        self._servicer = servicer
        self._tasks: set[asyncio.Task] = set()  # strong references until each update is applied

    def publish(self, serving: bool) -> None:
        task = asyncio.get_running_loop().create_task(self.set(serving))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._servicer.set(service, status)
