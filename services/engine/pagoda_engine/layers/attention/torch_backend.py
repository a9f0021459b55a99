"""The reference attention backend: plain torch, any device, one sequence at a time.

It is the CPU path used in CI and the oracle the GPU kernels are tested against, so it favours
obviousness over speed.
"""

from __future__ import annotations

import torch

from pagoda_engine.layers.attention.metadata import AttentionMetadata


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each token's K/V at its slot; slots < 0 are padding and write nothing.

    An fp8 cache clamps to its finite range first, as the Triton store (kernels/kv_cache.py) does, so that
    no result depends on how a device's conversion treats values past it: torch's saturates on the CPU,
    but on CUDA it did not match the Triton store bit for bit.
    """
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = _to_cache_dtype(k[valid], k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = _to_cache_dtype(v[valid], v_cache.dtype)


def _to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:
        limit = torch.finfo(dtype).max
        x = x.float().clamp(-limit, limit)
    return x.to(dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` positions of one sequence from the paged cache: [seq_len, kv_heads, dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Queries are the last ``len(q)`` of ``len(k)`` positions; computed in float32. With ``sliding_window``
    W a query sees its last W positions, itself included; ``logit_softcap`` c caps scores at c * tanh(s / c)."""
    query_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qf = q.float().transpose(0, 1)  # [heads, q, dim]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale
    if logit_softcap is not None:
        scores = torch.tanh(scores / logit_softcap) * logit_softcap
    query_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[:, None]
    key_pos = torch.arange(seq_len, device=q.device)[None, :]
    hidden = key_pos > query_pos
    if sliding_window is not None:
        hidden |= key_pos <= query_pos - sliding_window
    scores.masked_fill_(hidden, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vf)
    return out.transpose(0, 1).to(q.dtype)


class TorchAttentionBackend:
    name = "torch"

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
    ) -> torch.Tensor:
        if k_cache is not None:
            write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        starts = meta.query_start_loc_host or meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens_host or meta.seq_lens.tolist()
        out = torch.zeros_like(q)
        for i, seq_len in enumerate(seq_lens):
            start, end = starts[i], starts[i + 1]
            if k_cache is None:
                ctx_k, ctx_v = k[start:end], v[start:end]
            else:
                ctx_k = gather_context(k_cache, meta.block_tables[i], seq_len)
                ctx_v = gather_context(v_cache, meta.block_tables[i], seq_len)
            out[start:end] = causal_attention(q[start:end], ctx_k, ctx_v, scale, sliding_window, logit_softcap)
        return out
