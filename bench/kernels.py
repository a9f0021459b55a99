"""Attention kernel micro-benchmarks: paged decode bandwidth (the number that matters) and prefill.

Decode attention reads every sequence's whole K/V context once per step, so its figure of merit is
achieved bandwidth: bytes of K/V read / kernel time, compared with the device-to-device copy bandwidth
(3.01 TB/s measured on the target H100; torch's own copy_ is measured here too). Shapes are
Qwen3-0.6B's: 16 query heads, 8 KV heads, head_dim 128, bf16, 16-token blocks, scattered over the cache
as a running server leaves them.

Timing: each measurement captures many calls in one CUDA graph and times replays with CUDA events, so
host launch overhead is excluded (the engine replays graphs too). Calls rotate over enough copies of
the data to overflow the 50 MB L2, so small shapes are not flattered by cache hits. Torch SDPA on dense
(unpaged) K/V of the same shapes is timed the same way for reference.

    python bench/kernels.py --out bench/results/kernels.json            # the table
    python bench/kernels.py --sweep                                     # also tile configs and split counts
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from cuda_timing import graph_seconds_per_call  # bench/cuda_timing.py, beside this script

from pagoda_engine.kernels import decode_attention as decode_attention_module
from pagoda_engine.kernels.decode_attention import (
    decode_attention,
    longest_first,
    plan_splits,
    target_programs_per_sm,
)
from pagoda_engine.kernels.prefill_attention import prefill_attention
from pagoda_engine.kernels.sm_count import num_sms

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 16, 8, 128, 16, torch.bfloat16
ROTATE_BYTES = 256 * 2**20  # 5x the H100's L2
# The device-to-device copy bandwidth measured on the target H100 (ARCHITECTURE.md); percentages are of this.
# The copy measured here with torch's copy_ is printed too, for comparison.
REFERENCE_GBS = 3010.0
# The length bound of the default engine's CUDA graphs (max_model_len of the offline benchmark).
GRAPH_BOUND = 4096
PIECE_SIZES = (64, 128, 256, 512)
DECODE_CONFIGS = [(64, 2, 3), (64, 4, 3), (64, 4, 2), (32, 4, 2), (32, 2, 3), (32, 1, 3), (16, 1, 3), (128, 4, 2)]
# An fp8 tile holds half the bytes of a bf16 one: the fp8 sweep adds one-warp programs and deeper pipelines.
FP8_DECODE_CONFIGS = [(32, 1, 5), (32, 1, 3), (32, 1, 8), (16, 1, 5), (64, 2, 5), (64, 2, 3), (64, 4, 3), (128, 4, 5)]
PREFILL_CONFIGS = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 2)]


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: (read + write bytes) / time."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = graph_seconds_per_call([lambda: dst.copy_(src)] * 10)
    return 2 * src.numel() / seconds / 1e9


def num_copies(nbytes: int, cap: int = 128) -> int:
    return max(1, min(cap, math.ceil(ROTATE_BYTES / nbytes)))


class PagedDecode:
    """``copies`` independent batches of ``batch`` sequences of ``context`` tokens in one paged pool;
    ``lengths`` (each at most ``context``) makes the contexts ragged."""

    def __init__(self, batch: int, context: int, lengths: list[int] | None = None,
                 cache_dtype: torch.dtype = DTYPE):
        self.batch, self.context = batch, context
        tokens = sum(lengths) if lengths else batch * context
        self.kv_bytes = 2 * tokens * NUM_KV_HEADS * HEAD_DIM * cache_dtype.itemsize
        self.copies = num_copies(self.kv_bytes)
        blocks_per_seq = context // BLOCK_SIZE
        num_blocks = self.copies * batch * blocks_per_seq
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.k_cache = torch.randn(shape, dtype=DTYPE, device="cuda").to(cache_dtype)
        self.v_cache = torch.randn(shape, dtype=DTYPE, device="cuda").to(cache_dtype)
        perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
        self.tables = perm.view(self.copies, batch, blocks_per_seq)
        self.seq_lens = (torch.tensor(lengths, dtype=torch.int32, device="cuda") if lengths
                         else torch.full((batch,), context, dtype=torch.int32, device="cuda"))
        self.q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        self.out = torch.empty_like(self.q)

    def seconds(self, num_splits: int | None = None, config: tuple[int, int, int] | None = None,
                batch_invariant: bool = False, bound: int | None = None, batch_order: bool = False) -> float:
        """``bound`` is the length bound passed to the kernel (the runner's CUDA graphs pass max_model_len);
        the grid visits rows longest first, sorted once outside the timing as the runner does per step, or
        in batch order."""
        order = (torch.arange(self.batch, dtype=torch.int32, device="cuda") if batch_order
                 else longest_first(self.seq_lens))

        def call(i: int) -> Callable[[], object]:
            return lambda: decode_attention(self.q, self.k_cache, self.v_cache, self.tables[i], self.seq_lens,
                                            HEAD_DIM**-0.5, bound or self.context, self.out, batch_invariant,
                                            order, num_splits, config)
        return graph_seconds_per_call([call(i % self.copies) for i in range(max(self.copies, 20))])


def dense_sdpa_seconds(batch: int, context: int) -> float | str:
    """Torch SDPA decode on dense [B, kv_heads, context, dim] K/V (GQA without copying K/V)."""
    shape = (batch, NUM_KV_HEADS, context, HEAD_DIM)
    copies = num_copies(2 * math.prod(shape) * 2)
    ks = [torch.randn(shape, dtype=DTYPE, device="cuda") for _ in range(copies)]
    vs = [torch.randn(shape, dtype=DTYPE, device="cuda") for _ in range(copies)]
    q = torch.randn(batch, NUM_HEADS, 1, HEAD_DIM, dtype=DTYPE, device="cuda")

    def call(i: int) -> Callable[[], object]:
        return lambda: F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)
    try:
        return graph_seconds_per_call([call(i % copies) for i in range(max(copies, 20))])
    except Exception as error:  # a backend that refuses GQA or capture: report, don't abort the table
        return f"{type(error).__name__}: {error}"[:120]


def decode_table(batches: list[int], contexts: list[int], copy_gbs: float) -> list[dict]:
    """Both split policies (throughput, the default, and batch-invariant), and dense SDPA for reference."""
    rows = []
    print(f"\ndecode attention: {NUM_HEADS} q heads, {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, {DTYPE}, "
          f"block {BLOCK_SIZE}; % is of {REFERENCE_GBS:.0f} GB/s (torch copy_ here: {copy_gbs:.0f} GB/s)")
    print("  thr = the default throughput splits; inv = batch_invariant=True; graph = the same policy with the")
    print(f"  {GRAPH_BOUND}-token bound a CUDA graph passes (a grid sized for it), as the engine runs decode")
    columns = [("B", 5), ("ctx", 6)]
    for policy in ("thr", "inv"):
        columns += [("splits", 6), (f"{policy} us", 8), ("GB/s", 6), ("%", 5), ("graph us", 8)]
    columns += [("sdpa us", 8), ("GB/s", 6)]
    print(" ".join(f"{name:>{width}}" for name, width in columns))
    sm_count = num_sms(torch.device("cuda"))
    for batch in batches:
        for context in contexts:
            bench = PagedDecode(batch, context)
            row: dict = {"batch": batch, "context": context, "kv_bytes": bench.kv_bytes}
            cells = [f"{batch:>5}", f"{context:>6}"]
            for policy, invariant in (("throughput", False), ("invariant", True)):
                splits = plan_splits(batch, NUM_KV_HEADS, context, sm_count, invariant).num_splits
                seconds = bench.seconds(batch_invariant=invariant)
                graph = bench.seconds(batch_invariant=invariant, bound=max(GRAPH_BOUND, context))
                gbs = bench.kv_bytes / seconds / 1e9
                pct = 100 * gbs / REFERENCE_GBS
                row[policy] = {"num_splits": splits, "us": round(seconds * 1e6, 2), "gbs": round(gbs, 1),
                               "pct_of_copy": round(pct, 1), "graph_bound_us": round(graph * 1e6, 2)}
                cells += [f"{splits:>6}", f"{seconds * 1e6:>8.1f}", f"{gbs:>6.0f}", f"{pct:>5.1f}",
                          f"{graph * 1e6:>8.1f}"]
            sdpa = dense_sdpa_seconds(batch, context)
            if isinstance(sdpa, float):
                row["sdpa"] = {"us": round(sdpa * 1e6, 2), "gbs": round(bench.kv_bytes / sdpa / 1e9, 1)}
                cells += [f"{sdpa * 1e6:>8.1f}", f"{bench.kv_bytes / sdpa / 1e9:>6.0f}"]
            else:
                row["sdpa"] = {"error": sdpa}
                cells.append(f"  {sdpa[:40]}")
            print(" ".join(cells), flush=True)
            rows.append(row)
            del bench
            torch.cuda.empty_cache()
    return rows


def fp8_decode_table(batches: list[int], contexts: list[int]) -> list[dict]:
    """Decode over a float8 e4m3 cache (EngineConfig.kv_cache_dtype="fp8") against the bf16 cache, both
    under the graph bound; GB/s counts the fp8 bytes, so equal GB/s would mean twice the speed."""
    print(f"\ndecode attention over an fp8 cache ({GRAPH_BOUND}-token bound), us per call (K/V GB/s)")
    rows = []
    for batch in batches:
        for context in contexts:
            row: dict = {"batch": batch, "context": context}
            for name, cache_dtype in (("bf16", DTYPE), ("fp8", torch.float8_e4m3fn)):
                bench = PagedDecode(batch, context, cache_dtype=cache_dtype)
                seconds = bench.seconds(bound=max(GRAPH_BOUND, context))
                row[name] = {"us": round(seconds * 1e6, 2), "gbs": round(bench.kv_bytes / seconds / 1e9, 1)}
                del bench
                torch.cuda.empty_cache()
            print(f"  B={batch:<4} ctx={context:<5}  bf16 {row['bf16']['us']:8.1f} us ({row['bf16']['gbs']:5.0f})"
                  f"   fp8 {row['fp8']['us']:8.1f} us ({row['fp8']['gbs']:5.0f})   "
                  f"{row['bf16']['us'] / row['fp8']['us']:.2f}x", flush=True)
            rows.append(row)
    return rows


def ragged_table(rounds: int = 5, cache_dtype: torch.dtype = DTYPE) -> list[dict]:
    """Contexts of 100-1,024 tokens in random order, as the offline workload's first decode steps have them:
    an unsplit sequence's program is as long as its context, so the grid visits the longest first. At 256
    sequences the same contexts also run in batch order, and evened out at their mean (the same bytes).

    Cases alternate over ``rounds`` rounds and each cell is the median: measured once each in a fixed
    order, whichever case came first read up to 10% slower (147-162 us across calls, fifth session)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 1025, (256,), generator=generator).tolist()
    mean = round(sum(lengths) / len(lengths))
    cases = [(f"B={batch}", lengths[:batch], False) for batch in (256, 128, 64, 32)]
    cases += [("B=256 batch order", lengths, True), (f"B=256 all at {mean}", [mean] * 256, False)]
    policies = (("throughput", False), ("invariant", True))
    benches = [PagedDecode(len(case), 1024, case, cache_dtype) for _, case, _ in cases]
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        for i, (_, _, batch_order) in enumerate(cases):
            for policy, invariant in policies:
                seconds = benches[i].seconds(batch_invariant=invariant, bound=GRAPH_BOUND, batch_order=batch_order)
                times.setdefault((i, policy), []).append(seconds)
    print(f"\nragged decode over a {'float8 e4m3' if cache_dtype.itemsize == 1 else 'bf16'} cache: contexts 100-1024, "
          f"{GRAPH_BOUND}-token bound, us per call (GB/s), median of {rounds} rounds [min-max]")
    sm_count = num_sms(torch.device("cuda"))
    rows = []
    for i, (label, case, _) in enumerate(cases):
        row: dict = {"case": label, "batch": len(case), "kv_bytes": benches[i].kv_bytes}
        cells = []
        for policy, invariant in policies:
            splits = plan_splits(len(case), NUM_KV_HEADS, GRAPH_BOUND, sm_count, invariant,
                                 programs_per_sm=target_programs_per_sm(cache_dtype)).num_splits
            runs = times[(i, policy)]
            seconds = statistics.median(runs)
            gbs = benches[i].kv_bytes / seconds / 1e9
            row[policy] = {"num_splits": splits, "us": round(seconds * 1e6, 2), "gbs": round(gbs, 1),
                           "us_runs": [round(t * 1e6, 2) for t in runs]}
            cells.append(f"{policy} {splits:>2} splits {seconds * 1e6:7.1f} us ({gbs:4.0f}) "
                         f"[{min(runs) * 1e6:.1f}-{max(runs) * 1e6:.1f}]")
        print(f"  {label:<20} " + "   ".join(cells), flush=True)
        rows.append(row)
    del benches
    torch.cuda.empty_cache()
    return rows


