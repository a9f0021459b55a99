"""The interface every attention implementation (the torch reference, Triton) provides."""

from __future__ import annotations

from typing import Protocol

import torch

from pagoda_engine.layers.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Writes this step's K/V into the paged cache, then attends each query over its whole context.

    Shapes: ``q`` [num_tokens, num_heads, head_dim]; ``k``, ``v`` [num_tokens, num_kv_heads, head_dim];
    ``k_cache``, ``v_cache`` [num_blocks, block_size, num_kv_heads, head_dim] (flash-attn's paged layout),
    or ``None`` before the cache exists (the memory-profiling pass: every sequence is then a fresh
    prefill and attends to its own new tokens only). Returns [num_tokens, num_heads, head_dim].
    ``num_heads`` is a multiple of ``num_kv_heads`` (grouped-query attention). With ``sliding_window`` W
    a query at position p sees positions p - W + 1 .. p only (transformers' ``kv_idx > q_idx - W``); block
    table entries wholly before the window may name blocks already released (BlockManager), so what lies
    there is read, if at all, only to be masked. With ``logit_softcap`` c each scaled score s becomes c * tanh(s / c).
    """

    name: str

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
    ) -> torch.Tensor: ...
