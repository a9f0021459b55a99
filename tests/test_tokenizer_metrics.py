"""The tokenizer service's Prometheus metrics, scraped over HTTP from real services on loopback ports.

A real CPU engine (the tiny random model) sits behind the front; calls go through the generated stubs, and the
counts read from /metrics must match the calls made, exactly. With ``--workers 2`` the supervisor serves the
sum over both workers, and a dead worker's gauges leave the totals (a slow engine keeps a stream running while
the test looks). With metrics off, nothing listens but the gRPC port.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagoda.v1 import engine_pb2 as epb
from pagoda.v1 import tokenizer_pb2 as tpb
from pagoda.v1 import tokenizer_pb2_grpc
from pagoda_tokenizer.config import TokenizerConfig
from pagoda_tokenizer.metrics import WorkerMetrics
from tests.test_faults import slow_dir as slow_dir  # noqa: F401 - a fixture, shared
from tests.test_tokenizer_service import Engine, Front, collect, free_port, greedy, wait_for
from tests.test_tokenizer_service import tiny_dir as tiny_dir  # noqa: F401 - a fixture, shared
from tests.test_tokenizer_workers import channels, worker_processes, workers_front
from tests.test_tokenizer_workers import engine as engine  # noqa: F401 - a fixture, shared

pytestmark = pytest.mark.timeout(120)

Metrics = dict[tuple[str, tuple], float]
PROMPT = "Count me in"


def scrape(port: int) -> Metrics:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def by_labels(metrics: Metrics, name: str) -> dict[tuple, float]:
    """Every sample of ``name`` that is not zero, by its labels."""
    return {labels: v for (sample, labels), v in metrics.items() if sample == name and v}


@contextlib.contextmanager
def front_with_metrics(model_dir: Path, engine: Engine, log: Path, *flags: str) -> Iterator[tuple[Front, int]]:
    metrics_port = free_port()
    front = Front(model_dir, [engine.address], log, "--metrics-port", str(metrics_port), *flags)
    try:
        front.wait_serving()
        yield front, metrics_port
    finally:
        front.stop()


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process and its children listen on."""
    parent = psutil.Process(pid)
    return {conn.laddr.port for process in (parent, *parent.children(recursive=True))
            for conn in process.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN}


def connection_owners(front: Front, workers: list[psutil.Process]) -> dict[int, int]:
    """The pid of the worker that holds each client connection to the front's port, by the client's port."""
    return {conn.raddr.port: worker.pid for worker in workers for conn in worker.net_connections(kind="tcp")
            if conn.laddr and conn.laddr.port == front.port and conn.status == psutil.CONN_ESTABLISHED}


def new_connection_owner(front: Front, workers: list[psutil.Process], seen: dict[int, int]) -> int:
    """The worker holding the one connection not in ``seen`` (which then is)."""
    owners = connection_owners(front, workers)
    (client_port,) = set(owners) - set(seen)
    seen.update(owners)
    return owners[client_port]


