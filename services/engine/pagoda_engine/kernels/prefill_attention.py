"""Causal varlen prefill over the paged KV cache, in Triton.

Each prefill sequence brings ``query_len`` new tokens, the last ``query_len`` of its ``seq_len``
positions; the earlier ``seq_len - query_len`` (a prefix-cache hit, or the chunks already prefilled)
sit in the cache. This step's K/V is stored first, so the kernel reads the whole context through the
block table and never needs to know which tokens are new.

One program per (sequence, tile of BLOCK_M queries, query head). Its keys split in two runs:
positions below the tile's first query are visible to every row and need no mask (the bulk of the
work with long prefixes), and the few tiles on the diagonal are masked causally. With a sliding window
there is one run, every tile masked, from the first row's window on; a later row may then meet tiles
that hold none of its keys, which the softmax step allows for (``EMPTY_ROWS``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pagoda_engine.kernels.decode_attention import dot, log2_softcap, scaled_scores, softmax_step
from pagoda_engine.kernels.kv_cache import fp16_over_fp8, load_paged_tile


@triton.jit
def _attend_keys(
    q, row_max, row_sum, acc, key_start, key_end, q_pos, seq_len, qk_scale,
    k_cache_ptr, v_cache_ptr, block_table_row, kv_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Fold keys [key_start, key_end) into the running softmax; CAUSAL masks key > query and key >= seq_len,
    and with a sliding window (WINDOW > 0) key <= query - WINDOW too."""
    offs_n = tl.arange(0, BLOCK_N)
    for tile in range(key_start, key_end, BLOCK_N):
        pos = tile + offs_n
        valid = pos < seq_len
        k = load_paged_tile(k_cache_ptr, block_table_row, pos, valid, kv_head,
                            stride_cache_block, stride_cache_slot, stride_cache_head,
                            offs_d, HEAD_DIM, BLOCK_D, PAGE, CAUSAL).to(q.dtype)
        v = load_paged_tile(v_cache_ptr, block_table_row, pos, valid, kv_head,
                            stride_cache_block, stride_cache_slot, stride_cache_head,
                            offs_d, HEAD_DIM, BLOCK_D, PAGE, CAUSAL).to(q.dtype)
        s = scaled_scores(dot(q, tl.trans(k), IEEE), qk_scale, SOFTCAP)
        if CAUSAL:
            seen = (pos[None, :] <= q_pos[:, None]) & valid[None, :]
            if WINDOW > 0:
                seen = seen & (pos[None, :] > q_pos[:, None] - WINDOW)
            s = tl.where(seen, s, float("-inf"))
        row_max, row_sum, acc = softmax_step(s, v, row_max, row_sum, acc, IEEE, WINDOW > 0)
    return row_max, row_sum, acc


# Not specialised on first_seq or the block-table stride (as wide as the step's longest context), which
# change from step to step: one compile serves every batch.
@triton.jit(do_not_specialize=["first_seq", "stride_bt"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    first_seq, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, FP16: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    seq = (first_seq + tl.program_id(0)).to(tl.int64)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    m_start = tl.program_id(1) * BLOCK_M
    if m_start >= query_len:  # the grid covers the longest query; shorter sequences stop here
        return
    head = tl.program_id(2)
    kv_head = head // GROUP
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_md = (offs_m[:, None] < query_len) & (offs_d[None, :] < HEAD_DIM)
    tokens = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=mask_md, other=0.0)
    if FP16:  # an fp8 cache: see kv_cache.fp16_over_fp8
        q = q.to(tl.float16)
    q_pos = context_len + offs_m

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    block_table_row = block_tables_ptr + seq * stride_bt
    # Whole key tiles before the tile's first query position: every row sees them all.
    unmasked_end = (context_len + m_start) // BLOCK_N * BLOCK_N
    # The diagonal: up to the last row's own position (padded rows past query_len included, harmlessly).
    causal_end = tl.minimum(context_len + m_start + BLOCK_M, seq_len)
    paged = (k_cache_ptr, v_cache_ptr, block_table_row, kv_head, stride_cache_block, stride_cache_slot,
             stride_cache_head, offs_d)
    if WINDOW > 0:
        # Keys from the first row's window on, all masked: the window's lower edge moves along the rows.
        window_start = tl.maximum(context_len + m_start - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        row_max, row_sum, acc = _attend_keys(q, row_max, row_sum, acc, window_start, causal_end, q_pos, seq_len,
                                             qk_scale, *paged, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, IEEE, WINDOW,
                                             SOFTCAP)
    else:
        row_max, row_sum, acc = _attend_keys(q, row_max, row_sum, acc, 0, unmasked_end, q_pos, seq_len, qk_scale,
                                             *paged, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, False, IEEE, 0, SOFTCAP)
        row_max, row_sum, acc = _attend_keys(q, row_max, row_sum, acc, unmasked_end, causal_end, q_pos, seq_len,
                                             qk_scale, *paged, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, IEEE, 0, SOFTCAP)
    # Every real row saw at least its own key, so row_sum > 0 there; padded rows are not stored.
    acc = acc / row_sum[:, None]
    dst = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask_md)


def _default_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).

    128x128 tiles measured best on the H100 across fresh, prefix-hit and ragged batches (bench/kernels.py
    --sweep); fp32 tiles take twice the shared memory, and wider heads get smaller tiles for the same reason.
    """
    if dtype == torch.float32:
        return 32, 32, 4, 2
    if head_dim <= 128:
        return 128, 128, 8, 3
    return 64, 32, 4, 2


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    first_seq: int,
    num_seqs: int,
    max_query_len: int,
    scale: float,
    config: tuple[int, int, int, int] | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention for sequences ``first_seq .. first_seq + num_seqs - 1`` of the flat batch.

    ``q``/``out`` are [num_tokens, num_heads, head_dim] for the whole batch (rows are found through
    ``query_start_loc``); only these sequences' rows of ``out`` are written. Their K/V, including this
    step's, must already be in the cache. ``max_query_len`` bounds every query length (it sizes the grid).
    With ``sliding_window`` W a query sees its last W positions only; ``logit_softcap`` c caps scores at
    c * tanh(s / c).
    """
    if num_seqs == 0:
        return out
    num_heads, head_dim = q.shape[1:]
    group = num_heads // k_cache.shape[2]
    block_m, block_n, num_warps, num_stages = config or _default_config(head_dim, q.dtype)
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        first_seq, scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IEEE=q.dtype == torch.float32, FP16=fp16_over_fp8(q, k_cache), WINDOW=sliding_window or 0,
        SOFTCAP=log2_softcap(logit_softcap), num_warps=num_warps, num_stages=num_stages,
    )
    return out
