"""The engines this service routes to: one EngineClient per address, and the EnginePool that picks one.

Each client keeps one gRPC channel open, watches the engine's grpc.health.v1 status (a Watch stream that
fails at once when the engine goes away, and is re-opened until it comes back), and polls GetLoad. A new
instance_id in the load means the engine restarted, so its prefix cache, and our memory of it, is empty.
The pool keeps the per-engine metrics: calls in flight, health, errors, and failovers to another engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagoda.v1 import engine_pb2, engine_pb2_grpc
from pagoda_tokenizer.config import TokenizerConfig
from pagoda_tokenizer.metrics import TokenizerMetrics
from pagoda_tokenizer.prefix_affinity import PrefixAffinity

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
RPC_TIMEOUT_S = 5.0


# How long after a pool starts a request may wait for the engines' first health answers rather than be
# refused for want of them. With --workers the service is SERVING once one worker's pool has heard from an
# engine, while another worker's first probe may still be on its way.
STARTUP_GRACE_S = 5.0


class EngineClient:
    def __init__(self, address: str, config: TokenizerConfig, on_health_change: Callable[[], None],
                 on_restart: Callable[[EngineClient], None], metrics: TokenizerMetrics,
                 credentials: grpc.ChannelCredentials | None = None):
        self.address = address
        reconnect_ms = int(config.reconnect_max_s * 1000)
        # gRPC backs off up to two minutes between reconnects by default; a restarted engine would sit idle.
        options = [("grpc.max_reconnect_backoff_ms", reconnect_ms), ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_receive_message_length", config.max_message_bytes)]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self.stub = engine_pb2_grpc.EngineStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._poll_interval_s = config.load_poll_interval_s
        self._retry_s = config.reconnect_max_s
        self._on_health_change = on_health_change
        self._on_restart = on_restart
        self.healthy = False
        # Set by the first health answer or failed watch: until then `healthy` is only a guess.
        self.answered = asyncio.Event()
        self.model_info: engine_pb2.ModelInfo | None = None
        self.load: engine_pb2.Load | None = None
        # Sequences this service is running on the engine now: exact, where the polled load lags.
        self.in_flight = 0
        self._calls_gauge = metrics.engine_in_flight.labels(address)
        self._healthy_gauge = metrics.engine_healthy.labels(address)
        self._healthy_gauge.set(0)
        self._errors = metrics.engine_errors
        self._tasks: list[asyncio.Task] = []

    @property
    def score(self) -> int:
        """Sequences running or waiting on the engine (the polled count, or ours if that is higher)."""
        polled = self.load.num_running + self.load.num_waiting if self.load is not None else 0
        return max(polled, self.in_flight)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch_health()), asyncio.create_task(self._poll_load())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._channel.close()

    @contextlib.contextmanager
    def track(self, num_sequences: int) -> Iterator[None]:
        """Count a request's sequences, and its call, as in flight on this engine while the block runs."""
        self.in_flight += num_sequences
        self._calls_gauge.inc()
        try:
            yield
        finally:
            self.in_flight -= num_sequences
            self._calls_gauge.dec()

    def count_error(self, code: grpc.StatusCode) -> None:
        """A Generate call to this engine ended with ``code``."""
        self._errors.labels(self.address, code.name).inc()

    async def abort(self, request_id: str, indices: Sequence[int] = ()) -> bool:
        """Whether the engine was running the request; False when it cannot be reached (its streams end
        with UNAVAILABLE anyway)."""
        try:
            response = await self.stub.Abort(engine_pb2.AbortRequest(request_id=request_id, indices=indices),
                                             timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return response.found

    async def _watch_health(self) -> None:
        while True:
            try:
                # wait_for_ready: while the engine is down, the call waits for it to come back.
                watch = self._health.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True)
                async for response in watch:
                    if response.status == SERVING:
                        await self._refresh()
                    self._set_healthy(response.status == SERVING)
                    self._answer()
            except grpc.aio.AioRpcError as exc:
                logger.debug("health watch of %s ended: %s", self.address, exc.code())
            self._set_healthy(False)
            self._answer()
            await asyncio.sleep(self._retry_s)

    def _answer(self) -> None:
        if not self.answered.is_set():
            self.answered.set()
            self._on_health_change()  # the pool looks again at whether it has heard from every engine

    async def _poll_load(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            if self.healthy:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    self._update_load(await self.stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=RPC_TIMEOUT_S))

    async def _refresh(self) -> None:
        self.model_info = await self.stub.GetModelInfo(engine_pb2.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S)
        self._update_load(await self.stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=RPC_TIMEOUT_S))

    def _update_load(self, load: engine_pb2.Load) -> None:
        restarted = self.load is not None and load.instance_id != self.load.instance_id
        self.load = load
        if restarted:
            logger.info("engine %s restarted (instance %s)", self.address, load.instance_id)
            self._on_restart(self)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            self._healthy_gauge.set(int(healthy))
            logger.info("engine %s is %s", self.address, "serving" if healthy else "not serving")
            self._on_health_change()


