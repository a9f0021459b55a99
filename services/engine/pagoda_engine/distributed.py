"""Tensor-parallel helpers: rank, size and the few collectives the layers and the runner need.

The tensor-parallel group is the default process group: one engine process per GPU, all in one TP
group. Without an initialised process group we are rank 0 of 1 and the collectives do nothing, so
the layers run unchanged on a single device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def tp_rank() -> int:
    return dist.get_rank() if _initialised() else 0


def tp_size() -> int:
    return dist.get_world_size() if _initialised() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the TP ranks, in place; returns ``x``."""
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in rank order."""
    size = tp_size()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's ``value``."""
    if tp_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator / denominator`` when exact; a clear error naming ``what`` otherwise."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator
