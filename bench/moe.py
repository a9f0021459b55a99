"""One MoE layer's routed experts: the grouped-GEMM pipeline (kernels/fused_moe.py) against the torch loop.

Shapes come from a config.json (default: Qwen3-30B-A3B, 128 experts of 768, 8 a token, hidden 2048).
Routing is random (softmax over Gaussian logits), so at T tokens about min(E, T*k) experts are hit.
The pipeline is timed in a CUDA graph, as decode runs it; the torch loop syncs once per layer to learn
its experts, so it runs eagerly, timed with events. GB/s counts the weights of the experts hit (what a
decode step must read); TFLOP/s counts the routed pairs' two GEMMs. One layer's weights (1.2 GB for the
default) are far past the L2, so every call reads them from HBM.

--sweep also times a grid of GEMM configs (BLOCK_N, BLOCK_K, warps, stages) at a few token counts and
prints the best, to choose fused_moe.gemm_config from one GPU run.

    python bench/moe.py --out bench/results/moe.json [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
from cuda_timing import graph_seconds_per_call  # bench/cuda_timing.py, beside this script

from pagoda_engine.kernels.fused_moe import align_to_blocks, choose_block_m, fused_experts
from pagoda_engine.layers.moe import FusedMoE, route
from pagoda_engine.model_config import ModelConfig

GRAPH_CALLS, GRAPH_REPLAYS = 10, 10
EAGER_CALLS = 5
SWEEP = dict(BLOCK_N=(16, 32, 64), BLOCK_K=(64, 128), num_warps=(4,), num_stages=(3, 4))
SWEEP_TOKENS = (1, 16, 256, 4096)


def eager_seconds_per_call(call, calls: int = EAGER_CALLS) -> float:
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def bench_tokens(experts: FusedMoE, num_tokens: int, top_k: int, dtype: torch.dtype, torch_loop: bool) -> dict:
    hidden = experts.gate_up_proj.shape[2]
    num_experts, intermediate = experts.num_experts, experts.local_size
    x = torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
    weights, ids = route(torch.randn(num_tokens, num_experts, device="cuda"), top_k, renormalize=True)
    hit = torch.unique(ids).numel()
    weight_bytes = hit * 3 * intermediate * hidden * dtype.itemsize
    flops = 2 * num_tokens * top_k * 3 * intermediate * hidden
    block_m = choose_block_m(num_tokens * top_k, num_experts)
    fused = pipeline_us(experts, x, weights, ids) / 1e6
    align = graph_seconds_per_call([lambda: align_to_blocks(ids, num_experts, block_m)] * GRAPH_CALLS, GRAPH_REPLAYS)
    row = dict(tokens=num_tokens, experts_hit=hit, block_m=block_m, fused_us=round(fused * 1e6, 1),
               align_us=round(align * 1e6, 1), fused_gb_s=round(weight_bytes / fused / 1e9),
               fused_tflop_s=round(flops / fused / 1e12, 1))
    if torch_loop:
        loop = eager_seconds_per_call(lambda: experts.forward_torch(x, weights, ids))
        row.update(torch_us=round(loop * 1e6, 1), speedup=round(loop / fused, 1))
    return row


def pipeline_us(experts: FusedMoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                config: tuple[int, int, int, int] | None = None) -> float:
    """Microseconds per call of the whole pipeline, replayed from a CUDA graph."""
    def call() -> torch.Tensor:
        return fused_experts(x, experts.gate_up_proj, experts.down_proj, weights, ids, config=config)
    return graph_seconds_per_call([call] * GRAPH_CALLS, GRAPH_REPLAYS) * 1e6


def sweep(experts: FusedMoE, top_k: int, dtype: torch.dtype, tokens: tuple[int, ...]) -> list[dict]:
    """Each config of the grid at each token count, both GEMMs taking the same config."""
    hidden, num_experts = experts.gate_up_proj.shape[2], experts.num_experts
    rows = []
    for num_tokens in tokens:
        x = torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
        weights, ids = route(torch.randn(num_tokens, num_experts, device="cuda"), top_k, renormalize=True)
        timed = [(pipeline_us(experts, x, weights, ids, values), dict(zip(SWEEP, values, strict=True)))
                 for values in itertools.product(*SWEEP.values())]
        default = pipeline_us(experts, x, weights, ids)
        best_us, best = min(timed, key=lambda t: t[0])
        rows.append(dict(tokens=num_tokens, default_us=round(default, 1), best_us=round(best_us, 1), best=best,
                         all=[dict(us=round(us, 1), **c) for us, c in timed]))
        print(f"sweep T={num_tokens:>5}: default {default:7.1f} us, best {best_us:7.1f} us with {best}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).parent / "configs" / "qwen3-30b-a3b"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096, 16384])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--torch-loop-max-tokens", type=int, default=1024,
                        help="time the torch loop up to this many tokens (it is slow past them)")
    parser.add_argument("--sweep", action="store_true", help="also time the GEMM config grid and print the best")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    args = parser.parse_args()
    config = ModelConfig.from_dir(args.model)
    moe = config.moe
    if moe is None:
        parser.error(f"{args.model} is not a mixture of experts")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device("cuda"):
        experts = FusedMoE(config.hidden_size, moe.num_experts, moe.intermediate_size).to(dtype)
    for param in (experts.gate_up_proj, experts.down_proj):
        param.data.normal_(0.0, 0.02)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}; "
          f"{moe.num_experts} experts of {moe.intermediate_size}, top {moe.top_k}, hidden {config.hidden_size}")
    print("|      T | hit | BLOCK_M | fused us | align us |  GB/s | TFLOP/s | torch loop us | speed-up |")
    print("|--------|-----|---------|----------|----------|-------|---------|---------------|----------|")
    rows = []
    with torch.inference_mode():
        for num_tokens in args.tokens:
            row = bench_tokens(experts, num_tokens, moe.top_k, dtype, num_tokens <= args.torch_loop_max_tokens)
            rows.append(row)
            loop = (f"{row['torch_us']:>13.1f} | {row['speedup']:>7.1f}x" if "torch_us" in row
                    else f"{'-':>13} | {'-':>8}")
            print(f"| {num_tokens:>6} | {row['experts_hit']:>3} | {row['block_m']:>7} | {row['fused_us']:>8.1f} | "
                  f"{row['align_us']:>8.1f} | {row['fused_gb_s']:>5} | {row['fused_tflop_s']:>7.1f} | {loop} |",
                  flush=True)
        swept = sweep(experts, moe.top_k, dtype, SWEEP_TOKENS) if args.sweep else None
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  dtype=args.dtype, model=args.model, rows=rows, sweep=swept)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
