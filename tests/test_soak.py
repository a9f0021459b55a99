"""Soak: minutes of mixed traffic through the tokenizer service into a real engine, then a check that nothing
was lost, nothing leaked and neither process grew.

Workers stream Generate and Chat requests with short and long prompts, n > 1, stop strings, logprobs, prompt
logprobs and random sampling settings; some cancel mid-stream, some run into a deadline, some are aborted by request id.
Every stream must end with a finish reason on every sample, or with the status its client caused. The
engine has a small KV cache, so long requests contend for blocks (waiting and preemption are part of the
load). Afterwards the engine runs and waits for nothing and holds no KV block, and the resident memory of
both services after the warm-up stays within a tolerance.

PAGODA_SOAK_SECONDS sets the traffic's duration (default 120). The figures are printed as `SOAK ...`
lines (run with -s to see them); docs/reliability.md lists a run's.
"""

from __future__ import annotations

import itertools
import os
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest

from pagoda.v1 import engine_pb2 as epb
from pagoda.v1 import tokenizer_pb2 as tpb
from tests.test_faults import engine_idle, scrape
from tests.test_tokenizer_service import Front, collect, engine_and_front, free_port, wait_for
from tests.test_tokenizer_service import tiny_dir as tiny_dir  # noqa: F401 - a fixture, shared
from tests.tokenizer_helpers import HARD_TEXTS

SOAK_SECONDS = float(os.environ.get("PAGODA_SOAK_SECONDS", "120"))
WARMUP_SECONDS = min(30.0, SOAK_SECONDS / 4)
WORKERS = 6
# Resident memory may grow this much after the warm-up: allocator noise and bounded caches (the front's
# prefix-affinity table, the engine's prefix cache bookkeeping) fill slowly; a leak per request does not stop.
RSS_TOLERANCE_BYTES = 24 << 20
MAX_MODEL_LEN = 512

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SOAK_SECONDS) + 180)]


