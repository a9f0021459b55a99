"""``python -m pagoda_tokenizer --workers N``: N worker processes on one port behind a supervisor.

Real services on loopback ports, as in tests/test_tokenizer_service.py: one engine with the tiny random
model, and fronts with several workers in front of it. Which worker serves a connection is read from /proc
(through psutil): the worker process that holds the accepted socket.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagoda.v1 import engine_pb2 as epb
from pagoda.v1 import tokenizer_pb2 as tpb
from pagoda.v1 import tokenizer_pb2_grpc
from pagoda_tokenizer.config import TokenizerConfig
from tests.test_tokenizer_service import CHANNEL_OPTIONS, Engine, Front, collect, greedy, wait_for
from tests.test_tokenizer_service import tiny_dir as tiny_dir  # noqa: F401 - a fixture, shared

pytestmark = pytest.mark.timeout(90)

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A subchannel pool of its own per channel: each channel opens its own TCP connection, which the kernel
# hands to any one of the workers.
SEPARATE = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory) -> Iterator[Engine]:  # noqa: F811
    engine = Engine(tiny_dir, tmp_path_factory.mktemp("workers-logs") / "engine.log")
    try:
        engine.wait_serving()
        yield engine
    finally:
        engine.stop()


@contextlib.contextmanager
def workers_front(tiny_dir: Path, engine: Engine, log: Path, workers: int, *flags: str) -> Iterator[Front]:  # noqa: F811
    front = Front(tiny_dir, [engine.address], log, "--workers", str(workers), *flags)
    try:
        front.wait_serving()
        # Health answers once one worker serves; the others may still be starting.
        wait_for(lambda: front.log.read_text().count("listening on") == workers, 10, "every worker to listen")
        yield front
    finally:
        front.stop()


@contextlib.contextmanager
def channels(port: int, count: int) -> Iterator[list[grpc.Channel]]:
    opened = [grpc.insecure_channel(f"127.0.0.1:{port}", options=SEPARATE) for _ in range(count)]
    try:
        yield opened
    finally:
        for channel in opened:
            channel.close()


def worker_processes(front: Front) -> list[psutil.Process]:
    """The supervisor's multiprocessing children (not its resource tracker)."""
    children = psutil.Process(front.process.pid).children()
    return [p for p in children if "spawn_main" in " ".join(p.cmdline())]


def workers_holding_connections(front: Front, workers: list[psutil.Process]) -> set[int]:
    """Pids of the workers that hold an established client connection to the front's port."""
    return {worker.pid for worker in workers for conn in worker.net_connections(kind="tcp")
            if conn.laddr and conn.laddr.port == front.port and conn.status == psutil.CONN_ESTABLISHED}


def generate(channel: grpc.Channel, prompt: str, params: epb.SamplingParams) -> dict:
    stub = tokenizer_pb2_grpc.TokenizerStub(channel)
    return collect(stub.Generate(tpb.TextGenerateRequest(prompt=prompt, sampling_params=params), timeout=30))[0]


def test_connections_spread_over_the_workers_and_get_the_same_text(tiny_dir, engine, tmp_path):  # noqa: F811
    prompts = [f"prompt {i}: the quick brown fox" for i in range(12)]
    one = Front(tiny_dir, [engine.address], tmp_path / "one.log")
    try:
        one.wait_serving()
        expected = [generate(one.channel, prompt, greedy(16)) for prompt in prompts]
    finally:
        one.stop()
    with workers_front(tiny_dir, engine, tmp_path / "front.log", 3) as front, channels(front.port, 12) as opened:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda args: generate(*args, greedy(16)), zip(opened, prompts, strict=True)))
        # 12 connections over 3 workers: all on one worker by chance has odds of 3 / 3**12.
        serving = workers_holding_connections(front, worker_processes(front))
        assert "3 workers serve" in front.log.read_text()
    for one_worker, three_workers in zip(expected, got, strict=True):
        assert three_workers["token_ids"] == one_worker["token_ids"]
        assert three_workers["text"] == one_worker["text"]
    assert len(serving) > 1, f"every connection went to one worker: {serving}"


