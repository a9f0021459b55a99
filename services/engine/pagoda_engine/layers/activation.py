"""The gated activations of Llama-style MLPs (SiLU) and Gemma's (tanh-approximated GELU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # CUDA builds of torch bring Triton; without it every device runs the torch code.
    from pagoda_engine.kernels import fused_ops
except ImportError:
    fused_ops = None


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for ``x = [gate | up]`` as produced by the merged gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops is not None and x.is_cuda:
            return fused_ops.silu_and_mul(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU path and the kernel's oracle."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """``gelu_tanh(gate) * up`` for ``x = [gate | up]`` (Gemma's ``gelu_pytorch_tanh``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops is not None and x.is_cuda:
            return fused_ops.gelu_tanh_and_mul(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU path and the kernel's oracle."""
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