class EnginePool:
    def __init__(self, config: TokenizerConfig, on_health_change: Callable[[bool], None] = lambda serving: None,
                 credentials: grpc.ChannelCredentials | None = None, metrics: TokenizerMetrics | None = None):
        # credentials: TLS to every engine (tls.engine_channel_credentials); None: plaintext.
        # metrics: the service's; a pool of its own (in tests) gets its own.
        self.metrics = metrics if metrics is not None else TokenizerMetrics()
        self.engines = [
            EngineClient(address, config, self._health_changed, self._restarted, self.metrics, credentials)
            for address in config.engines
        ]
        self._affinity = PrefixAffinity(config.affinity_prefix_blocks, config.affinity_table_size)
        self._max_extra_load = config.affinity_max_extra_load
        self._on_health_change = on_health_change
        # Set once an engine serves or every engine has answered; `settle` waits for it after start.
        self._settled = asyncio.Event()
        self._grace_ends = 0.0

    def start(self) -> None:
        self._grace_ends = asyncio.get_running_loop().time() + STARTUP_GRACE_S
        for engine in self.engines:
            engine.start()

    async def settle(self) -> None:
        """Return once an engine serves or every engine has answered its first health watch, or at once
        when the start-up grace (STARTUP_GRACE_S) is over: a request a worker gets in its first moments
        waits for the verdict instead of being refused as if no engine served."""
        remaining = self._grace_ends - asyncio.get_running_loop().time()
        if remaining > 0 and not self._settled.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), remaining)

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self.engines))

    @property
    def healthy_engines(self) -> list[EngineClient]:
        return [engine for engine in self.engines if engine.healthy]

    @property
    def model_info(self) -> engine_pb2.ModelInfo | None:
        """The served model as an engine reported it, a healthy engine's first (all serve the same model)."""
        ranked = sorted(self.engines, key=lambda engine: not engine.healthy)
        return next((engine.model_info for engine in ranked if engine.model_info is not None), None)

    def pick(self, prompt_ids: Sequence[int], exclude: set[str]) -> EngineClient | None:
        """The least-loaded healthy engine not in `exclude` (those that refused the request), or the one that
        served the same prompt prefix unless it runs more than affinity_max_extra_load sequences beyond that.
        None when none is left."""
        candidates = [engine for engine in self.healthy_engines if engine.address not in exclude]
        if not candidates:
            return None
        if exclude:  # they refused it before any output: it moves on
            self.metrics.failovers.inc()
        # Random tie-breaks spread equal engines instead of always filling the first.
        chosen = min(candidates, key=lambda engine: (engine.score, random.random()))
        # A healthy engine has reported its model info (the health watch fetches it first).
        keys = self._affinity.keys(prompt_ids, chosen.model_info.block_size)
        preferred = next((e for e in candidates if e.address == self._affinity.lookup(keys)), None)
        if preferred is not None and preferred.score <= chosen.score + self._max_extra_load:
            chosen = preferred
        self._affinity.record(keys, chosen.address)
        return chosen

    async def abort(self, request_id: str, indices: Sequence[int] = ()) -> bool:
        """Abort ``request_id`` on every engine, healthy or not (a draining engine still runs its streams);
        whether one of them was running it. An unreachable one answers at once with an error: False."""
        return any(await asyncio.gather(*(engine.abort(request_id, indices) for engine in self.engines)))

    def _health_changed(self) -> None:
        if self.healthy_engines or all(engine.answered.is_set() for engine in self.engines):
            self._settled.set()
        self._on_health_change(bool(self.healthy_engines))

    def _restarted(self, engine: EngineClient) -> None:
        self._affinity.forget(engine.address)
