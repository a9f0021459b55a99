"""Paged decode attention with split-KV (flash-decoding), in Triton.

Decode is memory-bound: each step reads every sequence's whole K/V context once and does little math
on it. So the kernel is built around reading the cache once, at full bandwidth:

- one program per (sequence, KV head, KV split). It loads each K/V tile once and attends all the query
  heads of that KV head's group to it (GQA), padding the group up to 16 rows so ``tl.dot`` applies;
- the grid visits sequences longest context first (``longest_first``): an unsplit program lasts as long
  as its context, and with the long ones started first the short ones fill the last wave (the
  longest-processing-time rule). Offline +0.9% on the H200. The kernel benchmark's ragged table is too
  noisy to size the gain (bench/RESULTS.md, fifth session);
- a sequence's context is cut into ``num_splits`` contiguous pieces so that a few long sequences still
  spread over all SMs. Each split keeps an online softmax in fp32 and writes its normalised partial
  output and log-sum-exp; a small reduce kernel combines the splits. With one split the first kernel
  writes the output directly and the reduce is skipped;
- the grid depends only on host ints (batch size, KV heads, an upper bound on the context length), and
  the piece each split covers is computed inside the kernel from the real length, so the launch is
  CUDA-graph capturable and never syncs with the host. Splits past a context's end return at once and
  the reduce reads only the pieces a context has: a CUDA graph sizes the grid for ``max_model_len``, and
  at 256 sequences of 512 tokens the empty splits had cost 65% on top of the real work (H200).

Two split policies (see ``plan_splits``), chosen by ``EngineConfig.batch_invariant``:

- throughput (the default, as in vLLM and SGLang): the split count follows the batch size so that the
  grid just fills the GPU (``choose_num_splits``): one sequence is cut into up to 64 pieces of at least
  ``THROUGHPUT_MIN_TOKENS``, 256 sequences run unsplit (no partials, no reduce). The count depends on
  the batch size rounded up to a power of two, which every CUDA-graph size pads to at most, so an eager
  step and the graph replaying the same batch agree bitwise; a sequence's output may change, by
  rounding, when its batch crosses a power of two;
- batch-invariant (``batch_invariant=True``, attention's part of vLLM's ``VLLM_BATCH_INVARIANT``): a
  sequence's pieces depend on its own length only (``INVARIANT_SPLITS`` pieces of at least
  ``MIN_TOKENS_PER_SPLIT`` tokens), and the reduce always sums ``INVARIANT_SPLITS`` slots. A sequence's
  output is then bitwise the same whatever batch it sits in and whatever bound the caller passes. Big
  batches pay for the splits: at 256 sequences of 1K tokens under the graph bound, 291 us per layer
  instead of 251 (H200, bench/kernels.py prints both policies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagoda_engine.kernels.fused_ops import tanh_from_exp
from pagoda_engine.kernels.kv_cache import fp16_over_fp8, load_paged_tile
from pagoda_engine.kernels.sm_count import num_sms
from pagoda_engine.layers.attention.metadata import longest_first

# The batch-invariant policy's smallest piece, a multiple of every BLOCK_N so that pieces hold whole
# tiles: 256 tokens amortise a piece's partial write and its share of the reduce at every batch size.
MIN_TOKENS_PER_SPLIT = 256
# The batch-invariant policy cuts every context into at most this many pieces: 32 x 256 tokens covers
# 8K contexts with 256-token pieces, enough programs for one long sequence to spread over the SMs.
INVARIANT_SPLITS = 32
# The throughput policy splits only batches too small to fill the GPU, where pieces of one tile win:
# one sequence of 1K tokens attends in 8.0 us per layer with 64-token pieces, 12.5 with 256 (H200).
THROUGHPUT_MIN_TOKENS = 64
MAX_SPLITS = 64
# Programs per SM the throughput policy aims at, rounded down so that 256 sequences x 8 KV heads stay
# unsplit. Batches of 33-128 sequences (416 of the offline workload's 1,024 decode steps) get 2-4 splits,
# where 4 per SM rounded up gave them 1-2: +1.8% offline on the H200 (bench/RESULTS.md, run J). 8 per SM
# (runs M, N) was better on ragged short contexts at 16-64 sequences but 3-6% slower on uniform 1-8K
# contexts at 32, and offline within the noise (+0.5%): kept at 16.
TARGET_PROGRAMS_PER_SM = 16
# Over an fp8 cache a program is one warp (``_default_config``, heads up to 128), and its single warp walks a 1K context
# at a fraction of the SM's bandwidth, so the longest contexts of a ragged batch set the kernel's time:
# 256 ragged contexts of 100-1,024 tokens took 150 us unsplit, 128 with 2 splits, 97.5 at their mean
# length (H200). 32 per SM cuts 256 sequences in two; offline 26,779 tok/s against 24,308 at 16 (one
# pair in one call, seventh session). Over bf16, 2 splits at 256 were slower (154.5 against 148.9 us).
FP8_TARGET_PROGRAMS_PER_SM = 32


def target_programs_per_sm(cache_dtype: torch.dtype, head_dim: int = 128) -> int:
    """The throughput policy's programs per SM: more where ``_default_config`` runs one-warp programs."""
    one_warp = _default_config(head_dim, torch.bfloat16, cache_dtype)[1] == 1
    return FP8_TARGET_PROGRAMS_PER_SM if one_warp else TARGET_PROGRAMS_PER_SM


