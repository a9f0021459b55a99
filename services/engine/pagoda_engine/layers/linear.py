"""Tensor-parallel linear layers (Megatron style, as in nano-vllm and vLLM).

Column-parallel layers split the output features across ranks (no communication: each rank keeps its
slice of the activations); row-parallel layers split the input features and sum the partial products
with an all-reduce. Every parameter carries a ``weight_loader(param, full_tensor[, shard_id])`` that
cuts this rank's piece out of the full checkpoint tensor, so the loader never needs to know about
ranks. Layers that fuse several checkpoint tensors into one matmul list the pieces in ``shard_ids``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda_engine.distributed import all_reduce, divide, tp_rank, tp_size

try:  # CUDA builds of torch bring Triton; without it every device runs F.linear.
    from pagoda_engine.kernels.skinny_gemm import linear
except ImportError:
    linear = F.linear


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` with a readable error instead of a broadcast or a torch shape error."""
    if dst.shape != src.shape:
        raise ValueError(f"shape {tuple(src.shape)} does not match the expected {tuple(dst.shape)}")
    dst.copy_(src)


def rank_slice(full: torch.Tensor, dim: int, full_size: int, index: int, size: int) -> torch.Tensor:
    """Slice ``index`` of ``size`` along ``dim`` of a checkpoint tensor, which must be ``full_size`` long there."""
    if full.dim() <= dim or full.shape[dim] != full_size:
        raise ValueError(f"shape {tuple(full.shape)} should have {full_size} along dim {dim}")
    return full.narrow(dim, index * size, size)


class LinearBase(nn.Module):
    """``y = x W^T + b`` over this rank's ``[output_size, input_size]`` slice of the weight."""

    shard_ids: tuple = (None,)

    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A few rows (decode) take the skinny-GEMM kernel on CUDA, which reads the weight at full bandwidth.
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank (small layers every rank needs whole: a MoE router)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        copy_weight(param.data, loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays split."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, tp_size(), "output size"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        size = param.shape[0]
        copy_weight(param.data, rank_slice(loaded, 0, size * self.tp_size, self.tp_rank, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input run as one matmul (gate and up: ``[gate | up]``).

    Each rank holds its slice of every piece, in order, so ``chunk(len(output_sizes))`` splits them.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        for output_size in output_sizes:
            divide(output_size, tp_size(), "output size")
        self.output_sizes = output_sizes
        self.shard_ids = tuple(range(len(output_sizes)))
        self.shard_sizes = tuple(output_sizes)  # each piece's rows in the checkpoint, in shard_ids' order
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        full = self.output_sizes[shard_id]
        size = full // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        copy_weight(param.data.narrow(0, offset, size), rank_slice(loaded, 0, full, self.tp_rank, size))


class QKVParallelLinear(LinearBase):
    """The q, k and v projections as one column-parallel matmul: output ``[q | k | v]`` of this rank's heads.

    Query heads are split across ranks. KV heads are split too while there are at least as many as
    ranks; with fewer, each KV head is replicated on ``tp_size / num_kv_heads`` consecutive ranks.
    """

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False):
        size = tp_size()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, size, "number of attention heads")
        if total_num_kv_heads >= size:
            self.num_kv_heads = divide(total_num_kv_heads, size, "number of KV heads")
            self.kv_replicas = 1
        elif size % total_num_kv_heads:
            raise ValueError(f"tensor-parallel size ({size}) must be a multiple of the number of KV heads "
                             f"({total_num_kv_heads}) to replicate them")
        else:
            self.num_kv_heads = 1
            self.kv_replicas = size // total_num_kv_heads
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        total_kv = total_num_kv_heads * head_dim
        self.shard_sizes = (total_num_heads * head_dim, total_kv, total_kv)  # rows in the checkpoint
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        if shard_id == "q":
            offset, size, index = 0, self.q_size, self.tp_rank
            full = self.total_num_heads * self.head_dim
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, index = self.kv_size, self.tp_rank // self.kv_replicas
            full = self.total_num_kv_heads * self.head_dim
        copy_weight(param.data.narrow(0, offset, size), rank_slice(loaded, 0, full, index, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks (the output of a column-parallel layer); outputs summed."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(divide(input_size, tp_size(), "input size"), output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # the bias is whole on every rank
            copy_weight(param.data, loaded)
            return
        size = param.shape[1]
        copy_weight(param.data, rank_slice(loaded, 1, size * self.tp_size, self.tp_rank, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Rank 0 alone adds the bias, so the all-reduce sums it once.
        bias = self.bias if self.tp_rank == 0 else None
        return all_reduce(linear(x, self.weight, bias))