def rss_bytes(pid: int) -> int:
    """VmRSS from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Prompt:
    """A Generate prompt or Chat conversation and its length in tokens, measured by the service."""

    text: str | None
    messages: list[tpb.ChatMessage] | None
    num_tokens: int


def prompt_pool(front: Front, rng: random.Random) -> list[Prompt]:
    pool = []
    for i in range(40):
        pieces = rng.choices(HARD_TEXTS, k=rng.choice([1, 2, 12]))  # short and long ones
        text = f"{i} " + " ".join(pieces)
        if i % 3:
            ids = front.stub.Tokenize(tpb.TokenizeRequest(text=text)).token_ids
            pool.append(Prompt(text, None, len(ids)))
        else:
            messages = [tpb.ChatMessage(role="system", content=pieces[0]), tpb.ChatMessage(role="user", content=text)]
            ids = front.stub.Tokenize(tpb.TokenizeRequest(chat=tpb.ChatMessages(messages=messages))).token_ids
            pool.append(Prompt(None, messages, len(ids)))
    return [p for p in pool if p.num_tokens < MAX_MODEL_LEN - 8]


@dataclass
class Plan:
    """One request and what its client does to it."""

    prompt: Prompt
    params: epb.SamplingParams
    stop: list[str]
    request_id: str
    behaviour: str  # "read", "cancel", "deadline" or "abort"
    cancel_after: int = 1
    timeout: float = 60.0


def plan(rng: random.Random, pool: list[Prompt], request_id: str) -> Plan:
    prompt = rng.choice(pool)
    room = MAX_MODEL_LEN - prompt.num_tokens
    params = epb.SamplingParams(max_tokens=rng.randint(1, min(room, rng.choice([8, 32, 160]))),
                                ignore_eos=rng.random() < 0.5, n=rng.choice([1, 1, 1, 2, 3]))
    if rng.random() < 0.5:
        params.temperature = rng.choice([0.0, 0.7, 1.0])
        params.seed = rng.getrandbits(32)
    if rng.random() < 0.2:
        params.top_p, params.top_k = 0.9, 40
    if rng.random() < 0.2:
        params.logprobs = rng.randint(0, 5)
    if rng.random() < 0.1:
        params.prompt_logprobs = rng.randint(0, 3)
    stop = rng.sample(["e", "o ", "!", "\n", "世界", "ß"], k=rng.randint(1, 3)) if rng.random() < 0.3 else []
    behaviour = rng.choices(["read", "cancel", "deadline", "abort"], weights=[70, 12, 10, 8])[0]
    return Plan(prompt, params, stop, request_id, behaviour, cancel_after=rng.randint(1, 4),
                timeout=rng.uniform(0.05, 0.6) if behaviour == "deadline" else 60.0)


@dataclass
class Tally:
    requests: Counter = field(default_factory=Counter)  # by behaviour
    outcomes: Counter = field(default_factory=Counter)  # by status or finish reason
    tokens: int = 0
    errors: list[str] = field(default_factory=list)  # what should not have happened
    lock: threading.Lock = field(default_factory=threading.Lock)


def run(front: Front, p: Plan, tally: Tally) -> None:
    """Send one planned request and check how it ended."""
    call = (front.stub.Generate(tpb.TextGenerateRequest(request_id=p.request_id, prompt=p.prompt.text,
                                                        sampling_params=p.params, stop=p.stop), timeout=p.timeout)
            if p.prompt.text is not None else
            front.stub.Chat(tpb.ChatRequest(request_id=p.request_id, messages=p.prompt.messages,
                                            sampling_params=p.params, stop=p.stop), timeout=p.timeout))
    try:
        if p.behaviour == "cancel":
            for _ in range(p.cancel_after):
                next(call, None)
            call.cancel()
            outcome = "cancelled by the client"
        else:
            if p.behaviour == "abort":
                first = next(call)  # the request is running: abort it by id
                front.stub.Abort(epb.AbortRequest(request_id=p.request_id), timeout=10)
                samples = collect(itertools.chain([first], call))
            else:
                samples = collect(call)
            outcome = check_samples(p, samples, tally)
    except grpc.RpcError as error:
        outcome = error.code().name
        if not (p.behaviour == "deadline" and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
            with tally.lock:
                tally.errors.append(f"{p.behaviour} request ended {error.code().name}: {error.details()}")
    with tally.lock:
        tally.requests[p.behaviour] += 1
        tally.outcomes[outcome] += 1


def check_samples(p: Plan, samples: dict[int, dict], tally: Tally) -> str:
    """Every sample ended, with usage that counts exactly the tokens streamed; returns the finish reasons."""
    n = p.params.n or 1
    problems = []
    if sorted(samples) != list(range(n)):
        problems.append(f"samples {sorted(samples)} of n={n}")
    reasons = []
    for index, sample in samples.items():
        last = sample["last"]
        if last is None:
            problems.append(f"sample {index} has no last message")
            continue
        reasons.append(epb.FinishReason.Name(last.finish_reason))
        if last.usage.completion_tokens != len(sample["token_ids"]):
            problems.append(f"sample {index}: usage {last.usage.completion_tokens} != {len(sample['token_ids'])}")
        if last.finish_reason == epb.FINISH_REASON_LENGTH and len(sample["token_ids"]) != p.params.max_tokens:
            problems.append(f"sample {index}: LENGTH after {len(sample['token_ids'])} of {p.params.max_tokens}")
        if last.finish_reason == epb.FINISH_REASON_ABORT and p.behaviour != "abort":
            problems.append(f"sample {index} aborted without an abort")
        if last.stop_string and last.stop_string not in p.stop:
            problems.append(f"sample {index}: stop string {last.stop_string!r} was not asked for")
        # Output ends before the first match of any stop string, so none can appear in it.
        if any(stop in sample["text"] for stop in p.stop):
            problems.append(f"sample {index}: a stop string in the output {sample['text']!r}")
        # Once, with sample 0's first token (preempted or not), one entry per prompt token after the first.
        scored = p.params.HasField("prompt_logprobs") and index == 0 and sample["token_ids"]
        if len(sample["prompt_logprobs"]) != (p.prompt.num_tokens - 1 if scored else 0):
            problems.append(f"sample {index}: {len(sample['prompt_logprobs'])} prompt logprobs for a prompt of "
                            f"{p.prompt.num_tokens} tokens")
    with tally.lock:
        tally.tokens += sum(len(s["token_ids"]) for s in samples.values())
        tally.errors += [f"{p.behaviour} request: {problem}" for problem in problems]
    return "+".join(sorted(set(reasons)))


def worker(front: Front, seed: int, stop_at: float, pool: list[Prompt], tally: Tally) -> None:
    rng = random.Random(seed)
    i = 0
    while time.monotonic() < stop_at:
        run(front, plan(rng, pool, f"soak-{seed}-{i}"), tally)
        i += 1


class RssSampler(threading.Thread):
    """Resident memory of the services' processes, once a second."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.pids = pids
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.done.wait(1.0):
            self.samples.append((time.monotonic() - start, {k: rss_bytes(pid) for k, pid in self.pids.items()}))

    def median_between(self, name: str, start: float, end: float) -> int:
        return int(statistics.median(rss[name] for t, rss in self.samples if start <= t <= end))


