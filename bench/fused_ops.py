"""RMSNorm+residual, per-head q/k norm with rotary, rotary and SiLU-and-mul: eager torch vs Triton vs torch.compile.

Shapes come from a model config (default: Qwen3-0.6B, hidden 1024, intermediate 3072, 16 q / 8 kv heads
of 128); T tokens per call. "torch.compile" compiles the layers' torch code (``forward_torch``) for each
static shape, its best case. Every op is timed twice with CUDA events:

  eager  back-to-back calls from Python: kernel time plus launch overhead (prefill, enforce-eager)
  graph  the same calls replayed from one CUDA graph: kernel time alone (decode steps run in graphs)

GB/s is each op's compulsory traffic (inputs read once, outputs written once) over its graph time.

    python bench/fused_ops.py --out bench/results/fused_ops.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from cuda_timing import graph_seconds_per_call  # bench/cuda_timing.py, beside this script

from pagoda_engine.kernels import fused_ops
from pagoda_engine.layers.activation import SiluAndMul
from pagoda_engine.layers.norm import RMSNorm
from pagoda_engine.layers.rotary import RotaryEmbedding

IMPLS = ("eager", "triton", "compile")
EAGER_CALLS = 200
GRAPH_CALLS, GRAPH_REPLAYS = 50, 5


@dataclass
class Op:
    """One op at one size: a zero-argument call per implementation, and the bytes it must move."""

    name: str
    calls: dict[str, Callable[[], object]]
    nbytes: int


def make_ops(config: dict, tokens: int, dtype: torch.dtype) -> list[Op]:
    # Each size compiles every torch function afresh; without a reset Dynamo's per-function recompile limit
    # would quietly fall back to eager.
    torch._dynamo.reset()
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", hidden // heads)
    eps, size = config["rms_norm_eps"], dtype.itemsize
    with torch.device("cuda"):
        norm = RMSNorm(hidden, eps).to(dtype)
        q_norm, k_norm = RMSNorm(head_dim, eps).to(dtype), RMSNorm(head_dim, eps).to(dtype)
        rope = RotaryEmbedding(head_dim, config["max_position_embeddings"], config["rope_theta"])
        x, residual = torch.randn(2, tokens, hidden, dtype=dtype)
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
        positions = torch.randint(0, 4096, (tokens,))
        gate_up = torch.randn(tokens, 2 * intermediate, dtype=dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    act = SiluAndMul()

    def qk_norm_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Qwen3's order with the torch layers: each head normalised, then rotated."""
        q = q_norm.forward_torch(q.unflatten(-1, (heads, head_dim))).flatten(1)
        k = k_norm.forward_torch(k.unflatten(-1, (kv_heads, head_dim))).flatten(1)
        return rope.forward_torch(positions, q, k)

    def compiled(fn):
        return torch.compile(fn, dynamic=False)

    compiled_qk_norm_rotary = compiled(qk_norm_rotary)
    compiled_norm, compiled_rope, compiled_act = (
        compiled(norm.forward_torch), compiled(rope.forward_torch), compiled(act.forward_torch))
    qk_elements = tokens * (heads + kv_heads) * head_dim
    return [
        Op("rms_norm+residual", {
            "eager": lambda: norm.forward_torch(x, residual),
            "triton": lambda: fused_ops.rms_norm(x, norm.weight, eps, residual),
            "compile": lambda: compiled_norm(x, residual),
        }, nbytes=4 * tokens * hidden * size),
        Op("qk_norm+rotary", {
            "eager": lambda: qk_norm_rotary(positions, q, k),
            "triton": lambda: fused_ops.rotary_embedding_(positions, q, k, rope.cos_cache, rope.sin_cache,
                                                          (q_norm.weight, k_norm.weight), eps),
            "compile": lambda: compiled_qk_norm_rotary(positions, q, k),
        }, nbytes=2 * qk_elements * size + tokens * head_dim * 4),
        # Triton rotates in place; the torch code returns new tensors. Either way q, k are read and written once.
        Op("rotary", {
            "eager": lambda: rope.forward_torch(positions, q, k),
            "triton": lambda: fused_ops.rotary_embedding_(positions, q, k, rope.cos_cache, rope.sin_cache),
            "compile": lambda: compiled_rope(positions, q, k),
        }, nbytes=2 * qk_elements * size + tokens * head_dim * 4),
        Op("silu_and_mul", {
            "eager": lambda: act.forward_torch(gate_up),
            "triton": lambda: fused_ops.silu_and_mul(gate_up),
            "compile": lambda: compiled_act(gate_up),
        }, nbytes=3 * tokens * intermediate * size),
    ]


def time_eager(fn: Callable[[], object]) -> float:
    """Microseconds per call, calls issued back to back from Python."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(EAGER_CALLS):
        fn()
    end.record()
    end.synchronize()
    return 1000 * start.elapsed_time(end) / EAGER_CALLS


def time_graph(fn: Callable[[], object]) -> float:
    """Microseconds per call, replayed from a CUDA graph holding GRAPH_CALLS calls."""
    return 1e6 * graph_seconds_per_call([fn] * GRAPH_CALLS, GRAPH_REPLAYS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).parent / "configs" / "qwen3-0.6b"),
                        help="directory holding the config.json whose shapes are measured")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 256, 16384])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fused_ops.json"))
    args = parser.parse_args()
    config = json.loads((Path(args.model) / "config.json").read_text())
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}")
    print(f"| {'op':<18} | {'T':>5} | {'impl':<7} | {'eager us':>8} | {'graph us':>8} | {'GB/s':>6} |")
    print(f"|{'-' * 20}|{'-' * 7}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    with torch.inference_mode():
        for tokens in args.tokens:
            for op in make_ops(config, tokens, dtype):
                for impl in args.impls:
                    fn = op.calls[impl]
                    for _ in range(3):  # compiles (Triton, Inductor) and warms the allocator
                        fn()
                    torch.cuda.synchronize()
                    eager_us, graph_us = time_eager(fn), time_graph(fn)
                    gbps = op.nbytes / graph_us / 1e3
                    rows.append(dict(op=op.name, tokens=tokens, impl=impl, eager_us=round(eager_us, 2),
                                     graph_us=round(graph_us, 2), gb_per_s=round(gbps, 1)))
                    print(f"| {op.name:<18} | {tokens:>5} | {impl:<7} | {eager_us:>8.2f} | {graph_us:>8.2f} "
                          f"| {gbps:>6.0f} |")
                torch.cuda.empty_cache()

    summary = {}
    if {"triton", "compile"} <= set(args.impls):
        # Geometric mean over every op and size of compile time / triton time: above 1, Triton is faster.
        for mode in ("eager_us", "graph_us"):
            by_key = {(r["op"], r["tokens"], r["impl"]): r[mode] for r in rows}
            ratios = [by_key[(op, t, "compile")] / by_key[(op, t, "triton")]
                      for op, t, impl in by_key if impl == "triton"]
            summary[f"compile_over_triton_{mode}"] = round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3)
        print("compile time / triton time, geometric mean:", summary)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  dtype=args.dtype, model=args.model, rows=rows, summary=summary)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
