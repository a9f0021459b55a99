"""Faults, end to end: the tokenizer service in front of real engine processes on loopback ports, and engines
that are killed, stopped, slow, started late or short of KV blocks. Every test checks that each stream ends
with a finish reason or the status the fault explains, and that the engines end with no request and every
KV block free. The two-engine kill/restart case lives in test_tokenizer_service.py; here one engine is the
whole fleet, so the front's own health has to follow it.

Times that docs/reliability.md reports are printed as `FIGURE name value` (run with -s to see them).
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from pagoda.v1 import engine_pb2 as epb
from pagoda.v1 import tokenizer_pb2 as tpb
from tests.test_engine_service import dummy_model_dir
from tests.test_tokenizer_service import (
    TINY_VOCAB,
    Engine,
    Front,
    _health,
    collect,
    engine_and_front,
    free_port,
    greedy,
    wait_for,
)
from tests.test_tokenizer_service import tiny_dir as tiny_dir  # noqa: F401 - a fixture, shared
from tests.tokenizer_helpers import byte_level_tokenizer_json, write_tokenizer_dir

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def figure(name: str, value: float) -> None:
    print(f"FIGURE {name} {value:.3f}")


@dataclass
class Outcome:
    """How one stream ended: its samples, and the status code (None: OK) with the time it came."""

    samples: dict[int, dict] = field(default_factory=dict)
    code: grpc.StatusCode | None = None
    details: str = ""
    ended_at: float = 0.0


def drain(call, first: object | None = None) -> Outcome:
    """Read a stream to its end; `first`: its first message, when the caller has read it already."""
    outcome = Outcome()
    try:
        outcome.samples = collect(call if first is None else itertools.chain([first], call))
    except grpc.RpcError as error:
        outcome.code, outcome.details = error.code(), error.details()
    outcome.ended_at = time.monotonic()
    return outcome


def start_streams(pool: ThreadPoolExecutor, requests: list) -> list[Future]:
    """Open one stream per (method, request) and wait for its first message, so that it is running on the
    engine; the rest of each stream is read in `pool`, into the Outcome its future holds."""
    futures = []
    for method, request in requests:
        call = method(request)
        futures.append(pool.submit(drain, call, next(call)))
    return futures


def long_requests(front: Front) -> list:
    """A Generate, a Chat and an n=2 Generate, each far longer than any test waits for."""
    params = epb.SamplingParams(max_tokens=450, ignore_eos=True)
    chat = tpb.ChatRequest(messages=[tpb.ChatMessage(role="user", content="Talk for a long time")],
                           sampling_params=params)
    n2 = epb.SamplingParams(max_tokens=450, ignore_eos=True, n=2)
    return [(front.stub.Generate, tpb.TextGenerateRequest(prompt="A long story", sampling_params=params)),
            (front.stub.Chat, chat),
            (front.stub.Generate, tpb.TextGenerateRequest(prompt="Two long stories", sampling_params=n2))]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """An engine's Prometheus samples, by name and labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def engine_idle(engine: Engine) -> bool:
    load = engine.load()
    return load.num_running == load.num_waiting == load.kv_blocks_used == 0


@pytest.fixture
def pair(tiny_dir, tmp_path):  # noqa: F811 - the fixture imported above
    """One engine and a front in front of it, both stopped afterwards."""
    with engine_and_front(tiny_dir, tmp_path) as (front, engine):
        yield front, engine


@pytest.fixture(scope="module")
def slow_dir(tmp_path_factory) -> Path:
    """Dummy weights big enough that one CPU step takes tens of milliseconds, with the tiny tokenizer."""
    path = dummy_model_dir(tmp_path_factory.mktemp("slow"), vocab_size=TINY_VOCAB, hidden_size=512,
                           intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8,
                           num_key_value_heads=4, max_position_embeddings=4096)
    return write_tokenizer_dir(path, byte_level_tokenizer_json(TINY_VOCAB))


