"""The attention module models use: owns one layer's view of the KV cache, delegates to a backend."""

from __future__ import annotations

import torch
from torch import nn

from pagoda_engine.layers.attention.backend import AttentionBackend
from pagoda_engine.layers.attention.metadata import AttentionMetadata
from pagoda_engine.layers.attention.torch_backend import TorchAttentionBackend


def select_backend(name: str, device: torch.device, batch_invariant: bool = False) -> AttentionBackend:
    """``auto`` is Triton on CUDA, else the torch reference (batch-invariant by construction: it attends one
    sequence at a time).

    flash-attn is not used even when installed: its paged KV cache takes pages of 256 tokens, a
    multiple our 16-64-token blocks are not, and its unpaged kernels would need a gather per step.
    """
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from pagoda_engine.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(batch_invariant)
    raise ValueError(f"unknown attention backend {name!r} (expected auto, torch or triton)")


class Attention(nn.Module):
    """Multi-head / grouped-query attention of one layer over its slice of the paged KV cache.

    The ModelRunner sets ``k_cache``/``v_cache`` (views into one big allocation) and ``backend`` after
    the model is built; until then the cache is ``None`` and attention covers this step's tokens only.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None, logit_softcap: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        # A query sees at most this many positions, itself included (Mistral's window); None: all of them.
        self.sliding_window = sliding_window
        # Scores become cap * tanh(score / cap) before the softmax (Gemma 2); None: as they are.
        self.logit_softcap = logit_softcap
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend: AttentionBackend = TorchAttentionBackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, num_heads * head_dim], k/v: [T, num_kv_heads * head_dim] -> [T, num_heads * head_dim]."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window,
                                   self.logit_softcap)
        return out.reshape(-1, self.num_heads * self.head_dim)
