"""Serving benchmark: the offline benchmark's workload streamed over gRPC, with latency percentiles.

The workload is bench/offline.py's ``workload()`` (nano-vllm's: 256 prompts of random ids, ignore_eos),
sent all at once (default), at a Poisson rate (``--request-rate``), or at a fixed concurrency
(``--concurrency``; both together cap a Poisson stream). Throughput is generated tokens received per
second of wall time from the first request sent to the last stream closed, so it is comparable with
the offline number. TTFT, inter-token latency (ITL) and end-to-end latency are measured at the client.

    python bench/serving.py --target 127.0.0.1:50051
    python bench/serving.py --request-rate 20
    python bench/serving.py --concurrency 1 --num-seqs 16          # one stream at a time: ITL
    python bench/serving.py --launch -- --model bench/configs/qwen3-0.6b --load-format dummy --max-model-len 4096

``--clients N`` shares the workload out over N client processes, each with its own connection (request
i goes to client i mod N), all starting at the same moment. One Python client tops out near 20,000
messages a second, about what the engine sends: with one client the benchmark can measure itself.

``--launch`` starts ``python -m pagoda_engine`` on a free loopback port with the flags after ``--``,
waits for it to report SERVING, runs the benchmark and stops it.

``--front DIR`` (with ``--launch``) then starts the tokenizer service in front of that engine, with the
tokenizer files of DIR (tokenizer.json, tokenizer_config.json), and runs the same workload through it
as text: each prompt's ids decoded to a string, sent to ``pagoda.v1.Tokenizer/Generate`` without special
tokens. It reports that run beside the engine's, their throughput ratio, and the front's CPU time per
output token (from /proc, its workers included), so the front's overhead is measured in the same
invocation. With ``--launch``, both runs also report the CPU the engine service's gRPC server process
spent per output token (its engine core, a child process, not counted): the server must keep up too.

    python bench/serving.py --launch --front ~/.cache/pagoda/models/SmolLM2-135M-Instruct \
        -- --model bench/configs/qwen3-0.6b --load-format dummy --max-model-len 4096

The measuring side reads only ``token_ids``, ``usage`` and ``finish_reason``, which both services'
responses share; each target has its own sender (``engine_sender``, ``front_sender``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
import typing
from collections.abc import AsyncIterable, Callable
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from offline import workload  # bench/offline.py, beside this script

from pagoda.v1 import engine_pb2, engine_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from pagoda_engine import SamplingParams

# Sends request i of the workload and returns its response stream.
Sender = Callable[[int], AsyncIterable]


@dataclasses.dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int = 0
    messages: int = 0
    ttft: float | None = None
    itls: list[float] = dataclasses.field(default_factory=list)
    latency: float | None = None
    error: str | None = None


class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int, width: int = 40):
        self.total, self.width, self.done = total, width, 0
        self.start = self.last_draw = time.perf_counter()

    def advance(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last_draw >= 0.1 or self.done == self.total:
            self.last_draw = now
            filled = self.width * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} requests "
                             f"{now - self.start:6.1f} s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def to_proto(params: SamplingParams) -> engine_pb2.SamplingParams:
    # The wire fields carry the engine's names; None means "unset" on both sides.
    return engine_pb2.SamplingParams(**{k: v for k, v in dataclasses.asdict(params).items() if v is not None})


def engine_sender(stub: engine_pb2_grpc.EngineStub, prompts: list[list[int]], params: list[SamplingParams]) -> Sender:
    def send(i: int) -> AsyncIterable:
        request = engine_pb2.GenerateRequest(prompt_token_ids=prompts[i], sampling_params=to_proto(params[i]))
        return stub.Generate(request)

    return send


def front_sender(stub: tokenizer_pb2_grpc.TokenizerStub, texts: list[str], params: list[SamplingParams]) -> Sender:
    def send(i: int) -> AsyncIterable:
        request = tokenizer_pb2.TextGenerateRequest(prompt=texts[i], sampling_params=to_proto(params[i]),
                                                    add_special_tokens=False)
        return stub.Generate(request)

    return send


async def measure(send: Sender, i: int, prompt_tokens: int) -> RequestResult:
    """Stream request i to its end, timing every message's tokens."""
    result = RequestResult(prompt_tokens)
    start = last = time.perf_counter()
    try:
        async for message in send(i):
            now = time.perf_counter()
            result.messages += 1
            if message.token_ids:
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    # A message holding k tokens spreads its gap over them, as the server's metrics do.
                    result.itls += [(now - last) / len(message.token_ids)] * len(message.token_ids)
                result.output_tokens += len(message.token_ids)
                last = now
            if message.usage.prompt_tokens:  # the final message: the prompt as the server tokenized it
                result.prompt_tokens = message.usage.prompt_tokens
    except grpc.aio.AioRpcError as error:
        result.error = error.code().name
        return result
    result.latency = time.perf_counter() - start
    return result


