"""Prometheus metrics of the tokenizer service: the front door as its clients see it, served over HTTP.

Three places record them:

- ``CallMetrics``, the outermost server interceptor, counts every pagoda.v1.Tokenizer call by method and by
  the gRPC status it ended with, so that calls refused for their token or for an undecodable message count
  too. A call the client cancelled ends CANCELLED, one whose deadline passed DEADLINE_EXCEEDED.
- ``StreamTimer`` records a Generate or Chat call's tokens and latencies as its messages leave for the
  client. Its clock starts when the call arrives, so the latencies include tokenizing the prompt (and
  rendering the chat template); per sample and on the engine's bucket edges (pagoda.latency_buckets), as
  the engine's own. A call counts its prompt tokens at its first message.
- The engine pool (engine_pool.py) keeps the per-engine figures: calls in flight, health, errors and
  failovers to another engine.

With ``--workers N`` each worker is a process of its own, and a scrape must not land on one of them at
random. prometheus_client's multiprocess mode sums them instead: every worker writes its values to
memory-mapped files in one directory, and the supervisor serves /metrics from those files
(``WorkerMetrics``). Counters and histograms of a worker that died stay in the totals, so they never go
backwards; its gauges leave them. The other designs give wrong or fragile totals: a port per worker makes
Prometheus scrape N targets whose split follows the kernel's, and the supervisor asking workers over pipes
loses a dead worker's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

from pagoda.latency_buckets import FIRST_TOKEN_BUCKETS, REQUEST_BUCKETS
from pagoda.v1 import engine_pb2, tokenizer_pb2

# prometheus_client reads it when it is first imported: it must be in a worker's environment from its start.
_MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# A sentence takes tens of microseconds; the largest message a couple of seconds.
_TOKENIZATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                         2.5, 5.0)
# A client whose deadline passes cancels the call, and its cancel reaches this server up to a network's one-way
# delay before the server's own copy of the deadline (timed from the call's arrival) passes: a cancel that comes
# this close to the deadline is the deadline.
_DEADLINE_SLACK_S = 0.25
# "stop", "length", "abort": the engine's labels.
_FINISH_LABELS = {value: name.removeprefix("FINISH_REASON_").lower()
                  for name, value in engine_pb2.FinishReason.items()}


class TokenizerMetrics:
    """Every metric of one service process, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("pagoda_tokenizer_requests_received", "Tokenizer calls received, by method.",
                                ["method"], registry=r)
        self.finished = Counter("pagoda_tokenizer_requests_finished",
                                "Tokenizer calls ended, by method and gRPC status code (CANCELLED: the client left).",
                                ["method", "code"], registry=r)
        # livesum: with several workers, the sum over those alive.
        self.in_flight = Gauge("pagoda_tokenizer_requests_in_flight", "Tokenizer calls being served, by method.",
                               ["method"], multiprocess_mode="livesum", registry=r)
        self.samples_finished = Counter("pagoda_tokenizer_request_samples_finished",
                                        "Generate and Chat samples whose last message was sent, by finish reason.",
                                        ["method", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("pagoda_tokenizer_prompt_tokens",
                                     "Prompt tokens of Generate and Chat calls that had an answer.", registry=r)
        self.generation_tokens = Counter("pagoda_tokenizer_generation_tokens", "Tokens streamed to clients.",
                                         registry=r)
        self.ttft = Histogram("pagoda_tokenizer_time_to_first_token_seconds",
                              "From a call's arrival (before tokenizing) to its sample's first token sent.",
                              buckets=FIRST_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("pagoda_tokenizer_e2e_request_latency_seconds",
                             "From a call's arrival (before tokenizing) to its sample's last message sent.",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.tokenization = Histogram("pagoda_tokenizer_tokenization_seconds",
                                      "Tokenizing a call's text or chat, by method (waiting for a thread included).",
                                      ["method"], buckets=_TOKENIZATION_BUCKETS, registry=r)
        self.engine_in_flight = Gauge("pagoda_tokenizer_engine_requests_in_flight",
                                      "Generate calls open to each engine.", ["engine"], multiprocess_mode="livesum",
                                      registry=r)
        # livemin: with several workers, 0 as soon as one of them cannot reach the engine.
        self.engine_healthy = Gauge("pagoda_tokenizer_engine_healthy", "1 while the engine's health is SERVING.",
                                    ["engine"], multiprocess_mode="livemin", registry=r)
        self.engine_errors = Counter("pagoda_tokenizer_engine_errors",
                                     "Generate calls to each engine that ended with an error, by gRPC status code.",
                                     ["engine", "code"], registry=r)
        self.failovers = Counter("pagoda_tokenizer_engine_failovers",
                                 "Requests sent on to another engine after one refused them before any output.",
                                 registry=r)

    @contextlib.contextmanager
    def timing_tokenization(self, method: str) -> Iterator[None]:
        """Observe how long the block took, unless it raised (a refused request is counted by its status)."""
        start = time.monotonic()
        yield
        self.tokenization.labels(method).observe(time.monotonic() - start)


class StreamTimer:
    """Records one Generate or Chat call's tokens and latencies as its messages leave for the client."""

    def __init__(self, metrics: TokenizerMetrics, method: str, num_prompt_tokens: int, arrival: float):
        self._metrics = metrics
        self._method = method
        self._num_prompt_tokens = num_prompt_tokens
        self._arrival = arrival  # time.monotonic() when the call came in
        self._answered = False
        self._started: set[int] = set()  # samples whose first token has been sent

    def record(self, out: tokenizer_pb2.TextGenerateResponse) -> None:
        m = self._metrics
        if not self._answered:
            m.prompt_tokens.inc(self._num_prompt_tokens)
            self._answered = True
        if out.token_ids:
            m.generation_tokens.inc(len(out.token_ids))
            if out.index not in self._started:
                self._started.add(out.index)
                m.ttft.observe(time.monotonic() - self._arrival)
        if out.finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED:
            m.e2e.observe(time.monotonic() - self._arrival)
            m.samples_finished.labels(self._method, _FINISH_LABELS[out.finish_reason]).inc()


class CallMetrics(grpc.aio.ServerInterceptor):
    """Counts the calls of one gRPC service (``service_name``): received, in flight, and finished by status."""

    def __init__(self, metrics: TokenizerMetrics, service_name: str):
        self._metrics = metrics
        self._prefix = f"/{service_name}/"

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        # Health, reflection and unknown methods are not counted; the service has no streaming requests.
        if handler is None or not details.method.startswith(self._prefix) or handler.request_streaming:
            return handler
        method = details.method.removeprefix(self._prefix)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary),
                                                       handler.request_deserializer, handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(self._stream(method, handler.unary_stream),
                                                    handler.request_deserializer, handler.response_serializer)

    def _unary(self, method: str, behavior: Callable) -> Callable:
        async def counted(request: object, context: grpc.aio.ServicerContext) -> object:
            with self._counting(method, context):
                return await behavior(request, context)

        return counted

    def _stream(self, method: str, behavior: Callable) -> Callable:
        if not inspect.isasyncgenfunction(behavior):
            return self._unary(method, behavior)  # a coroutine that writes its own messages (an auth refusal)

        # A coroutine that writes what the handler yields, so that a client's cancel lands here (and closes the
        # handler's generator at once), not in grpc's own loop over the generator, which leaves it suspended
        # for the garbage collector to close, uncounted until then.
        async def counted(request: object, context: grpc.aio.ServicerContext) -> None:
            with self._counting(method, context):
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        await context.write(response)

        return counted

    @contextlib.contextmanager
    def _counting(self, method: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
        m = self._metrics
        m.received.labels(method).inc()
        in_flight = m.in_flight.labels(method)
        in_flight.inc()
        code = None
        try:
            yield
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            remaining = context.time_remaining()
            past_deadline = remaining is not None and remaining < _DEADLINE_SLACK_S
            code = grpc.StatusCode.DEADLINE_EXCEEDED if past_deadline else grpc.StatusCode.CANCELLED
            raise
        except Exception as error:
            if not isinstance(error, grpc.aio.AbortError):  # else context.code() holds what abort() set
                code = grpc.StatusCode.UNKNOWN  # what gRPC answers for an exception
            raise
        finally:
            in_flight.dec()
            m.finished.labels(method, (code or context.code() or grpc.StatusCode.OK).name).inc()


def serve_http(registry: CollectorRegistry, host: str, port: int) -> Callable[[], None]:
    """Serve ``registry`` at /metrics on a background thread; returns a function that stops it."""
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop


_DIRECTORY_PREFIX = "pagoda-metrics-"


def remove_stale_directories() -> None:
    """Delete the multiprocess directories of supervisors that died without closing them (SIGKILL, OOM):
    those whose pid no longer runs, or is this process's own (which has not made one yet)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_DIRECTORY_PREFIX}*-*"):
        pid = path.name.removeprefix(_DIRECTORY_PREFIX).split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class WorkerMetrics:
    """The supervisor's side of multiprocess mode: the workers' directory, and /metrics summed over it.

    Create it before starting the workers: it names the directory in the environment they inherit."""

    def __init__(self, host: str, port: int):
        remove_stale_directories()
        # A fresh directory each run: files left by an earlier run would be added to the totals. Its name
        # holds this process's pid, so that a later run can tell when it was left behind.
        self.directory = tempfile.mkdtemp(prefix=f"{_DIRECTORY_PREFIX}{os.getpid()}-")
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)
        try:
            self._stop = serve_http(registry, host, port)
        except OSError:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        os.environ[_MULTIPROCESS_DIR_VARIABLE] = self.directory

    def process_dead(self, pid: int) -> None:
        """Drop a finished worker's gauges from the totals (its counters stay)."""
        multiprocess.mark_process_dead(pid, self.directory)

    def close(self) -> None:
        self._stop()
        os.environ.pop(_MULTIPROCESS_DIR_VARIABLE, None)
        shutil.rmtree(self.directory, ignore_errors=True)