def test_every_call_is_counted_by_method_status_and_finish_reason(tiny_dir, engine, tmp_path):  # noqa: F811
    with front_with_metrics(tiny_dir, engine, tmp_path / "front.log") as (front, port):
        assert by_labels(scrape(port), "pagoda_tokenizer_requests_received_total") == {}
        stub = front.stub
        plain = collect(stub.Generate(tpb.TextGenerateRequest(prompt=PROMPT,
                                                              sampling_params=greedy(5, ignore_eos=True))))
        chat = collect(stub.Chat(tpb.ChatRequest(messages=[tpb.ChatMessage(role="user", content="Hi")],
                                                 sampling_params=greedy(4, ignore_eos=True))))
        two = collect(stub.Generate(tpb.TextGenerateRequest(
            prompt=PROMPT, sampling_params=epb.SamplingParams(n=2, seed=1, max_tokens=3, ignore_eos=True))))
        stub.Tokenize(tpb.TokenizeRequest(text=PROMPT))
        for bad in (lambda: list(stub.Generate(tpb.TextGenerateRequest(prompt=""))),
                    lambda: stub.Tokenize(tpb.TokenizeRequest())):
            with pytest.raises(grpc.RpcError) as error:
                bad()
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        aborted = stub.Generate(tpb.TextGenerateRequest(request_id="metrics-abort", prompt=PROMPT,
                                                        sampling_params=greedy(400, ignore_eos=True)))
        first = next(aborted)
        assert stub.Abort(epb.AbortRequest(request_id="metrics-abort")).found
        aborted = collect(itertools.chain([first], aborted))
        assert aborted[0]["last"].finish_reason == epb.FINISH_REASON_ABORT
        finished = scrape(port)

        cancelled = stub.Generate(tpb.TextGenerateRequest(prompt=PROMPT, sampling_params=greedy(400, ignore_eos=True)))
        first_cancelled = next(cancelled)
        cancelled.cancel()
        wait_for(lambda: value(scrape(port), "pagoda_tokenizer_requests_finished_total", method="Generate",
                               code="CANCELLED") == 1, 5, "the cancelled call to be counted")
        after = scrape(port)

    assert by_labels(after, "pagoda_tokenizer_requests_received_total") == {
        (("method", "Generate"),): 5, (("method", "Chat"),): 1, (("method", "Tokenize"),): 2,
        (("method", "Abort"),): 1}
    assert by_labels(after, "pagoda_tokenizer_requests_finished_total") == {
        (("code", "OK"), ("method", "Generate")): 3, (("code", "INVALID_ARGUMENT"), ("method", "Generate")): 1,
        (("code", "CANCELLED"), ("method", "Generate")): 1, (("code", "OK"), ("method", "Chat")): 1,
        (("code", "OK"), ("method", "Tokenize")): 1, (("code", "INVALID_ARGUMENT"), ("method", "Tokenize")): 1,
        (("code", "OK"), ("method", "Abort")): 1}
    assert by_labels(after, "pagoda_tokenizer_requests_in_flight") == {}
    assert by_labels(after, "pagoda_tokenizer_request_samples_finished_total") == {
        (("finish_reason", "length"), ("method", "Generate")): 3,
        (("finish_reason", "abort"), ("method", "Generate")): 1, (("finish_reason", "length"), ("method", "Chat")): 1}

    # Every call that had an answer counts its prompt; a refused one does not.
    prompt_tokens = plain[0]["last"].usage.prompt_tokens
    assert two[0]["last"].usage.prompt_tokens == aborted[0]["last"].usage.prompt_tokens == prompt_tokens
    chat_tokens = chat[0]["last"].usage.prompt_tokens
    assert value(finished, "pagoda_tokenizer_prompt_tokens_total") == 3 * prompt_tokens + chat_tokens
    assert value(after, "pagoda_tokenizer_prompt_tokens_total") == 4 * prompt_tokens + chat_tokens
    # Tokens are counted as they leave: a cancelled stream's count lies between what its client read and all.
    streamed = 5 + 4 + 2 * 3 + len(aborted[0]["token_ids"])
    assert value(finished, "pagoda_tokenizer_generation_tokens_total") == streamed
    cancelled_tokens = value(after, "pagoda_tokenizer_generation_tokens_total") - streamed
    assert len(first_cancelled.token_ids) <= cancelled_tokens < 400

    # Per sample: the first token of each of the six samples that had one, the last of the five that finished.
    assert value(after, "pagoda_tokenizer_time_to_first_token_seconds_count") == 6
    assert value(after, "pagoda_tokenizer_e2e_request_latency_seconds_count") == 5
    ttft_bucket = ("pagoda_tokenizer_time_to_first_token_seconds_bucket", (("le", "+Inf"),))
    assert after[ttft_bucket] == 6
    # Tokenizing: the calls whose text became tokens (the empty prompt and the empty Tokenize did not).
    assert value(after, "pagoda_tokenizer_tokenization_seconds_count", method="Generate") == 4
    assert value(after, "pagoda_tokenizer_tokenization_seconds_count", method="Chat") == 1
    assert value(after, "pagoda_tokenizer_tokenization_seconds_count", method="Tokenize") == 1
    # The engine as the pool saw it: serving, nothing left open, no error and no failover.
    assert value(after, "pagoda_tokenizer_engine_healthy", engine=engine.address) == 1
    assert value(after, "pagoda_tokenizer_engine_requests_in_flight", engine=engine.address) == 0
    assert by_labels(after, "pagoda_tokenizer_engine_errors_total") == {}
    assert value(after, "pagoda_tokenizer_engine_failovers_total") == 0