@dataclasses.dataclass
class ClientJob:
    """One client process's share of the workload: requests ``indices`` of the full list, sent to ``target``."""

    kind: str  # "engine" (token ids to pagoda.v1.Engine) or "front" (text to pagoda.v1.Tokenizer)
    target: str
    indices: list[int]
    prompts: list  # per index: token ids for the engine, text for the front
    params: list[SamplingParams]
    prompt_lens: list[int]
    arrivals: list[float]  # seconds after the common start at which each request is sent
    concurrency: int | None


@dataclasses.dataclass
class ClientReport:
    results: list[RequestResult]
    first_send: float  # time.time() of the first request and of the last stream's end
    last_end: float
    cpu_seconds: float  # this process's CPU time over the run


def sender_for(job: ClientJob, channel: grpc.aio.Channel) -> Sender:
    if job.kind == "engine":
        return engine_sender(engine_pb2_grpc.EngineStub(channel), job.prompts, job.params)
    return front_sender(tokenizer_pb2_grpc.TokenizerStub(channel), job.prompts, job.params)


async def warm_up(job: ClientJob, channel: grpc.aio.Channel) -> None:
    """One short request first, so the run does not pay for lazy initialisation on either side. Its prompt is
    none of the workload's: the prefix cache would otherwise serve that request's prefill in the run."""
    prompt = [1, 2, 3] if job.kind == "engine" else "Warm-up."
    send = sender_for(dataclasses.replace(job, prompts=[prompt], params=[WARMUP]), channel)
    await measure(send, 0, 0)


async def run_client(job: ClientJob, channel: grpc.aio.Channel, start_at: float, done: Callable[[], None]
                     ) -> ClientReport:
    """Send the job's requests at their arrival times (at most ``concurrency`` in flight) and time them."""
    limit = asyncio.Semaphore(job.concurrency or len(job.indices))
    send = sender_for(job, channel)
    ends: list[float] = []

    async def one(slot: int) -> RequestResult:
        await asyncio.sleep(max(0.0, start_at + job.arrivals[slot] - time.time()))
        async with limit:
            result = await measure(send, slot, job.prompt_lens[slot])
        ends.append(time.time())
        done()
        return result

    await asyncio.sleep(max(0.0, start_at - time.time()))
    first_send, cpu_start = time.time(), time.process_time()
    results = await asyncio.gather(*(one(slot) for slot in range(len(job.indices))))
    return ClientReport(list(results), first_send, max(ends), time.process_time() - cpu_start)


def client_process(job: ClientJob, conn: Connection, counter: Synchronized) -> None:
    """A client process: warm up, say ready, wait for the start time, run, send the report back."""
    def done() -> None:
        with counter.get_lock():
            counter.value += 1

    async def main() -> ClientReport:
        async with channel_to(job.target) as channel:
            await warm_up(job, channel)
            conn.send("ready")
            return await run_client(job, channel, conn.recv(), done)

    conn.send(asyncio.run(main()))