def choose_num_splits(
    batch_size: int, num_kv_heads: int, sm_count: int, programs_per_sm: int = TARGET_PROGRAMS_PER_SM
) -> int:
    """Enough (sequence, KV head, split) programs to fill the GPU: the throughput policy's split count.

    The batch size is rounded up to a power of two first. A CUDA graph pads a batch to the next size of
    its ladder, which holds every power of two (cuda_graph.batch_size_ladder), so the padded size rounds
    to the same power: the eager step and the graph replaying it pick one count and agree bitwise.
    Lengths do not enter: the kernel gives each context as many pieces as it has ``THROUGHPUT_MIN_TOKENS``.
    """
    programs = triton.next_power_of_2(batch_size) * num_kv_heads
    return max(1, min(programs_per_sm * sm_count // programs, MAX_SPLITS))


@dataclass(frozen=True)
class SplitPlan:
    """How the context of each sequence is cut: see the module docstring for the two policies."""

    num_splits: int  # the grid's split axis: an upper bound on any sequence's number of pieces
    divisor: int  # a piece holds cdiv(seq_len, divisor) tokens rounded up to whole tiles ...
    min_tokens: int  # ... but at least this many
    reduce_width: int  # slots the reduce kernel sums over (a power of two >= num_splits)


def plan_splits(
    batch_size: int, num_kv_heads: int, max_seq_len: int, sm_count: int, batch_invariant: bool,
    num_splits: int | None = None, programs_per_sm: int = TARGET_PROGRAMS_PER_SM,
) -> SplitPlan:
    """The split plan for one launch; ``num_splits`` forces a count (tests and the benchmark sweep).
    ``programs_per_sm`` is the throughput policy's target (``target_programs_per_sm``).

    The reduce's width is one per policy, not per count, so that no batch size compiles a variant of its
    own in the middle of serving.
    """
    if num_splits is not None:
        return SplitPlan(num_splits, num_splits, 0, triton.next_power_of_2(num_splits))
    if batch_invariant:
        grid = max(1, min(INVARIANT_SPLITS, -(-max_seq_len // MIN_TOKENS_PER_SPLIT)))
        return SplitPlan(grid, INVARIANT_SPLITS, MIN_TOKENS_PER_SPLIT, INVARIANT_SPLITS)
    num_splits = choose_num_splits(batch_size, num_kv_heads, sm_count, programs_per_sm)
    return SplitPlan(num_splits, num_splits, THROUGHPUT_MIN_TOKENS, MAX_SPLITS)


@triton.jit
def tokens_per_split(seq_len, split_divisor, split_min_tokens, BLOCK_N: tl.constexpr):
    """The length of each piece of a ``seq_len`` context: whole tiles, so only its last tile is partial."""
    per_split = tl.cdiv(tl.cdiv(seq_len, split_divisor), BLOCK_N) * BLOCK_N
    return tl.maximum(per_split, split_min_tokens)


@triton.jit
def visible_start(seq_len, WINDOW: tl.constexpr):
    """The first position the newest query sees: 0, or with a sliding window of WINDOW (> 0) the start of
    its last WINDOW positions. The pieces of a split cover the visible positions only."""
    start = seq_len * 0
    if WINDOW > 0:
        start = tl.maximum(seq_len - WINDOW, 0)
    return start


@triton.jit
def scaled_scores(qk, qk_scale, SOFTCAP: tl.constexpr):
    """q.k in log2 units (``qk_scale`` holds log2(e)); with SOFTCAP (> 0) capped first, as Gemma 2 does:
    cap * tanh(score / cap) of the natural-unit score is the same in log2 units with the cap in them too,
    which ``log2_softcap`` gives."""
    s = qk * qk_scale
    if SOFTCAP > 0:  # tanh without libdevice: the scores' rounding is far coarser than its last bits
        s = SOFTCAP * tanh_from_exp(s / SOFTCAP)
    return s


def log2_softcap(logit_softcap: float | None) -> float:
    """The kernels' SOFTCAP: the cap in log2 units, 0 for none."""
    return 0.0 if logit_softcap is None else logit_softcap * math.log2(math.e)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``tl.dot`` that stays exact for fp32 inputs (tests), instead of silently rounding them to tf32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def softmax_step(s, v, row_max, row_sum, acc, IEEE: tl.constexpr, EMPTY_ROWS: tl.constexpr = False):
    """One online-softmax update (scores ``s`` already in log2 units, masked entries at -inf).

    ``EMPTY_ROWS``: a row may have seen no key yet (a sliding window's rows start at different tiles), so its
    max is -inf; exp2(-inf - -inf) would be NaN, so such rows shift by 0 and stay at zero weight.
    """
    max_new = tl.maximum(row_max, tl.max(s, 1))
    shift = tl.where(max_new == float("-inf"), 0.0, max_new) if EMPTY_ROWS else max_new
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(row_max - shift)
    row_sum = row_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    return max_new, row_sum, acc


# Not specialised on the split count and divisor, which follow the batch size, or the block-table stride
# (eager steps build tables as wide as their longest context): one compile serves every batch.
@triton.jit(do_not_specialize=["num_splits", "split_divisor", "stride_bt"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, order_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, num_splits, split_divisor, split_min_tokens, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, FP16: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    seq = tl.load(order_ptr + tl.program_id(0)).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    first = visible_start(seq_len, WINDOW)
    per_split = tokens_per_split(seq_len - first, split_divisor, split_min_tokens, BLOCK_N)
    start = first + split * per_split
    # A split past the context's end (a short context in a grid sized for the longest) writes nothing:
    # the reduce reads only the pieces the context has. Under CUDA graphs most of the grid is such splits.
    if start >= seq_len:
        return
    end = tl.minimum(start + per_split, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_h
    mask_hd = (offs_h[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_hd, other=0.0)
    if FP16:  # an fp8 cache: see kv_cache.fp16_over_fp8
        q = q.to(tl.float16)

    row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    block_table_row = block_tables_ptr + seq * stride_bt
    for tile in range(start, end, BLOCK_N):
        pos = tile + offs_n
        valid = pos < end
        k = load_paged_tile(k_cache_ptr, block_table_row, pos, valid, kv_head,
                            stride_cache_block, stride_cache_slot, stride_cache_head,
                            offs_d, HEAD_DIM, BLOCK_D, PAGE, True).to(q.dtype)
        v = load_paged_tile(v_cache_ptr, block_table_row, pos, valid, kv_head,
                            stride_cache_block, stride_cache_slot, stride_cache_head,
                            offs_d, HEAD_DIM, BLOCK_D, PAGE, True).to(q.dtype)
        s = scaled_scores(dot(q, tl.trans(k), IEEE), qk_scale, SOFTCAP)
        s = tl.where(valid[None, :], s, float("-inf"))
        row_max, row_sum, acc = softmax_step(s, v, row_max, row_sum, acc, IEEE)

    acc = acc / row_sum[:, None]
    if SPLIT:
        lse = row_max + tl.log2(row_sum)
        # Partials are [batch, num_heads, num_splits] rows (of BLOCK_D floats for the output).
        row = (seq * num_heads + heads) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mask_hd)
        tl.store(part_lse_ptr + row, lse, mask=offs_h < GROUP)
    else:
        dst = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask_hd)


@triton.jit(do_not_specialize=["num_splits", "split_divisor"])
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, seq_lens_ptr, num_splits, split_divisor, split_min_tokens, num_heads,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    span = seq_len - visible_start(seq_len, WINDOW)
    num_pieces = tl.cdiv(span, tokens_per_split(span, split_divisor, split_min_tokens, BLOCK_N))
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_pieces
    row = (seq * num_heads + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + row, mask=mask_s, other=float("-inf"))
    # Every context has at least one token, so piece 0 exists and the max is finite.
    weight = tl.exp2(lse - tl.max(lse, 0))
    parts = tl.load(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :],
                    mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    result = tl.sum(weight[:, None] * parts, 0) / tl.sum(weight, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, result.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _default_config(head_dim: int, q_dtype: torch.dtype, cache_dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for the split kernel: small programs, many of them per SM.

    A program's loads are all the memory traffic it has in flight, so what decides the bandwidth is how
    many programs an SM holds at once (bench/RESULTS.md, seventh session, H200, `bench/kernels.py --sweep
    --fp8`):
    - a bf16 cache: 2 warps and 64-token tiles were at least as fast as 4 warps on every shape, and 7-14%
      faster from 8 to 128 sequences (4.4 TB/s at 256 sequences either way);
    - an fp8 cache: 4 warps held only ~48 KB of loads per SM (161 registers a thread, 3 programs) and read
      2.1 TB/s; one warp with 32-token tiles reads 3.0-3.3 TB/s from 64 sequences up (256 x 4K: 654 us
      against bf16's 975). It is slower only on short contexts of one sequence (1K: 10.4 against 7.7 us);
    - fp32 (the tests' oracle dtype) keeps 4 warps: its tiles are twice the registers of bf16's.
    Wider heads get shorter tiles for the same register reason.
    """
    if head_dim > 128:
        return 32, 4, 2
    if cache_dtype.itemsize == 1:
        return 32, 1, 5
    if q_dtype == torch.float32:
        return 64, 4, 3
    return 64, 2, 3


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    out: torch.Tensor,
    batch_invariant: bool = False,
    order: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: tuple[int, int, int] | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Attend ``q`` [B, num_heads, head_dim] (one token per sequence) over each sequence's paged context.

    ``seq_lens[i]`` counts the context including this step's token, whose K/V must already be stored.
    ``max_seq_len`` is any upper bound of ``seq_lens`` (the graph runner passes the model's maximum).
    ``out`` [B, num_heads, head_dim] is written in full. ``batch_invariant`` picks the split policy
    (module docstring). ``order`` is a permutation of the rows, the order the grid visits them in:
    ``longest_first(seq_lens)`` when None (the runner passes one computed once per step).
    ``num_splits``/``config`` override the heuristics (the benchmark sweeps them). With ``sliding_window``
    W each sequence attends its last W positions only; ``logit_softcap`` c caps scores at c * tanh(s / c).
    """
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    plan = plan_splits(batch, num_kv_heads, max_seq_len, num_sms(q.device), batch_invariant, num_splits,
                       target_programs_per_sm(k_cache.dtype, head_dim))
    num_splits = plan.num_splits
    block_n, num_warps, num_stages = config or _default_config(head_dim, q.dtype, k_cache.dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))
    split = num_splits > 1
    if order is None:
        order = longest_first(seq_lens)
    if split:
        part_out = torch.empty((batch, num_heads, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, order, out, part_out, part_lse,
        scale * math.log2(math.e), num_splits, plan.divisor, plan.min_tokens, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        SPLIT=split, IEEE=q.dtype == torch.float32, FP16=fp16_over_fp8(q, k_cache), WINDOW=sliding_window or 0,
        SOFTCAP=log2_softcap(logit_softcap), num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out, part_lse, out, seq_lens, num_splits, plan.divisor, plan.min_tokens, num_heads,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=plan.reduce_width, BLOCK_D=block_d, BLOCK_N=block_n,
            WINDOW=sliding_window or 0, num_warps=4,
        )
    return out
