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

``--launch`` starts ``python -m pagoda_engine`` on a free loopback port with the flags after ``--``,
waits for it to report SERVING, runs the benchmark and stops it.

``--front DIR`` (with ``--launch``) then starts the tokenizer service in front of that engine, with the
tokenizer files of DIR (tokenizer.json, tokenizer_config.json), and runs the same workload through it
as text: each prompt's ids decoded to a string, sent to ``pagoda.v1.Tokenizer/Generate`` without special
tokens. It reports that run beside the engine's, their throughput ratio, and the front's CPU time per
output token (from /proc), so the front's overhead is measured in the same invocation.

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
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterable, Callable
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


async def run_workload(send: Sender, prompt_lens: list[int], rate: float, concurrency: int | None) -> tuple[
        list[RequestResult], float, float]:
    """Send every request (Poisson arrivals at ``rate``, at most ``concurrency`` in flight).

    Returns the results, the wall time and this process's CPU time over the run: a client that spends
    most of the wall time on the CPU measures itself rather than the server.
    """
    limit = asyncio.Semaphore(concurrency or len(prompt_lens))
    arrivals = random.Random(0)
    progress = Progress(len(prompt_lens))

    async def one(i: int) -> RequestResult:
        async with limit:
            result = await measure(send, i, prompt_lens[i])
        progress.advance()
        return result

    start, cpu_start = time.perf_counter(), time.process_time()
    tasks = []
    for i in range(len(prompt_lens)):
        if i and math.isfinite(rate):
            await asyncio.sleep(arrivals.expovariate(rate))
        tasks.append(asyncio.create_task(one(i)))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start, time.process_time() - cpu_start


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


# One short request before each run, so it does not pay for lazy initialisation.
WARMUP = SamplingParams(max_tokens=8, ignore_eos=True)


async def benchmark(args: argparse.Namespace, target: str) -> dict:
    prompts, params = workload(args.num_seqs, args.min_len, args.max_input_len, args.max_output_len)
    async with channel_to(target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        info = await stub.GetModelInfo(engine_pb2.GetModelInfoRequest(), timeout=30)
        await measure(engine_sender(stub, [prompts[0]], [WARMUP]), 0, len(prompts[0]))
        results, seconds, cpu = await run_workload(engine_sender(stub, prompts, params), [len(p) for p in prompts],
                                                   args.request_rate, args.concurrency)
    return {
        "target": target,
        "model": info.model_name,
        "device": info.device,
        "dtype": info.dtype,
        "kv_blocks": info.num_kv_blocks,
        # JSON has no infinity: a rate of null means every request at once.
        "mode": {"num_seqs": args.num_seqs, "request_rate": args.request_rate if math.isfinite(args.request_rate)
                 else None, "concurrency": args.concurrency},
        **summarize(results, seconds, cpu),
    }


async def benchmark_front(args: argparse.Namespace, front: subprocess.Popen, target: str) -> dict:
    """The workload as text through the tokenizer service at ``target``; adds the front's CPU time."""
    from tokenizers import Tokenizer

    prompts, params = workload(args.num_seqs, args.min_len, args.max_input_len, args.max_output_len)
    tokenizer = Tokenizer.from_file(str(Path(args.front).expanduser() / "tokenizer.json"))
    texts = tokenizer.decode_batch(prompts, skip_special_tokens=True)
    async with channel_to(target) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        await measure(front_sender(stub, [texts[0]], [WARMUP]), 0, 0)
        cpu_before = cpu_seconds(front.pid)
        results, seconds, client_cpu = await run_workload(front_sender(stub, texts, params), [0] * len(texts),
                                                          args.request_rate, args.concurrency)
        cpu = cpu_seconds(front.pid) - cpu_before
    summary = summarize(results, seconds, client_cpu)
    return {"target": target, "tokenizer": str(args.front), **summary, "front_cpu_seconds": round(cpu, 3),
            "front_cpu_us_per_output_token": round(1e6 * cpu / max(summary["output_tokens"], 1), 2)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, service_args: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    """Start ``python -m module`` on a free loopback port and wait until it reports SERVING."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", module, *service_args, "--host", "127.0.0.1",
                                "--port", str(port)])
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):  # not listening yet
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == serving:
                    return process, target
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{module} did not start serving within {timeout:.0f} s")


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
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    parser.add_argument("--concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving.json"))
    return parser.parse_args(argv), engine_args


def main() -> None:
    args, engine_args = parse_args()
    if args.front and not args.launch:
        raise SystemExit("--front needs --launch (it starts the tokenizer service in front of that engine)")
    engine = front = None
    target = args.target
    try:
        if args.launch:
            engine, target = launch("pagoda_engine", engine_args, args.launch_timeout)
        result = asyncio.run(benchmark(args, target))
        rows = {"engine": result}
        if args.front:
            front, front_target = launch("pagoda_tokenizer", ["--model", str(Path(args.front).expanduser()),
                                                              "--engines", target], args.launch_timeout)
            result["front"] = rows["front"] = asyncio.run(benchmark_front(args, front, front_target))
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
