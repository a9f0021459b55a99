"""The paged KV cache in Triton: storing a step's K/V, and loading a tile of a sequence's context.

Layout (see layers/attention/backend.py): ``cache[block, slot_in_block, kv_head, dim]``, so one token's
row for one KV head is ``head_dim`` contiguous elements. Position ``p`` of sequence ``i`` lives in block
``block_tables[i, p // block_size]`` at slot ``p % block_size``. Both attention kernels read the context
through ``load_paged_tile`` below, so the layout is spelt out in one place.

The cache holds the model's dtype, or float8 e4m3 (``EngineConfig.kv_cache_dtype``) with a scale of 1:
stores clamp to its finite range (+-448, which also has no infinity) and round to nearest even, as
torch's conversion does; loads return the stored type and the kernels widen tiles to the query's.
Over an fp8 cache a 16-bit query is cast to float16 first (``fp16_over_fp8``): e4m3 widens to float16
in one instruction per two elements, and to bfloat16 only through float32 (decode attention over fp8
with bfloat16 dots ran at 0.89-0.98x of a bf16 cache's speed, H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX: tl.constexpr = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)


@triton.jit
def load_paged_tile(
    cache_ptr, block_table_row, pos, valid, kv_head,
    stride_block, stride_slot, stride_head,
    offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, MASKED: tl.constexpr,
):
    """Rows ``pos`` ([BLOCK_N]) of one KV head's context as a [BLOCK_N, BLOCK_D] tile.

    ``MASKED`` is False for tiles known to lie wholly inside the context: skipping the mask there keeps
    the loads unpredicated. Positions outside ``valid`` and padded dims read as 0, never as stale cache
    memory, because 0 * NaN would poison the P @ V product.
    """
    if MASKED:
        block = tl.load(block_table_row + pos // PAGE, mask=valid, other=0).to(tl.int64)
    else:
        block = tl.load(block_table_row + pos // PAGE).to(tl.int64)
    rows = block * stride_block + (pos % PAGE).to(tl.int64) * stride_slot + kv_head * stride_head
    ptrs = cache_ptr + rows[:, None] + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:
        if MASKED:
            return tl.load(ptrs, mask=valid[:, None], other=0.0)
        return tl.load(ptrs)
    if MASKED:
        return tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # padding (CUDA-graph filler rows) owns no cache slot
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    dst = (slot // PAGE) * stride_cache_block + (slot % PAGE) * stride_cache_slot
    dst += offs_h[:, None] * stride_cache_head + offs_d[None, :]
    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if FP8:
        k = tl.clamp(k.to(tl.float32), -FP8_MAX, FP8_MAX)
        v = tl.clamp(v.to(tl.float32), -FP8_MAX, FP8_MAX)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def fp16_over_fp8(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the attention kernels run their dots in float16: a 16-bit query over an fp8 cache."""
    return k_cache.dtype == torch.float8_e4m3fn and q.dtype != torch.float32


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels assume unit stride along head_dim; q/k/v split from a fused qkv already have it."""
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write token ``t``'s K/V ([T, kv_heads, head_dim]) at ``slot_mapping[t]``; slots < 0 write nothing."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _rows_contiguous(k), _rows_contiguous(v)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        FP8=k_cache.dtype == torch.float8_e4m3fn,
    )