@pytest.fixture(scope="module")
def pair(tiny_dir, tmp_path_factory):  # noqa: F811 - the fixture imported above
    logs = tmp_path_factory.mktemp("soak-logs")
    # 96 blocks of 16 tokens: three long requests fill the cache, so traffic waits and preempts.
    metrics_port = free_port()
    flags = ["--num-kv-blocks", "96", "--metrics-port", str(metrics_port)]
    with engine_and_front(tiny_dir, logs, engine_flags=flags) as (front, engine):
        yield front, engine, metrics_port


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def test_soak(pair):
    front, engine, metrics_port = pair
    pool = prompt_pool(front, random.Random(0))
    tally = Tally()
    # The engine service is two processes: its gRPC server and the engine core it spawned.
    core = next(p for p in psutil.Process(engine.process.pid).children() if "spawn_main" in " ".join(p.cmdline()))
    sampler = RssSampler({"engine server": engine.process.pid, "engine core": core.pid,
                          "tokenizer": front.process.pid})
    sampler.start()
    start = time.monotonic()
    workers = [threading.Thread(target=worker, args=(front, seed, start + SOAK_SECONDS, pool, tally), daemon=True)
               for seed in range(WORKERS)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=SOAK_SECONDS + 120)
    elapsed = time.monotonic() - start
    assert not any(thread.is_alive() for thread in workers), "a worker hung"
    wait_for(lambda: engine_idle(engine), 10, "the engine to go idle")
    time.sleep(2.0)  # two more RSS samples, idle
    sampler.done.set()
    sampler.join()

    load = engine.load()
    total = sum(tally.requests.values())
    print(f"\nSOAK duration {elapsed:.0f} s, {WORKERS} workers, {total} requests ({total / elapsed:.1f}/s), "
          f"{tally.tokens} tokens streamed")
    print(f"SOAK requests by behaviour {dict(tally.requests)}")
    print(f"SOAK outcomes {dict(tally.outcomes)}")
    print(f"SOAK unexpected errors {len(tally.errors)}")
    metrics = scrape(metrics_port)
    print(f"SOAK engine: {metrics[('pagoda_engine_preemptions_total', ())]:.0f} preemptions, "
          f"{metrics[('pagoda_engine_requests_cancelled_total', ())]:.0f} requests cancelled")
    print(f"SOAK engine load after: running {load.num_running}, waiting {load.num_waiting}, "
          f"KV blocks used {load.kv_blocks_used} of {load.kv_blocks_total}")
    growth = {}
    for name in sampler.pids:
        before = sampler.median_between(name, WARMUP_SECONDS - 5, WARMUP_SECONDS + 5)
        after = sampler.median_between(name, elapsed - 10, elapsed + 10)
        peak = max(rss[name] for _, rss in sampler.samples)
        growth[name] = after - before
        print(f"SOAK RSS {name}: after warm-up {mib(before)}, at the end {mib(after)}, "
              f"growth {mib(after - before)}, peak {mib(peak)}")
        # The trajectory tells a leak (steady growth) from a cache filling up (growth that levels off).
        marks = [sampler.median_between(name, t - 3, t + 3) for t in (elapsed * q / 8 for q in range(1, 9))]
        print(f"SOAK RSS {name} by eighths of the run: {', '.join(mib(m) for m in marks)}")

    assert not tally.errors, "\n".join(tally.errors[:20])
    assert total > WORKERS * 10, "too little traffic to call this a soak"
    assert load.num_running == load.num_waiting == load.kv_blocks_used == 0
    for name, grown in growth.items():
        assert grown < RSS_TOLERANCE_BYTES, f"{name} grew {mib(grown)} after the warm-up"
