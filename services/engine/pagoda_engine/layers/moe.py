"""The mixture-of-experts MLP (Mixtral, GraniteMoE, Qwen2-MoE, Qwen3-MoE, OLMoE): a router, routed experts, and
Qwen2-MoE's shared expert.

The router scores every expert per token and keeps the ``top_k`` best (softmax in fp32, as
transformers does). The experts' weights are stacked, ``gate_up_proj`` [E, 2I, H] and ``down_proj``
[E, H, I], so that one grouped GEMM serves them all on CUDA (kernels/fused_moe.py); elsewhere a loop
over the experts that were hit runs the same math in torch, the kernel's oracle.

Under tensor parallelism each expert's intermediate features are split across ranks (as vLLM does by
default): gate/up by rows, down by columns, and the routed sum is all-reduced once. The router is
replicated, so every rank routes a token the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda_engine.distributed import all_reduce, divide, tp_rank, tp_size
from pagoda_engine.layers.activation import SiluAndMul
from pagoda_engine.layers.linear import ReplicatedLinear, copy_weight, rank_slice
from pagoda_engine.model_config import MoEConfig

try:  # CUDA builds of torch bring Triton; without it every device runs the torch loop.
    from pagoda_engine.kernels import fused_moe
except ImportError:
    fused_moe = None

# The two checkpoint tensors each expert's gate_up_proj rows hold, in order.
_GATE_UP_PIECES = ("gate", "up")


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, top_k] in fp32, expert ids [T, top_k]), as transformers routes."""
    weights, ids = torch.topk(torch.softmax(router_logits.float(), dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """Every routed expert's gated MLP, stacked; returns this rank's partial sum (not yet all-reduced)."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.local_size = divide(intermediate_size, tp_size(), "expert intermediate size")
        self.tp_rank = tp_rank()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.local_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.local_size))
        self.gate_up_proj.shard_ids = tuple((e, piece) for e in range(num_experts) for piece in _GATE_UP_PIECES)
        self.down_proj.shard_ids = tuple((e, "down") for e in range(num_experts))
        for param in (self.gate_up_proj, self.down_proj):
            param.weight_loader = self.weight_loader
        self.act_fn = SiluAndMul()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str]) -> None:
        """One expert's gate, up or down weight, as a checkpoint stores it ([I, H] or [H, I])."""
        expert, piece = shard_id
        full, size = self.intermediate_size, self.local_size
        if piece == "down":
            copy_weight(param.data[expert], rank_slice(loaded, 1, full, self.tp_rank, size))
            return
        offset = _GATE_UP_PIECES.index(piece) * size
        copy_weight(param.data[expert].narrow(0, offset, size), rank_slice(loaded, 0, full, self.tp_rank, size))

    def stacked_pieces(self, param: nn.Parameter, stacked: torch.Tensor) -> list[tuple[tuple[int, str], torch.Tensor]]:
        """A checkpoint tensor holding every expert at once ([E, 2I, H] gate and up, or [E, H, I] down:
        GraniteMoE's input_linear and output_linear) as the per-expert pieces ``weight_loader`` takes."""
        if stacked.dim() != 3 or stacked.shape[0] != self.num_experts:
            raise ValueError(f"shape {tuple(stacked.shape)} should stack {self.num_experts} experts")
        if param is self.down_proj:
            return [((e, "down"), stacked[e]) for e in range(self.num_experts)]
        if stacked.shape[1] != 2 * self.intermediate_size:
            raise ValueError(f"shape {tuple(stacked.shape)} should hold gate and up, {self.intermediate_size} "
                             "rows each")
        return [((e, piece), rows) for e in range(self.num_experts)
                for piece, rows in zip(_GATE_UP_PIECES, stacked[e].chunk(2), strict=True)]

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if fused_moe is not None and x.is_cuda:
            return fused_moe.fused_experts(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        return self.forward_torch(x, topk_weights, topk_ids)

    def forward_torch(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The CPU path and the kernel's oracle: one matmul pair per expert that any token chose."""
        out = torch.zeros_like(x)
        top_k = topk_ids.shape[1]
        pairs = topk_ids.flatten()
        order = pairs.argsort(stable=True)
        weights = topk_weights.flatten()
        start = 0
        for expert, count in enumerate(torch.bincount(pairs, minlength=self.num_experts).tolist()):
            chosen = order[start:start + count]
            start += count
            if count == 0:
                continue
            tokens = chosen // top_k
            hidden = self.act_fn(F.linear(x[tokens], self.gate_up_proj[expert]))
            routed = F.linear(hidden, self.down_proj[expert]) * weights[chosen, None]
            out.index_add_(0, tokens, routed.to(out.dtype))
        return out


class SparseMoeBlock(nn.Module):
    """Routed experts plus, when given, a shared expert every token passes through (Qwen2-MoE's, gated by
    ``sigmoid(shared_expert_gate(x))``). Parameter names follow transformers' checkpoints."""

    def __init__(self, hidden_size: int, moe: MoEConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate = ReplicatedLinear(hidden_size, moe.num_experts)  # the router
        self.experts = FusedMoE(hidden_size, moe.num_experts, moe.intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = ReplicatedLinear(hidden_size, 1) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = all_reduce(self.experts(x, *route(self.gate(x), self.top_k, self.renormalize)))
        if self.shared_expert is None:
            return routed
        # The shared expert's down projection all-reduces on its own (a second, small all-reduce under TP).
        return routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
