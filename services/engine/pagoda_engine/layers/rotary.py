"""Rotary position embeddings, neox style (rotate halves), as Hugging Face Llama and Qwen apply them.

cos/sin are precomputed in float32 for every position up to ``max_position`` and looked up by
position, so the forward is a gather plus elementwise ops (no host sync, CUDA-graph safe).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagoda_engine.layers.norm import RMSNorm

try:  # CUDA builds of torch bring Triton; without it every device runs the torch code.
    from pagoda_engine.kernels import fused_ops
except ImportError:
    fused_ops = None


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per-pair rotation speeds [head_dim // 2], computed on the CPU exactly as transformers does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        return _llama3(inv_freq, scaling)
    if scaling["rope_type"] == "yarn":
        return _yarn(head_dim, theta, scaling)
    raise ValueError(f"rope type {scaling['rope_type']!r} is not supported")


def attention_factor(scaling: dict[str, Any] | None) -> float:
    """What cos and sin are multiplied by: 1 but under YaRN, whose longer contexts want sharper attention."""
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (Qwen2.5's long-context configs): fast pairs keep their frequency, slow ones are divided by
    ``factor``, with a linear ramp between the pairs that turn beta_fast and beta_slow times over the
    original context. Operation for operation as transformers' _compute_yarn_parameters."""
    factor, old_context = scaling["factor"], scaling["original_max_position_embeddings"]

    def pair_turning(rotations: float) -> float:  # the (fractional) pair that turns this often over old_context
        return head_dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(scaling.get("beta_fast") or 32), pair_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: slow frequencies divided by ``factor``, fast ones kept, a smooth blend between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.head_dim = head_dim
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inverse_frequencies(head_dim, theta, scaling).to(positions.device))
        factor = attention_factor(scaling)
        # Not saved with the model: derived from the config, and checkpoints carry none.
        self.register_buffer("cos_cache", freqs.cos() * factor, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * factor, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, norms: tuple[RMSNorm, RMSNorm] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate flat ``q`` [T, heads * head_dim] and ``k`` [T, kv_heads * head_dim] by their positions,
        after RMS-normalising each head with ``norms`` (q's and k's) when given (Qwen3, Gemma 3).

        On CUDA one Triton kernel does it all in place and returns them; callers use the return value.
        """
        if fused_ops is not None and q.is_cuda:
            weights = None if norms is None else (norms[0].weight, norms[1].weight)
            eps = 0.0 if norms is None else norms[0].eps
            gemma = norms is not None and norms[0].weight_offset == 1.0
            fused_ops.rotary_embedding_(positions, q, k, self.cos_cache, self.sin_cache, weights, eps, gemma)
            return q, k
        if norms is not None:
            q = norms[0].forward_torch(q.unflatten(-1, (-1, self.head_dim))).flatten(1)
            k = norms[1].forward_torch(k.unflatten(-1, (-1, self.head_dim))).flatten(1)
        return self.forward_torch(positions, q, k)

    def forward_torch(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU path and the kernel's oracle: returns new tensors."""
        # HF rounds cos/sin to the activation dtype before applying them; so do we.
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(-1, (-1, self.head_dim))
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(1)