def split_jobs(kind: str, target: str, prompts: list, params: list[SamplingParams], prompt_lens: list[int],
               args: argparse.Namespace) -> list[ClientJob]:
    """Request i goes to client i mod clients; a Poisson schedule and the concurrency cap are shared out."""
    arrivals = random.Random(0)
    offsets, now = [], 0.0
    for i in range(len(prompts)):
        if i and math.isfinite(args.request_rate):
            now += arrivals.expovariate(args.request_rate)
        offsets.append(now)
    jobs = []
    for k in range(args.clients):
        indices = list(range(k, len(prompts), args.clients))
        concurrency = None if args.concurrency is None else max(1, args.concurrency // args.clients)
        jobs.append(ClientJob(kind, target, indices, [prompts[i] for i in indices], [params[i] for i in indices],
                              [prompt_lens[i] for i in indices], [offsets[i] for i in indices], concurrency))
    return jobs


def run_workload(jobs: list[ClientJob]) -> tuple[list[RequestResult], float, float]:
    """Run every job, each in its own client process (in this one when there is one job).

    Returns the results in workload order, the wall time from the first request sent to the last stream
    closed, and the clients' CPU time over the run: a client that spends most of the wall time on the CPU
    measures itself rather than the server.
    """
    total = sum(len(job.indices) for job in jobs)
    if len(jobs) == 1:
        progress = Progress(total)

        async def main() -> ClientReport:
            async with channel_to(jobs[0].target) as channel:
                await warm_up(jobs[0], channel)
                return await run_client(jobs[0], channel, time.time(), progress.advance)

        reports = [asyncio.run(main())]
    else:
        reports = run_client_processes(jobs, total)
    results: list[RequestResult | None] = [None] * total
    for job, report in zip(jobs, reports, strict=True):
        for i, result in zip(job.indices, report.results, strict=True):
            results[i] = result
    seconds = max(r.last_end for r in reports) - min(r.first_send for r in reports)
    return typing.cast(list[RequestResult], results), seconds, sum(r.cpu_seconds for r in reports)


def run_client_processes(jobs: list[ClientJob], total: int) -> list[ClientReport]:
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    pipes = [context.Pipe() for _ in jobs]
    processes = [context.Process(target=client_process, args=(job, child, counter), daemon=True)
                 for job, (_, child) in zip(jobs, pipes, strict=True)]
    for process in processes:
        process.start()
    for parent, _ in pipes:
        if parent.recv() != "ready":
            raise SystemExit("a client process failed to warm up")
    start_at = time.time() + 0.2  # every client sends its first request at the same moment
    for parent, _ in pipes:
        parent.send(start_at)
    progress = Progress(total)
    while progress.done < total:
        time.sleep(0.1)
        while progress.done < counter.value:
            progress.advance()
    reports = [parent.recv() for parent, _ in pipes]
    for process in processes:
        process.join()
    return reports


def percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        # Linear interpolation between the closest ranks (numpy's default).
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    stats = {"mean": sum(ordered) / len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}
    return {name: round(1000 * value, 3) for name, value in stats.items()}


def summarize(results: list[RequestResult], seconds: float, client_cpu_seconds: float) -> dict:
    done = [r for r in results if r.error is None]
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "requests": len(results),
        "completed": len(done),
        "errors": errors,
        "seconds": round(seconds, 3),
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / seconds, 1),
        "requests_per_s": round(len(done) / seconds, 3),
        "ttft_ms": percentiles_ms([r.ttft for r in done if r.ttft is not None]),
        "itl_ms": percentiles_ms([itl for r in done for itl in r.itls]),
        "e2e_ms": percentiles_ms([r.latency for r in done]),
        "messages": sum(r.messages for r in results),
        "client_cpu_seconds": round(client_cpu_seconds, 3),
        "client_cpu_us_per_message": round(1e6 * client_cpu_seconds / max(sum(r.messages for r in results), 1), 1),
    }


def channel_to(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])


# The warm-up request each client sends before the run.
WARMUP = SamplingParams(max_tokens=8, ignore_eos=True)


