"""Micro-benchmark of the sampler's seeded draw: the torch path against the fused Triton kernel.

The offline benchmark's case: temperature 0.6, no filters, Qwen's vocabulary (151,936), batches of 1,
64 and 256 rows. The torch path divides by the temperature, builds ``random_noise`` [B, V] and takes
the argmax (what ``sampler.sample`` does without Triton); the fused kernel does all three in one pass
over the logits. Times are milliseconds per draw from CUDA events, the median of several repeats:
"eager" launches from Python as the sampler does, "graph" replays a captured CUDA graph (GPU time only,
no launch overhead). "agree" is the fraction of rows where both paths chose the same token.

    python bench/sampling.py                      # table, and JSON to bench/results/sampling.json
    python bench/sampling.py --sweep              # also time other block / warp / split settings
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import triton

from pagoda_engine.kernels import sampling
from pagoda_engine.layers.sampler import random_noise

VOCAB = 151_936
TEMPERATURE = 0.6


def gpu_ms(fn: Callable[[], object], graph: bool, iters: int = 20, repeats: int = 7) -> float:
    """Median milliseconds per call of ``fn`` (``iters`` calls per timed repeat)."""
    for _ in range(3):  # compile and warm the allocator outside the timing (and the capture)
        fn()
    torch.cuda.synchronize()
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(iters):
                fn()
        run = captured.replay
    else:

        def run() -> None:
            for _ in range(iters):
                fn()

    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def make_inputs(batch: int, vocab: int):
    g = torch.Generator(device="cuda").manual_seed(batch)
    logits = torch.randn(batch, vocab, device="cuda", generator=g) * 3.0
    seeds = torch.randint(0, 2**62, (batch,), device="cuda", generator=g)
    positions = torch.randint(0, 1024, (batch,), device="cuda", generator=g)
    temperature = torch.full((batch,), TEMPERATURE, device="cuda")
    return logits, seeds, positions, temperature


def torch_draw(logits, seeds, positions, temperature) -> torch.Tensor:
    scaled = logits / temperature.unsqueeze(1)
    return random_noise(seeds, positions, logits.shape[1]).add_(scaled).argmax(dim=-1)


def measure(batch: int, vocab: int) -> dict:
    inputs = make_inputs(batch, vocab)
    agree = (torch_draw(*inputs) == sampling.gumbel_argmax(*inputs)).float().mean().item()
    torch_ms = gpu_ms(lambda: torch_draw(*inputs), graph=False)
    fused_ms = gpu_ms(lambda: sampling.gumbel_argmax(*inputs), graph=False)
    return {
        "batch": batch,
        "vocab": vocab,
        "torch_ms": round(torch_ms, 4),
        "torch_graph_ms": round(gpu_ms(lambda: torch_draw(*inputs), graph=True), 4),
        "fused_ms": round(fused_ms, 4),
        "fused_graph_ms": round(gpu_ms(lambda: sampling.gumbel_argmax(*inputs), graph=True), 4),
        "speedup": round(torch_ms / fused_ms, 1),
        "agree": agree,
    }


def sweep(batch: int, vocab: int) -> list[dict]:
    """Graph times of the kernel over block sizes, warps and row splits (the defaults marked)."""
    inputs = make_inputs(batch, vocab)
    rows = []
    for block in (512, 1024, 2048, 4096):
        for num_warps in (4, 8):
            default = sampling._default_num_splits(batch, vocab, block, inputs[0].device)
            splits = sorted({1, 2, 4, 8, 16, 32, 64, 128, default} & set(range(1, triton.cdiv(vocab, block) + 1)))
            for num_splits in splits:
                ms = gpu_ms(lambda b=block, w=num_warps, s=num_splits: sampling.gumbel_argmax(
                    *inputs, num_splits=s, block=b, num_warps=w), graph=True)
                rows.append({"batch": batch, "block": block, "num_warps": num_warps, "num_splits": num_splits,
                             "default_splits": num_splits == default, "graph_ms": round(ms, 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--sweep", action="store_true", help="also time other kernel settings")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling.json"))
    args = parser.parse_args()

    results = [measure(b, args.vocab) for b in args.batches]
    print(f"{torch.cuda.get_device_name()}  V={args.vocab}  temperature={TEMPERATURE}  "
          f"(defaults: block {sampling.BLOCK}, {sampling.NUM_WARPS} warps)")
    print(f"{'B':>5} {'torch ms':>10} {'(graph)':>9} {'fused ms':>10} {'(graph)':>9} {'speedup':>8} {'agree':>7}")
    for r in results:
        print(f"{r['batch']:>5} {r['torch_ms']:>10.4f} {r['torch_graph_ms']:>9.4f} {r['fused_ms']:>10.4f} "
              f"{r['fused_graph_ms']:>9.4f} {r['speedup']:>7.1f}x {r['agree']:>7.4f}")

    sweeps = []
    if args.sweep:
        for b in args.batches:
            rows = sorted(sweep(b, args.vocab), key=lambda r: r["graph_ms"])
            sweeps += rows
            print(f"\nB={b}: fastest settings (graph ms); '*' marks the default split count")
            for r in rows[:5] + [r for r in rows if r["default_splits"] and r["block"] == sampling.BLOCK
                                 and r["num_warps"] == sampling.NUM_WARPS]:
                mark = "*" if r["default_splits"] else " "
                print(f"  block {r['block']:>5}  warps {r['num_warps']}  splits {r['num_splits']:>4}{mark} "
                      f"{r['graph_ms']:.4f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "temperature": TEMPERATURE,
        "defaults": {"block": sampling.BLOCK, "num_warps": sampling.NUM_WARPS},
        "results": results,
        "sweep": sweeps,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
