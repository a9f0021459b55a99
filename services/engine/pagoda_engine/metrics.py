"""Prometheus metrics of the engine service, served over HTTP from their own registry.

Latencies are measured where tokens reach a request's stream in the server (what a client sees, less
the network). A request counts its prompt tokens at its first output. Finish reasons are counted per
sample (a request with n = 4 counts four); calls the client cancels are counted apart.
Gauges of the engine's state are read from the engine's load snapshot at scrape time, so serving a
token costs no gauge update.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagoda.latency_buckets import FIRST_TOKEN_BUCKETS, REQUEST_BUCKETS, TOKEN_BUCKETS
from pagoda_engine.engine import EngineLoad


class EngineMetrics:
    def __init__(self, load: Callable[[], EngineLoad]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("pagoda_engine_time_to_first_token_seconds",
                              "From a request's arrival to its sample's first token.", buckets=FIRST_TOKEN_BUCKETS,
                              registry=r)
        self.itl = Histogram("pagoda_engine_inter_token_latency_seconds",
                             "Between consecutive tokens of a sample.", buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("pagoda_engine_e2e_request_latency_seconds",
                             "From a request's arrival to its sample's last message.", buckets=REQUEST_BUCKETS,
                             registry=r)
        self.prompt_tokens = Counter("pagoda_engine_prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=r)
        self.generation_tokens = Counter("pagoda_engine_generation_tokens", "Tokens generated and streamed.",
                                         registry=r)
        self.finished = Counter("pagoda_engine_request_samples_finished", "Samples finished, by finish reason.",
                                ["finish_reason"], registry=r)
        self.failed = Counter("pagoda_engine_requests_failed", "Generate calls ended with an error, by gRPC status.",
                              ["code"], registry=r)
        self.cancelled = Counter("pagoda_engine_requests_cancelled",
                                 "Generate calls the client cancelled or let expire (their samples do not finish).",
                                 registry=r)
        r.register(_LoadCollector(load))

    def serve_http(self, host: str, port: int) -> Callable[[], None]:
        """Serve /metrics on a background thread; returns a function that stops it."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            thread.join()

        return stop


class StreamTimer:
    """Records one request's token latencies and counts as its outputs reach the stream."""

    def __init__(self, metrics: EngineMetrics, num_prompt_tokens: int):
        self._metrics = metrics
        self._num_prompt_tokens = num_prompt_tokens
        self._admitted = False
        self._start = time.monotonic()
        self._last_token_time: dict[int, float] = {}

    def record(self, index: int, num_tokens: int, finish_reason: str | None) -> None:
        """One message of sample ``index``: ``num_tokens`` new tokens, and why it ended if it did."""
        m = self._metrics
        now = time.monotonic()
        if not self._admitted:
            # Counted at the first output: a refused request processes no prompt.
            m.prompt_tokens.inc(self._num_prompt_tokens)
            self._admitted = True
        if num_tokens:
            m.generation_tokens.inc(num_tokens)
            last = self._last_token_time.get(index)
            if last is None:
                m.ttft.observe(now - self._start)
                # Tokens that reach the stream with the first one: no gap between them is observable.
                for _ in range(num_tokens - 1):
                    m.itl.observe(0.0)
            else:
                # Several tokens in one message came from several steps: spread the gap over them.
                gap = (now - last) / num_tokens
                for _ in range(num_tokens):
                    m.itl.observe(gap)
            self._last_token_time[index] = now
        if finish_reason is not None:
            m.e2e.observe(now - self._start)
            m.finished.labels(finish_reason).inc()


class _LoadCollector(Collector):
    """Engine state from the load snapshot the engine thread refreshes after every step."""

    def __init__(self, load: Callable[[], EngineLoad]):
        self._load = load

    def collect(self) -> Iterator[Metric]:
        load = self._load()
        used = load.kv_blocks_total - load.kv_blocks_free
        yield GaugeMetricFamily("pagoda_engine_num_running", "Sequences in the running batch.", load.running)
        yield GaugeMetricFamily("pagoda_engine_num_waiting", "Sequences waiting for prefill.", load.waiting)
        yield GaugeMetricFamily("pagoda_engine_kv_cache_usage", "Fraction of KV-cache blocks in use.",
                                used / max(load.kv_blocks_total, 1))
        yield CounterMetricFamily("pagoda_engine_prefix_cache_queried_tokens",
                                  "Prompt tokens looked up in the prefix cache.", load.prefix_query_tokens)
        yield CounterMetricFamily("pagoda_engine_prefix_cache_hit_tokens",
                                  "Prompt tokens found in the prefix cache.", load.prefix_hit_tokens)
        yield CounterMetricFamily("pagoda_engine_preemptions",
                                  "Sequences preempted for lack of KV blocks (recomputed later).", load.preemptions)