async def model_info(target: str) -> engine_pb2.ModelInfo:
    async with channel_to(target) as channel:
        return await engine_pb2_grpc.EngineStub(channel).GetModelInfo(engine_pb2.GetModelInfoRequest(), timeout=30)


def run_measuring_servers(jobs: list[ClientJob], servers: dict[str, Callable[[], float]]
                          ) -> tuple[list[RequestResult], float, float, dict[str, float]]:
    """``run_workload``, plus each server's CPU seconds over the run (``servers``: name -> CPU clock)."""
    before = {name: clock() for name, clock in servers.items()}
    results, seconds, client_cpu = run_workload(jobs)
    return results, seconds, client_cpu, {name: clock() - before[name] for name, clock in servers.items()}


def cpu_per_token(cpu: dict[str, float], output_tokens: int) -> dict:
    """The servers' CPU seconds, and microseconds of CPU per output token."""
    return {key: value for name, seconds in cpu.items() for key, value in (
        (f"{name}_cpu_seconds", round(seconds, 3)),
        (f"{name}_cpu_us_per_output_token", round(1e6 * seconds / max(output_tokens, 1), 2)))}


def benchmark(args: argparse.Namespace, target: str, engine_pid: int | None) -> dict:
    prompts, params = workload(args.num_seqs, args.min_len, args.max_input_len, args.max_output_len)
    info = asyncio.run(model_info(target))
    jobs = split_jobs("engine", target, prompts, params, [len(p) for p in prompts], args)
    results, seconds, cpu, servers = run_measuring_servers(jobs, engine_server_clock(engine_pid))
    summary = summarize(results, seconds, cpu)
    return {
        "target": target,
        "model": info.model_name,
        "device": info.device,
        "dtype": info.dtype,
        "kv_blocks": info.num_kv_blocks,
        # JSON has no infinity: a rate of null means every request at once.
        "mode": {"num_seqs": args.num_seqs, "request_rate": args.request_rate if math.isfinite(args.request_rate)
                 else None, "concurrency": args.concurrency, "clients": args.clients},
        **summary,
        **cpu_per_token(servers, summary["output_tokens"]),
    }


def engine_server_clock(engine_pid: int | None) -> dict[str, Callable[[], float]]:
    """The engine service's gRPC server process alone (its engine core is a child process), when launched."""
    return {} if engine_pid is None else {"engine_server": lambda: process_cpu_seconds(engine_pid)}