def test_two_workers_add_up_on_the_supervisors_port(tiny_dir, engine, tmp_path):  # noqa: F811
    metrics_port = free_port()
    with workers_front(tiny_dir, engine, tmp_path / "front.log", 2, "--metrics-port", str(metrics_port)) as front, \
            channels(front.port, 16) as opened:
        workers = worker_processes(front)
        directory = Path(workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert directory.is_dir() and all(w.environ()["PROMETHEUS_MULTIPROC_DIR"] == str(directory) for w in workers)
        seen = connection_owners(front, workers)  # the front's own health-check connection
        for i, channel in enumerate(opened):
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            collect(stub.Generate(tpb.TextGenerateRequest(prompt=f"{PROMPT} {i}",
                                                          sampling_params=greedy(3, ignore_eos=True))))
            stub.Tokenize(tpb.TokenizeRequest(text=PROMPT))
        with pytest.raises(grpc.RpcError):
            list(tokenizer_pb2_grpc.TokenizerStub(opened[-1]).Generate(tpb.TextGenerateRequest(prompt="")))
        # 16 connections over 2 workers: all on one worker by chance has odds of 2**-15.
        owners = connection_owners(front, workers)
        assert len({owners[client] for client in set(owners) - set(seen)}) == 2
        finished = {(("code", "OK"), ("method", "Generate")): 16, (("code", "OK"), ("method", "Tokenize")): 16,
                    (("code", "INVALID_ARGUMENT"), ("method", "Generate")): 1}
        # A refusal's status can reach the client a moment before its worker counts it.
        wait_for(lambda: by_labels(scrape(metrics_port), "pagoda_tokenizer_requests_finished_total") == finished,
                 5, "every call to be counted")
        metrics = scrape(metrics_port)
        front.process.send_signal(signal.SIGTERM)
        assert front.process.wait(timeout=20) == 0
    assert not directory.exists()
    assert value(metrics, "pagoda_tokenizer_requests_received_total", method="Generate") == 17
    assert value(metrics, "pagoda_tokenizer_generation_tokens_total") == 16 * 3
    assert value(metrics, "pagoda_tokenizer_request_samples_finished_total", method="Generate",
                 finish_reason="length") == 16
    assert value(metrics, "pagoda_tokenizer_time_to_first_token_seconds_count") == 16
    assert value(metrics, "pagoda_tokenizer_e2e_request_latency_seconds_count") == 16
    assert value(metrics, "pagoda_tokenizer_tokenization_seconds_count", method="Tokenize") == 16
    # Gauges: the sum over the live workers (nothing open), the least of them (both see the engine serve).
    assert by_labels(metrics, "pagoda_tokenizer_requests_in_flight") == {}
    assert value(metrics, "pagoda_tokenizer_engine_requests_in_flight", engine=engine.address) == 0
    assert value(metrics, "pagoda_tokenizer_engine_healthy", engine=engine.address) == 1


@pytest.fixture(scope="module")
def slow_engine(slow_dir, tmp_path_factory) -> Iterator[Engine]:  # noqa: F811
    engine = Engine(slow_dir, tmp_path_factory.mktemp("slow-metrics-logs") / "engine.log", "--load-format", "dummy",
                    "--num-kv-blocks", "512")
    try:
        engine.wait_serving()
        yield engine
    finally:
        engine.stop()


def endless(channel: grpc.Channel):
    """A Generate stream that runs for minutes on the slow engine, once it has sent its first message."""
    request = tpb.TextGenerateRequest(prompt="endless", sampling_params=greedy(3000, ignore_eos=True))
    call = tokenizer_pb2_grpc.TokenizerStub(channel).Generate(request, timeout=60)
    next(call)
    return call


def test_a_dead_workers_gauges_leave_the_totals_and_its_counts_stay(slow_dir, slow_engine, tmp_path):  # noqa: F811
    metrics_port = free_port()
    with workers_front(slow_dir, slow_engine, tmp_path / "front.log", 2, "--metrics-port", str(metrics_port),
                       "--shutdown-grace-s", "30") as front, channels(front.port, 16) as opened:
        workers = worker_processes(front)
        directory = Path(workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
        seen = connection_owners(front, workers)  # the front's own health-check connection
        short = tpb.TextGenerateRequest(prompt=PROMPT, sampling_params=greedy(2, ignore_eos=True))
        collect(tokenizer_pb2_grpc.TokenizerStub(opened[0]).Generate(short))  # finished before its worker dies
        calls = [endless(opened[0])]
        victim = new_connection_owner(front, workers, seen)
        started = 2
        for channel in opened[1:]:  # each a connection of its own; the kernel picks its worker
            calls.append(endless(channel))
            started += 1
            if new_connection_owner(front, workers, seen) != victim:
                break
            calls.pop().cancel()  # on the victim's worker too
        assert len(calls) == 2, "15 connections all went to one worker"  # odds 2**-14
        in_flight = ("pagoda_tokenizer_requests_in_flight", (("method", "Generate"),))
        wait_for(lambda: scrape(metrics_port)[in_flight] == 2, 5, "the cancelled calls to be counted")
        psutil.Process(victim).kill()
        # The supervisor marks the victim dead and drains the survivor, whose stream runs on meanwhile.
        wait_for(lambda: scrape(metrics_port)[in_flight] == 1, 10, "the dead worker's gauge to leave the sum")
        metrics = scrape(metrics_port)
        for call in calls:
            call.cancel()
        assert front.process.wait(timeout=20) == 1
    assert not directory.exists()
    assert value(metrics, "pagoda_tokenizer_engine_requests_in_flight", engine=slow_engine.address) == 1
    # Every call the victim took stays counted, though it died holding one of them.
    assert value(metrics, "pagoda_tokenizer_requests_received_total", method="Generate") == started
    assert value(metrics, "pagoda_tokenizer_requests_finished_total", method="Generate", code="OK") == 1
    assert value(metrics, "pagoda_tokenizer_requests_finished_total", method="Generate", code="CANCELLED") \
        == started - 3


def test_a_passed_deadline_is_counted_as_such(slow_dir, slow_engine, tmp_path):  # noqa: F811
    with front_with_metrics(slow_dir, slow_engine, tmp_path / "front.log") as (front, port):
        late = tpb.TextGenerateRequest(prompt="late", sampling_params=greedy(3000, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as error:
            collect(front.stub.Generate(late, timeout=1.0))
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: value(scrape(port), "pagoda_tokenizer_requests_finished_total", method="Generate",
                               code="DEADLINE_EXCEEDED") == 1, 5, "the call to be counted")


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_off_listen_on_no_port(tiny_dir, engine, tmp_path, workers):  # noqa: F811
    with workers_front(tiny_dir, engine, tmp_path / "front.log", workers) as front:
        assert listening_ports(front.process.pid) == {front.port}
        assert "metrics" not in front.log.read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_metrics_port_is_one_line_and_exit_1(tiny_dir, tmp_path, workers):  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["pagoda_tokenizer", "--model", str(tiny_dir), "--engines", "127.0.0.1:1", "--host", "127.0.0.1",
                "--port", str(free_port()), "--workers", str(workers), "--metrics-port", str(port)]
        result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on http://127.0.0.1:{port}/metrics (metrics)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("settings", "match"), [
    (dict(metrics_port=65536), "port and metrics_port must be in [0, 65535]"),
    (dict(metrics_port=-1), "port and metrics_port must be in [0, 65535]"),
    (dict(port=9000, metrics_port=9000), "metrics_port must differ from port"),
])
def test_metrics_ports_that_cannot_work_are_refused(settings, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        TokenizerConfig(model="m", **settings)
    assert TokenizerConfig.from_args(["--model", "m"], env={"PAGODA_METRICS_PORT": "9401"}).metrics_port == 9401


def test_directories_left_by_a_killed_supervisor_are_removed_at_the_next_start(tmp_path, monkeypatch):
    """A SIGKILLed supervisor cannot remove its multiprocess directory: the next one does, and keeps those of
    supervisors still running."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    stale = tmp_path / f"pagoda-metrics-{finished.stdout.strip()}-x1"
    running = tmp_path / f"pagoda-metrics-{os.getppid()}-x2"
    unrelated = tmp_path / "pagoda-metrics-notes"
    for directory in (stale, running, unrelated):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"")
    metrics = WorkerMetrics("127.0.0.1", free_port())
    try:
        assert not stale.exists() and running.exists() and unrelated.exists()
        assert Path(metrics.directory).name.startswith(f"pagoda-metrics-{os.getpid()}-")
    finally:
        metrics.close()
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert not Path(metrics.directory).exists()