def decode_sweep(cache_dtype: torch.dtype = DTYPE) -> list[dict]:
    """Tile configs at the throughput policy's split count, then split counts around it. GB/s count the
    cache's own bytes (an fp8 cache's are half of bf16's), and us per call is printed beside them."""
    rows = []
    fp8 = cache_dtype == torch.float8_e4m3fn
    print(f"\ndecode sweep over a {'float8 e4m3' if fp8 else 'bf16'} cache: (BLOCK_N, warps, stages) and split "
          "counts, GB/s")
    for batch, context in [(1, 8192), (32, 4096), (32, 8192), (256, 1024), (256, 4096)]:
        bench = PagedDecode(batch, context, cache_dtype=cache_dtype)
        default = plan_splits(batch, NUM_KV_HEADS, context, num_sms(torch.device("cuda")), False,
                              programs_per_sm=target_programs_per_sm(cache_dtype)).num_splits
        for config in FP8_DECODE_CONFIGS if fp8 else DECODE_CONFIGS:
            seconds = bench.seconds(config=config, batch_invariant=False)
            gbs = bench.kv_bytes / seconds / 1e9
            rows.append({"batch": batch, "context": context, "config": config, "num_splits": default,
                         "cache_dtype": str(cache_dtype), "gbs": round(gbs, 1), "us": round(seconds * 1e6, 2)})
            print(f"  B={batch:<4} ctx={context:<5} config={config} splits={default:<3} {gbs:7.0f} GB/s "
                  f"{seconds * 1e6:8.1f} us", flush=True)
        for splits in sorted({max(1, default // 2), default * 2, default * 4} - {default}):
            gbs = bench.kv_bytes / bench.seconds(num_splits=splits) / 1e9
            rows.append({"batch": batch, "context": context, "config": None, "num_splits": splits,
                         "gbs": round(gbs, 1)})
            print(f"  B={batch:<4} ctx={context:<5} config=default      splits={splits:<3} {gbs:7.0f} GB/s", flush=True)
        del bench
        torch.cuda.empty_cache()
    return rows


def piece_sweep() -> list[dict]:
    """Each policy's smallest piece against batch and context, under the graph's length bound: small pieces
    spread one sequence over more SMs, but add partials to write and reduce."""
    rows = []
    for policy, invariant, knob in (("throughput", False, "THROUGHPUT_MIN_TOKENS"),
                                    ("invariant", True, "MIN_TOKENS_PER_SPLIT")):
        default = getattr(decode_attention_module, knob)
        print(f"\ndecode piece sweep: {policy} policy ({knob}, now {default}), {GRAPH_BOUND}-token bound, us per call")
        print(f"  {'B':>4} {'ctx':>5} " + " ".join(f"{f'min {m}':>9}" for m in PIECE_SIZES))
        try:
            for batch in (1, 8, 32, 256):
                for context in (256, 1024, 4096):
                    bench = PagedDecode(batch, context)
                    row: dict = {"policy": policy, "batch": batch, "context": context}
                    for min_tokens in PIECE_SIZES:
                        setattr(decode_attention_module, knob, min_tokens)
                        row[min_tokens] = round(bench.seconds(batch_invariant=invariant, bound=GRAPH_BOUND) * 1e6, 2)
                    print(f"  {batch:>4} {context:>5} " + " ".join(f"{row[m]:>9.1f}" for m in PIECE_SIZES),
                          flush=True)
                    rows.append(row)
                    del bench
                    torch.cuda.empty_cache()
        finally:
            setattr(decode_attention_module, knob, default)
    return rows


def prefill_case(seqs: list[tuple[int, int]]) -> dict:
    """(context_len, query_len) per sequence, contiguous blocks; returns inputs for both implementations."""
    query_lens = [n for _, n in seqs]
    seq_lens = [c + n for c, n in seqs]
    blocks = [-(-s // BLOCK_SIZE) for s in seq_lens]
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    first = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.arange(first, first + n)
        first += n
    shape = (first, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    tokens = sum(query_lens)
    cu = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device="cuda")
    flops = sum(4 * NUM_HEADS * HEAD_DIM * (n * c + n * (n + 1) / 2) for c, n in seqs)
    return dict(
        q=torch.randn(tokens, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
        k=torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
        v=torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
        k_cache=torch.randn(shape, dtype=DTYPE, device="cuda"), v_cache=torch.randn(shape, dtype=DTYPE, device="cuda"),
        tables=tables.cuda(), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), cu=cu,
        max_q=max(query_lens), max_k=max(seq_lens), fresh=all(c == 0 for c, _ in seqs), flops=flops,
    )


def prefill_call(c: dict, out: torch.Tensor, num_seqs: int, config: tuple | None) -> Callable[[], object]:
    return lambda: prefill_attention(c["q"], c["k_cache"], c["v_cache"], out, c["tables"], c["seq_lens"], c["cu"],
                                     0, num_seqs, c["max_q"], HEAD_DIM**-0.5, config)


def prefill_table(sweep: bool) -> list[dict]:
    rows = []
    cases = {
        "16 x 512 fresh": [(0, 512)] * 16,
        "4 x 2048 fresh": [(0, 2048)] * 4,
        "8 x 512 after 3584 cached": [(3584, 512)] * 8,
        "64 x 128 ragged prefix": [(i * 37, 128) for i in range(64)],
    }
    print("\nprefill attention (causal; TFLOP/s counts only unmasked work)")
    for name, seqs in cases.items():
        c = prefill_case(seqs)
        out = torch.empty_like(c["q"])
        for config in PREFILL_CONFIGS if sweep else [None]:
            seconds = graph_seconds_per_call([prefill_call(c, out, len(seqs), config)] * 10)
            rows.append({"case": name, "impl": "triton", "config": config, "us": round(seconds * 1e6, 1),
                         "tflops": round(c["flops"] / seconds / 1e12, 1)})
            print(f"  {name:<28} triton {str(config or 'default'):<18} {seconds * 1e6:9.1f} us "
                  f"{c['flops'] / seconds / 1e12:6.1f} TFLOP/s", flush=True)
        if c["fresh"]:
            rows.append(varlen_row(name, c))
    return rows


def varlen_row(name: str, c: dict) -> dict:
    try:
        from torch.nn.attention.varlen import varlen_attn

        seconds = graph_seconds_per_call([lambda: varlen_attn(c["q"], c["k"], c["v"], c["cu"], c["cu"], c["max_q"],
                                                              c["max_q"], window_size=(-1, 0))] * 10)
    except Exception as error:
        print(f"  {name:<28} varlen_attn failed: {error}")
        return {"case": name, "impl": "varlen_attn", "error": str(error)[:200]}
    print(f"  {name:<28} varlen_attn (FA2, unpaged)  {seconds * 1e6:9.1f} us "
          f"{c['flops'] / seconds / 1e12:6.1f} TFLOP/s", flush=True)
    return {"case": name, "impl": "varlen_attn", "us": round(seconds * 1e6, 1),
            "tflops": round(c["flops"] / seconds / 1e12, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/kernels.json")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--context", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--sweep", action="store_true", help="also sweep decode/prefill tile configs and splits")
    parser.add_argument("--pieces", action="store_true", help="also sweep each split policy's smallest piece")
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="also time decode over a float8 e4m3 KV cache")
    args = parser.parse_args()

    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
        "shape": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                  "block_size": BLOCK_SIZE, "dtype": str(DTYPE)},
        "reference_copy_gbs": REFERENCE_GBS,
        "torch_copy_gbs": round(copy_gbs, 1),
        "decode": decode_table(args.batch, args.context, copy_gbs),
        "ragged_decode": ragged_table(),
    }
    if args.fp8:
        result["fp8_decode"] = fp8_decode_table(args.batch, args.context)
        result["fp8_ragged_decode"] = ragged_table(cache_dtype=torch.float8_e4m3fn)
    if args.sweep:
        result["decode_sweep"] = decode_sweep()
        if args.fp8:
            result["fp8_decode_sweep"] = decode_sweep(torch.float8_e4m3fn)
    if args.pieces:
        result["piece_sweep"] = piece_sweep()
    if not args.no_prefill:
        result["prefill"] = prefill_table(args.sweep)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