def benchmark_front(args: argparse.Namespace, front: subprocess.Popen, target: str, engine_pid: int | None) -> dict:
    """The workload as text through the tokenizer service at ``target``; adds the front's CPU time."""
    from tokenizers import Tokenizer

    prompts, params = workload(args.num_seqs, args.min_len, args.max_input_len, args.max_output_len)
    tokenizer = Tokenizer.from_file(str(Path(args.front).expanduser() / "tokenizer.json"))
    texts = tokenizer.decode_batch(prompts, skip_special_tokens=True)
    jobs = split_jobs("front", target, texts, params, [0] * len(texts), args)
    clocks = {"front": lambda: tree_cpu_seconds(front.pid), **engine_server_clock(engine_pid)}
    results, seconds, client_cpu, servers = run_measuring_servers(jobs, clocks)
    summary = summarize(results, seconds, client_cpu)
    return {"target": target, "tokenizer": str(args.front), **summary,
            **cpu_per_token(servers, summary["output_tokens"])}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """The same for a process and its live descendants (a front's workers)."""
    total = process_cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError):  # it just exited
                total += tree_cpu_seconds(int(child))
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, service_args: list[str], timeout: float, workers: int = 1) -> tuple[subprocess.Popen, str]:
    """Start ``python -m module`` on a free loopback port and wait until it serves: with ``workers``
    processes sharing the port, until every one has bound it and fresh connections, which the kernel
    spreads over them, all find it SERVING (else the first clients would all land on the first worker)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", module, *service_args, "--host", "127.0.0.1",
                                "--port", str(port)])
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if listening_sockets(port) >= workers and all(serving(target) for _ in range(4 * workers)):
            return process, target
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{module} did not start serving within {timeout:.0f} s")


def listening_sockets(port: int) -> int:
    """TCP sockets listening on ``port`` on this host (one per worker under SO_REUSEPORT; Linux)."""
    suffix = f":{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                count += local.endswith(suffix) and state == "0A"  # 0A: LISTEN
    return count


def serving(target: str) -> bool:
    """Health over a connection of its own, not one shared with earlier checks."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(target, options=options) as channel, contextlib.suppress(grpc.RpcError):
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return response.status == health_pb2.HealthCheckResponse.SERVING
    return False  # not listening yet


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def print_table(rows: dict[str, dict]) -> None:
    def row(*cells) -> str:
        return "| " + " | ".join(f"{c!s:>10}" for c in cells) + " |"

    print(row("target", "requests", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99",
              "tok/msg", "client CPU"))
    print("|" + "|".join("-" * 12 for _ in range(11)) + "|")
    for name, result in rows.items():
        t, i, e = result["ttft_ms"], result["itl_ms"], result["e2e_ms"]
        per_message = round(result["output_tokens"] / max(result["messages"], 1), 2)
        print(row(name, result["completed"], result["output_tokens_per_s"], t.get("p50"), t.get("p99"), i.get("p50"),
                  i.get("p99"), e.get("p50"), e.get("p99"), per_message,
                  f"{result['client_cpu_seconds'] / result['seconds']:.0%}"))
        if result["errors"]:
            print(f"{name} errors: {result['errors']}")


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    # Everything after "--" is for the launched engine.
    engine_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051", help="engine address (ignored with --launch)")
    parser.add_argument("--launch", action="store_true", help="start the engine with the flags after --")
    parser.add_argument("--launch-timeout", type=float, default=900.0)
    parser.add_argument("--front", metavar="DIR", help="with --launch: also through a tokenizer service using DIR's "
                        "tokenizer files")
    parser.add_argument("--front-workers", type=int, default=1, help="the tokenizer service's --workers")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    parser.add_argument("--concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--clients", type=int, default=1,
                        help="client processes sharing the workload, each with its own connection: one Python "
                        "client tops out near 20k messages/s, so fast servers need several")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving.json"))
    args = parser.parse_args(argv)
    if args.clients < 1 or (args.concurrency is not None and args.clients > args.concurrency):
        parser.error("--clients must be >= 1, and at most --concurrency")
    return args, engine_args


def main() -> None:
    args, engine_args = parse_args()
    if args.front and not args.launch:
        raise SystemExit("--front needs --launch (it starts the tokenizer service in front of that engine)")
    engine = front = None
    target = args.target
    try:
        if args.launch:
            engine, target = launch("pagoda_engine", engine_args, args.launch_timeout)
        engine_pid = engine.pid if engine is not None else None
        result = benchmark(args, target, engine_pid)
        rows = {"engine": result}
        if args.front:
            front, front_target = launch("pagoda_tokenizer", ["--model", str(Path(args.front).expanduser()),
                                                              "--engines", target, "--workers",
                                                              str(args.front_workers)], args.launch_timeout,
                                         workers=args.front_workers)
            result["front"] = rows["front"] = benchmark_front(args, front, front_target, engine_pid)
            result["front"]["throughput_vs_engine"] = round(
                result["front"]["output_tokens_per_s"] / result["output_tokens_per_s"], 3)
    finally:
        stop(front)
        stop(engine)
    if engine is not None:
        result["engine_args"] = engine_args
    print_table(rows)
    if args.front:
        f = result["front"]
        print(f"front: {f['throughput_vs_engine']:.1%} of the engine's throughput; "
              f"{f['front_cpu_us_per_output_token']} us of its CPU per output token")
    for name, run in rows.items():
        if "engine_server_cpu_us_per_output_token" in run:
            print(f"{name} run: the engine's gRPC server process spent {run['engine_server_cpu_us_per_output_token']} "
                  f"us of CPU per output token ({run['engine_server_cpu_seconds'] / run['seconds']:.0%} of a core)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
