"""RMSNorm with the residual add of the next block folded in; Gemma's variant, which scales by 1 + weight."""

from __future__ import annotations

import torch
from torch import nn

try:  # CUDA builds of torch bring Triton; without it every device runs the torch code.
    from pagoda_engine.kernels import fused_ops
except ImportError:
    fused_ops = None


class RMSNorm(nn.Module):
    # Added to the weight before it scales (Gemma's 1); the weight that changes nothing is 1 - this.
    weight_offset = 0.0

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)``: one Triton kernel on CUDA."""
        if fused_ops is not None and x.is_cuda:
            return fused_ops.rms_norm(x, self.weight, self.eps, residual, gemma=self.weight_offset == 1.0)
        return self.forward_torch(x, residual)

    def forward_torch(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The CPU path and the kernel's oracle.

        The sum stays in the input dtype, as in Hugging Face's ``residual + hidden_states``, so the
        residual stream rounds exactly as theirs does.
        """
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, the scaled value rounded back before the weight: HF's order of operations.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by ``1 + weight``, in float32, before the one rounding to the input dtype."""

    weight_offset = 1.0

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)