def test_sigkill_ends_every_stream_unavailable_and_a_restart_recovers(pair):
    front, engine = pair
    with ThreadPoolExecutor(3) as pool:
        futures = start_streams(pool, long_requests(front))
        killed_at = time.monotonic()
        engine.process.send_signal(signal.SIGKILL)
        engine.process.wait()
        outcomes = [future.result(timeout=5) for future in futures]
    assert [o.code for o in outcomes] == [grpc.StatusCode.UNAVAILABLE] * 3, [o.details for o in outcomes]
    latest = max(o.ended_at for o in outcomes) - killed_at
    figure("sigkill_to_last_stream_unavailable_s", latest)
    assert latest < 1.0
    wait_for(lambda: _health(front) == NOT_SERVING, 5, "NOT_SERVING")
    figure("sigkill_to_front_not_serving_s", time.monotonic() - killed_at)
    assert front.info().num_healthy_engines == 0

    # With the engine gone, generation is refused at once; tokenizing needs no engine.
    asked_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        list(front.stub.Generate(tpb.TextGenerateRequest(prompt="anyone?"), timeout=10))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    figure("refusal_while_down_s", time.monotonic() - asked_at)
    assert front.stub.Tokenize(tpb.TokenizeRequest(text="still here")).token_ids

    restarted_at = time.monotonic()
    engine.start()  # the same port: the front's channel finds it again
    engine.wait_serving()
    figure("restart_to_engine_serving_s", time.monotonic() - restarted_at)
    wait_for(lambda: _health(front) == SERVING, 10, "SERVING again")
    figure("restart_to_front_serving_s", time.monotonic() - restarted_at)
    answer = collect(front.stub.Generate(tpb.TextGenerateRequest(prompt="back", sampling_params=greedy(8))))[0]
    assert answer["last"].finish_reason == epb.FINISH_REASON_LENGTH and len(answer["token_ids"]) == 8


def test_sigterm_on_the_engine_drains_its_streams(tiny_dir, tmp_path):  # noqa: F811
    with engine_and_front(tiny_dir, tmp_path, engine_flags=["--drain-grace-seconds", "30"]) as (front, engine):
        params = greedy(120, ignore_eos=True)
        requests = [(front.stub.Generate, tpb.TextGenerateRequest(prompt=f"drain {i}", sampling_params=params))
                    for i in range(3)]
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = start_streams(pool, requests)
            engine.process.send_signal(signal.SIGTERM)
            # Draining: the engine refuses new work, which the front answers UNAVAILABLE (no other engine).
            wait_for(lambda: _health(front) == NOT_SERVING, 5, "the front to see the drain")
            with pytest.raises(grpc.RpcError) as error:
                list(front.stub.Generate(tpb.TextGenerateRequest(prompt="late"), timeout=10))
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            outcomes = [future.result(timeout=30) for future in futures]
        # ...while every stream in flight ran to its end.
        for outcome in outcomes:
            assert outcome.code is None, outcome.details
            last = outcome.samples[0]["last"]
            assert last.finish_reason == epb.FINISH_REASON_LENGTH and len(outcome.samples[0]["token_ids"]) == 120
            assert last.usage.completion_tokens == 120
        assert engine.process.wait(timeout=15) == 0


def test_sigterm_on_the_front_finishes_short_streams_and_aborts_long_ones(slow_dir, tmp_path):
    with engine_and_front(slow_dir, tmp_path, engine_flags=["--load-format", "dummy", "--num-kv-blocks", "512"],
                          front_flags=["--shutdown-grace-s", "1.5"]) as (front, engine):
        short = tpb.TextGenerateRequest(prompt="short", sampling_params=greedy(5, ignore_eos=True))
        # Tens of milliseconds a step: 3000 tokens outlast the grace period many times over.
        endless = tpb.TextGenerateRequest(prompt="endless", sampling_params=greedy(3000, ignore_eos=True))
        with ThreadPoolExecutor(2) as pool:
            futures = start_streams(pool, [(front.stub.Generate, short), (front.stub.Generate, endless)])
            front.process.send_signal(signal.SIGTERM)
            short_outcome, endless_outcome = (future.result(timeout=10) for future in futures)
        assert short_outcome.code is None and len(short_outcome.samples[0]["token_ids"]) == 5
        # Cut at the end of the grace period; what matters is that the engine does not keep generating.
        assert endless_outcome.code is not None
        assert front.process.wait(timeout=10) == 0
        wait_for(lambda: engine_idle(engine), 5, "the engine to drop the abandoned request")


def test_a_front_started_before_its_engine_waits_and_then_serves(tiny_dir, tmp_path):  # noqa: F811
    port = free_port()
    front = Front(tiny_dir, [f"127.0.0.1:{port}"], tmp_path / "front.log")
    engine = None
    try:
        wait_for(lambda: _health(front) is not None, 10, "the front to answer")
        assert _health(front) == NOT_SERVING
        engine = Engine(tiny_dir, tmp_path / "engine.log", port=port)
        engine.wait_serving()
        figure("engine_serving_to_front_serving_s", wait_for(lambda: _health(front) == SERVING, 10, "SERVING"))
        answer = collect(front.stub.Generate(tpb.TextGenerateRequest(prompt="late", sampling_params=greedy(5))))[0]
        assert len(answer["token_ids"]) == 5
        assert front.info().model.max_model_len == 512
    finally:
        front.stop()
        if engine is not None:
            engine.stop()


