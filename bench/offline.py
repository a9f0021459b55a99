"""Offline throughput on nano-vllm's bench.py workload, plus batch-1 decode latency.

The workload is nano-vllm's exactly: ``random.seed(0)``; 256 sequences; prompt lengths and max_tokens
each ``randint(100, 1024)``; prompt ids ``randint(0, 10000)``; ``ignore_eos``; temperature 0.6.
Throughput = total max_tokens / wall time (133,966 tokens for the default workload).

    python bench/offline.py --model bench/configs/qwen3-0.6b --load-format dummy --out bench/results/offline.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from random import randint, seed

import torch

from pagoda_engine import LLM, SamplingParams
from pagoda_engine.kernels.compile_watch import triton_compiles


def workload(num_seqs: int, min_len: int, max_input_len: int, max_output_len: int):
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(min_len, max_input_len))] for _ in range(num_seqs)]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(min_len, max_output_len))
        for _ in range(num_seqs)
    ]
    return prompts, params


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_throughput(llm: LLM, args) -> dict:
    prompts, params = workload(args.num_seqs, args.min_len, args.max_input_len, args.max_output_len)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8))  # warm-up
    sync()
    with triton_compiles() as compiled:
        start = time.perf_counter()
        llm.generate(prompts, params)
        sync()
        elapsed = time.perf_counter() - start
    if compiled:
        print(f"Triton compiled {len(compiled)} kernel(s) during the timed run: {', '.join(compiled)}")
    output_tokens = sum(p.max_tokens for p in params)
    return {
        "num_seqs": args.num_seqs,
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": output_tokens,
        "seconds": round(elapsed, 3),
        "output_tokens_per_s": round(output_tokens / elapsed, 1),
        "kernels_compiled_while_timed": compiled,
    }


def measure_decode_latency(llm: LLM, args) -> dict:
    """Batch-1 greedy decode of ``--latency-tokens`` tokens after a short prompt: ms per output token."""
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.latency_tokens)
    llm.generate([[1] * 32], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8))
    sync()
    out = llm.generate([[5] * 32], params)[0]
    decode_seconds = out.latency - out.time_to_first_token
    return {
        "tokens": args.latency_tokens,
        "ms_per_token": round(1000 * decode_seconds / (args.latency_tokens - 1), 3),
        "ttft_ms": round(1000 * out.time_to_first_token, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).parent / "configs" / "qwen3-0.6b"))
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--batch-invariant", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--latency-tokens", type=int, default=256)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "offline.json"))
    args = parser.parse_args()

    llm = LLM(
        args.model, load_format=args.load_format, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
        batch_invariant=args.batch_invariant, kv_cache_dtype=args.kv_cache_dtype,
    )
    engine = llm.engine
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": str(engine.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(engine.runner.kv_cache_dtype).removeprefix("torch."),
        "attention_backend": engine.runner.backend_name,
        "cuda_graphs": engine.runner.graphs is not None,
        "batch_invariant": args.batch_invariant,
        "tensor_parallel_size": args.tensor_parallel_size,
        "kv_blocks": engine.block_manager.num_blocks,
        "throughput": measure_throughput(llm, args),
    }
    if not args.skip_latency:
        result["decode_latency"] = measure_decode_latency(llm, args)
    llm.close()
    t = result["throughput"]
    print(f"| {'model':<28} | {'seqs':>5} | {'out tokens':>10} | {'time s':>7} | {'tok/s':>9} | {'b=1 ms/tok':>10} |")
    print(f"|{'-' * 30}|{'-' * 7}|{'-' * 12}|{'-' * 9}|{'-' * 11}|{'-' * 12}|")
    latency = result.get("decode_latency", {}).get("ms_per_token", float("nan"))
    print(f"| {Path(args.model).name:<28} | {t['num_seqs']:>5} | {t['output_tokens']:>10} | {t['seconds']:>7.2f} "
          f"| {t['output_tokens_per_s']:>9.0f} | {latency:>10.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