def test_abort_sent_to_another_worker_reaches_the_engine(tiny_dir, engine, tmp_path):  # noqa: F811
    with workers_front(tiny_dir, engine, tmp_path / "front.log", 2) as front, channels(front.port, 16) as opened:
        workers = worker_processes(front)
        call = tokenizer_pb2_grpc.TokenizerStub(opened[0]).Generate(tpb.TextGenerateRequest(
            request_id="far", prompt="Abort me from elsewhere", sampling_params=greedy(400, ignore_eos=True, n=2)),
            timeout=30)
        first = next(call)
        owner = workers_holding_connections(front, workers)
        other = None
        for channel in opened[1:]:  # each a connection of its own; the kernel picks its worker
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            if len(workers_holding_connections(front, workers)) > 1:
                other = channel
                break
        assert other is not None, f"16 connections all went to worker {owner}"  # odds 2**-15
        abort = tokenizer_pb2_grpc.TokenizerStub(other).Abort
        assert abort(epb.AbortRequest(request_id="far", indices=[1]), timeout=5).found
        samples = collect(itertools.chain([first], call))
        assert not abort(epb.AbortRequest(request_id="far"), timeout=5).found  # finished
    assert samples[1]["last"].finish_reason == epb.FINISH_REASON_ABORT and len(samples[1]["token_ids"]) < 400
    assert samples[0]["last"].finish_reason == epb.FINISH_REASON_LENGTH and len(samples[0]["token_ids"]) == 400


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(tiny_dir, engine, tmp_path):  # noqa: F811
    with workers_front(tiny_dir, engine, tmp_path / "front.log", 2, "--shutdown-grace-s", "20") as front, \
            channels(front.port, 4) as opened, ThreadPoolExecutor(4) as pool:
        workers = worker_processes(front)
        calls = [tokenizer_pb2_grpc.TokenizerStub(channel).Generate(tpb.TextGenerateRequest(
            prompt=f"drain {i}", sampling_params=greedy(400, ignore_eos=True)), timeout=30)
            for i, channel in enumerate(opened)]
        firsts = [next(call) for call in calls]  # each stream running on the engine
        # A health watch on each stream's connection: it reaches the worker that holds that stream.
        watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
                   for channel in opened]
        for watch in watches:
            next(watch)  # SERVING, the status when the watch started
        front.process.send_signal(signal.SIGTERM)
        assert all(next(watch).status == NOT_SERVING for watch in watches)
        assert engine.load().num_running > 0, "the streams ended before the drain began"
        for watch in watches:
            watch.cancel()  # a watch never ends by itself: the drain would wait for it
        outcomes = list(pool.map(lambda first, call: collect(itertools.chain([first], call)), firsts, calls))
        assert front.process.wait(timeout=20) == 0
        psutil.wait_procs(workers, timeout=5)
    for outcome in outcomes:
        assert len(outcome[0]["token_ids"]) == 400 and outcome[0]["last"].finish_reason == epb.FINISH_REASON_LENGTH
    assert [worker.is_running() for worker in workers] == [False, False]


def test_a_killed_worker_stops_the_others_and_the_supervisor_exits_1(tiny_dir, engine, tmp_path):  # noqa: F811
    with workers_front(tiny_dir, engine, tmp_path / "front.log", 3, "--shutdown-grace-s", "1") as front:
        victim, *others = worker_processes(front)
        victim.kill()
        assert front.process.wait(timeout=10) == 1
        _, alive = psutil.wait_procs(others, timeout=5)
        assert not alive
        assert f"(pid {victim.pid}) exited with code -9; stopping the others" in front.log.read_text()


def test_workers_do_not_outlive_a_killed_supervisor(tiny_dir, engine, tmp_path):  # noqa: F811
    with workers_front(tiny_dir, engine, tmp_path / "front.log", 2, "--shutdown-grace-s", "1") as front:
        workers = worker_processes(front)
        front.kill()
        _, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive
        assert "the supervisor is gone" in front.log.read_text()


@pytest.mark.parametrize(("flags", "match"), [
    (["--workers", "0"], "workers must be >= 1"),
    (["--workers", "2", "--port", "0"], "workers > 1 needs a fixed port"),
])
def test_worker_counts_that_cannot_work_are_refused(flags, match, capsys):
    with pytest.raises(SystemExit):
        TokenizerConfig.from_args(["--model", "m", *flags], env={})
    assert match in capsys.readouterr().err
    assert TokenizerConfig(model="m", workers=2).workers == 2


def test_a_bad_environment_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        TokenizerConfig.from_args(["--model", "m"], env={"PAGODA_PORT": "abc"})
    assert "PAGODA_PORT='abc': invalid literal for int()" in capsys.readouterr().err
    assert TokenizerConfig.from_args(["--model", "m"], env={"PAGODA_PORT": "7000"}).port == 7000


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_service_on_a_taken_port_exits_instead_of_sharing_it(tiny_dir, engine, tmp_path, workers):  # noqa: F811
    """gRPC binds with SO_REUSEPORT by default: a second instance used to start and take part of the traffic."""
    with workers_front(tiny_dir, engine, tmp_path / "first.log", 1) as first:
        args = ["pagoda_tokenizer", "--model", str(tiny_dir), "--engines", engine.address, "--host", "127.0.0.1",
                "--port", str(first.port), "--workers", str(workers)]
        second = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "cannot listen on 127.0.0.1:" in second.stderr and "Traceback" not in second.stderr
        assert first.info().num_engines == 1


def test_a_missing_model_directory_is_one_line(tmp_path):
    args = ["pagoda_tokenizer", "--model", str(tmp_path / "nowhere"), "--engines", "127.0.0.1:1", "--port", "0"]
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot load the tokenizer from" in result.stderr and "Traceback" not in result.stderr


def test_an_ipv6_host_is_bracketed(tiny_dir, engine, tmp_path):  # noqa: F811
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    front = Front(tiny_dir, [engine.address], tmp_path / "front.log", "--host", "::1")
    try:
        wait_for(lambda: "listening on [::1]:" in front.log.read_text() or front.process.poll() is not None, 30,
                 "the front to listen or exit")
        assert front.process.poll() is None, front.log.read_text()
    finally:
        front.stop()