def test_deadlines_on_a_slow_engine_free_running_and_waiting_requests(slow_dir, tmp_path):
    # One sequence at a time: the second request waits in the queue while the first runs.
    flags = ["--load-format", "dummy", "--num-kv-blocks", "512", "--max-num-seqs", "1"]
    with engine_and_front(slow_dir, tmp_path, engine_flags=flags) as (front, engine):
        running = tpb.TextGenerateRequest(prompt="slow", sampling_params=greedy(3000, ignore_eos=True))
        waiting = tpb.TextGenerateRequest(prompt="queued", sampling_params=greedy(3000, ignore_eos=True))
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(drain, front.stub.Generate(running, timeout=1.5))
            wait_for(lambda: engine.load().num_running == 1, 5, "the first request to run")
            second = pool.submit(drain, front.stub.Generate(waiting, timeout=0.5))
            outcomes = [second.result(), first.result()]
        assert [o.code for o in outcomes] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
        assert outcomes[0].ended_at < outcomes[1].ended_at, "the queued request's deadline came first"
        figure("deadline_to_engine_idle_s", wait_for(lambda: engine_idle(engine), 5, "every block free"))


def test_a_kv_cache_filled_to_the_brim_queues_preempts_and_finishes_everything(tiny_dir, tmp_path):  # noqa: F811
    """24 blocks of 16 tokens: each request needs about 14 blocks, 10 run at once, so newcomers wait and
    running sequences that need another block preempt others. Greedy answers must equal the same requests
    served one at a time: preempted work is recomputed, never lost or duplicated."""
    from pagoda_engine import LLM, SamplingParams

    metrics_port = free_port()
    flags = ["--num-kv-blocks", "24", "--block-size", "16", "--metrics-port", str(metrics_port)]
    with engine_and_front(tiny_dir, tmp_path, engine_flags=flags) as (front, engine):
        assert front.info().model.max_model_len == 24 * 16
        prompts = [f"{i} " + "brim " * (5 + 6 * i) for i in range(10)]  # about 12 to 120 tokens
        max_tokens = [200 - 12 * i for i in range(10)]
        params = [epb.SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
        # n > 1 samples share their prompt's blocks: the case where preemption and prefix sharing meet.
        prompts.append("three " + "brim " * 40)
        params.append(epb.SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=120, ignore_eos=True))
        requests = [tpb.TextGenerateRequest(prompt=p, sampling_params=s) for p, s in zip(prompts, params, strict=True)]
        peak_waiting = 0
        done = threading.Event()

        def watch() -> None:
            nonlocal peak_waiting
            while not done.is_set():
                peak_waiting = max(peak_waiting, engine.load().num_waiting)
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            with ThreadPoolExecutor(len(requests)) as pool:
                answers = list(pool.map(lambda r: collect(front.stub.Generate(r, timeout=90)), requests))
        finally:
            done.set()
            watcher.join()
        assert peak_waiting > 0, "the cache never ran short"
        preemptions = scrape(metrics_port)[("pagoda_engine_preemptions_total", ())]
        figure("brim_preemptions", preemptions)
        assert preemptions > 0
        wait_for(lambda: engine_idle(engine), 5, "every block free")

        prompt_ids = [list(front.stub.Tokenize(tpb.TokenizeRequest(text=p)).token_ids) for p in prompts]
        llm = LLM(str(tiny_dir), device="cpu", dtype="float32", cpu_kv_cache_gib=0.05)
        for ids, wire, samples in zip(prompt_ids, params, answers, strict=True):
            offline = SamplingParams(temperature=wire.temperature, seed=wire.seed if wire.HasField("seed") else None,
                                     n=wire.n or 1, max_tokens=wire.max_tokens, ignore_eos=True)
            [expected] = llm.generate(ids, offline)
            assert sorted(samples) == list(range(offline.n))
            for index, want in enumerate(expected.outputs):
                assert samples[index]["last"].finish_reason == epb.FINISH_REASON_LENGTH
                assert samples[index]["token_ids"] == want.token_ids
                assert samples[index]["text"] == want.text
