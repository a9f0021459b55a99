"""Decode-sized linear layers: F.linear (cuBLAS) vs the skinny-GEMM Triton kernel, inside CUDA graphs.

Shapes are a model's four projections and its LM head (default: Qwen3-0.6B: qkv 1024->4096, o
2048->1024, gate_up 1024->6144, down 3072->1024, lm_head 1024->151936) at M tokens per call. Each call
reads a different copy of the weight, cycling through enough copies to overflow the L2, so every call
pays for reading its weight from HBM as a decode step does. GB/s is weight bytes over the graph time.

--sweep also times a grid of kernel configs (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per
shape and prints the best, to choose skinny_gemm.default_config from one GPU run.

    python bench/linear.py --out bench/results/linear.json [--sweep]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from cuda_timing import graph_seconds_per_call  # bench/cuda_timing.py, beside this script

from pagoda_engine.kernels import skinny_gemm

GRAPH_CALLS, GRAPH_REPLAYS = 40, 20  # 800 calls: a few ms, so that ~5 us kernels time within a few %
ROTATE_BYTES = 256 * 2**20  # several times the H200's 50 MB L2
SWEEP = dict(BLOCK_N=(16, 32, 64), BLOCK_K=(128, 256, 512), SPLIT_K=(1, 2, 4), num_warps=(4, 8), num_stages=(3,))


def projections(config: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of every linear layer of one decoder layer, and of the LM head."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", hidden // heads)
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
            "gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate),
            "lm_head": (config["vocab_size"], hidden)}


def time_graph(call: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    """Microseconds per call, replayed from a CUDA graph of GRAPH_CALLS calls over the rotating weights."""
    calls = [functools.partial(call, weights[i % len(weights)]) for i in range(GRAPH_CALLS)]
    return 1e6 * graph_seconds_per_call(calls, GRAPH_REPLAYS)


def sweep_configs(m: int, k: int) -> list[dict[str, int]]:
    """The grid, less configs that waste a split or would spill the M = 1 path's [BLOCK_N, BLOCK_K] sums."""
    configs = []
    for values in itertools.product(*SWEEP.values()):
        config = dict(zip(SWEEP, values, strict=True))
        if k // config["SPLIT_K"] < config["BLOCK_K"]:
            continue
        if m == 1 and config["BLOCK_N"] * config["BLOCK_K"] > 64 * 32 * config["num_warps"]:
            continue
        configs.append(config)
    return configs


def bench_shape(name: str, n: int, k: int, m: int, dtype: torch.dtype, sweep: bool) -> dict:
    copies = max(1, -(-ROTATE_BYTES // (n * k * dtype.itemsize)))
    weights = [torch.randn(n, k, dtype=dtype, device="cuda") for _ in range(copies)]
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    row = dict(proj=name, n=n, k=k, m=m, weight_mb=round(n * k * dtype.itemsize / 1e6, 2),
               f_linear_us=time_graph(lambda w: torch.nn.functional.linear(x, w), weights),
               triton_us=time_graph(lambda w: skinny_gemm.skinny_gemm(x, w), weights),
               config=skinny_gemm.default_config(m, n, k))
    if sweep:
        timed = [(time_graph(lambda w, c=c: skinny_gemm.skinny_gemm(x, w, config=c), weights), c)
                 for c in sweep_configs(m, k) if name != "lm_head" or c["SPLIT_K"] == 1]
        row["best_us"], row["best_config"] = min(timed, key=lambda t: t[0])
    del weights
    torch.cuda.empty_cache()
    return row


def print_row(row: dict) -> None:
    nbytes = row["weight_mb"] * 1e6

    def cell(us: float) -> str:
        return f"{us:>9.2f} | {nbytes / us / 1e3:>6.0f}"

    line = f"| {row['proj']:<8} | {row['m']:>2} | {cell(row['f_linear_us'])} | {cell(row['triton_us'])} |"
    if "best_us" in row:
        line += f" {cell(row['best_us'])} | {row['best_config']}"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).parent / "configs" / "qwen3-0.6b"),
                        help="directory holding the config.json whose shapes are measured")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true", help="also time the config grid and print the best")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "linear.json"))
    args = parser.parse_args()
    config = json.loads((Path(args.model) / "config.json").read_text())
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}")
    header = "| proj     |  M | cuBLAS us |   GB/s | triton us |   GB/s |"
    print(header + ("   best us |   GB/s | best config" if args.sweep else ""))
    rows = []
    with torch.inference_mode():
        for name, (n, k) in projections(config).items():
            for m in args.tokens:
                rows.append(bench_shape(name, n, k, m, dtype, args.sweep))
                print_row(rows[-1])
    for row in rows:
        for key in ("f_linear_us", "triton_us", "best_us"):
            if key in row:
                row[key] = round(row[key], 2)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  dtype=args.dtype, model=args.model, rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
