"""The GPU attention backend: Triton kernels over the paged KV cache.

One step runs at most four kernels: store this step's K/V, decode attention for the first
``num_decodes`` sequences (split-KV, CUDA-graph capturable) and the reduce of its splits, then causal
prefill for the rest (prefix hits and chunked prefill read their earlier tokens through the block
table). The torch backend is the
oracle these are tested against (tests/test_triton_attention.py).

Fresh prompts (no prefix) go through the same paged prefill kernel: on the H100 it measured faster than
torch's bundled FlashAttention-2 ``varlen_attn`` on unpaged K/V (bench/kernels.py), so there is no
separate path. ``varlen_attn`` serves only the profiling pass, where no cache exists yet.

Nothing here syncs with the host or branches on device data, and the decode split count depends only
on the batch size (rounded up to a power of two) or, batch-invariant, on ``meta.max_seq_len``, so a
pure-decode step can be captured in a CUDA graph as is; the split kernel's scratch buffers come from
the graph's memory pool, no workspace is needed. Under either split policy a graph replay gives
bitwise the eager step's outputs.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from pagoda_engine.kernels.decode_attention import decode_attention
from pagoda_engine.kernels.kv_cache import store_kv_cache
from pagoda_engine.kernels.prefill_attention import prefill_attention
from pagoda_engine.layers.attention.metadata import AttentionMetadata
from pagoda_engine.layers.attention.torch_backend import causal_attention

try:  # PyTorch's bundled FlashAttention-2 (torch >= 2.10); used only where there is no cache yet
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

# Query rows per call of the torch reference in the profiling pass, where FlashAttention cannot stand in.
PROFILE_QUERY_ROWS = 512
# Newer torch wants GQA spelt out; 2.11 (the GPU machine's) takes fewer KV heads without the flag.
_VARLEN_GQA_FLAG = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters


class TritonAttentionBackend:
    """``batch_invariant`` makes decode results independent of the batch, at 15% of decode attention's
    speed on big batches; see kernels/decode_attention.py. Either way a CUDA graph gives the eager tokens."""

    name = "triton"

    def __init__(self, batch_invariant: bool = False):
        self.batch_invariant = batch_invariant

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See AttentionBackend. ``out`` lets tests hand in a poisoned buffer to prove every row is written."""
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if k_cache is None:
            return attend_without_cache(q, k, v, meta, scale, out, sliding_window, logit_softcap)
        store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        num_decodes = meta.num_decodes
        if num_decodes > 0:
            decode_attention(
                q[:num_decodes], k_cache, v_cache, meta.block_tables[:num_decodes], meta.seq_lens[:num_decodes],
                scale, meta.max_seq_len, out[:num_decodes], batch_invariant=self.batch_invariant,
                order=meta.decode_order, sliding_window=sliding_window, logit_softcap=logit_softcap,
            )
        if meta.num_seqs > num_decodes:
            prefill_attention(
                q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                first_seq=num_decodes, num_seqs=meta.num_seqs - num_decodes, max_query_len=meta.max_query_len,
                scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap,
            )
        return out


def attend_without_cache(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor,
    sliding_window: int | None = None, logit_softcap: float | None = None,
) -> torch.Tensor:
    """The memory-profiling pass (no cache yet): every sequence is a fresh prompt attending to itself."""
    fused = logit_softcap is None  # neither FlashAttention's varlen nor SDPA caps scores
    if fused and varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        extra = {"enable_gqa": True} if _VARLEN_GQA_FLAG and q.shape[1] != k.shape[1] else {}
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        left = -1 if sliding_window is None else sliding_window - 1  # keys this far back, besides the query's own
        out.copy_(varlen_attn(
            q, k, v, meta.query_start_loc, meta.query_start_loc, meta.max_query_len, meta.max_query_len,
            scale=scale, window_size=(left, 0), **extra,
        ))
        return out
    starts = meta.query_start_loc_host or meta.query_start_loc.tolist()
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        if sliding_window is not None or not fused:
            # The reference materialises [heads, queries, keys] scores: a few query rows at a time, so that the
            # profiled peak stays near the serving path's (8K tokens x 16 heads at once would be 8.6 GB).
            for first in range(start, end, PROFILE_QUERY_ROWS):
                last = min(first + PROFILE_QUERY_ROWS, end)
                out[first:last] = causal_attention(q[first:last], k[start:last], v[start:last], scale,
                                                   sliding_window, logit_softcap)
            continue
        rows = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # [heads, tokens, dim]
        attended = F.scaled_dot_product_attention(*rows, is_causal=True, scale=scale, enable_gqa=True)
        out[start:end] = attended.transpose(0, 1)
    return out
