"""The routed experts of a mixture-of-experts MLP as two grouped GEMMs, in Triton.

Each token goes to ``top_k`` of E experts. A loop over the experts would run E small matmuls, each
after a host sync to learn which tokens it has; instead the (token, expert) pairs are sorted by expert
on the device and each expert's run is padded to whole ``BLOCK_M``-row tiles (``align_to_blocks``).
One launch then covers every tile: a program reads its tile's expert and the pairs in its rows,
gathers those rows of the input and multiplies them by that expert's weight (vLLM's and SGLang's
fused_moe work the same way). Sizes depend only on the number of tokens, never on the routing, so a
CUDA graph captures the whole layer; tiles past the routed pairs return at once.

The pipeline (``fused_experts``): gate/up GEMM over gathered token rows -> SiLU-and-mul
(fused_ops) -> down GEMM, each row scaled by its routing weight -> the top_k rows of a token summed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda_engine.kernels import fused_ops


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the pairs after padding: at most min(pairs, experts) experts get a partial tile."""
    return (triton.cdiv(num_pairs, block_m) + min(num_pairs, num_experts)) * block_m


def align_to_blocks(topk_ids: torch.Tensor, num_experts: int,
                    block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (flat indices into ``topk_ids``) sorted by expert, each expert's run padded to whole tiles.

    Returns ``sorted_pairs`` [P] (padding slots hold the number of pairs, an index past the last),
    ``tile_experts`` [P / block_m] (the expert of each tile) and ``num_padded`` [1] (the slots in use).
    Device ops with shapes from ``topk_ids.shape`` alone: no host sync, capturable in a CUDA graph.
    """
    experts = topk_ids.flatten()
    num_pairs = experts.numel()
    ones = torch.ones_like(experts, dtype=torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=experts.device).index_add_(0, experts, ones)
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_end = padded_counts.cumsum(0, dtype=torch.int32)
    order = torch.argsort(experts, stable=True)
    sorted_experts = experts[order]
    # A pair's rank within its expert's run: its sorted position minus the run's first position.
    run_start = counts.cumsum(0, dtype=torch.int32) - counts
    rank = torch.arange(num_pairs, device=experts.device, dtype=torch.int32) - run_start[sorted_experts]
    slots = (padded_end - padded_counts)[sorted_experts] + rank
    size = max_padded_pairs(num_pairs, num_experts, block_m)
    sorted_pairs = torch.full((size,), num_pairs, dtype=torch.int32, device=experts.device)
    sorted_pairs[slots.long()] = order.to(torch.int32)
    tile_starts = torch.arange(0, size, block_m, device=experts.device, dtype=torch.int32)
    tile_experts = torch.searchsorted(padded_end, tile_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pairs, tile_experts.to(torch.int32), padded_end[-1:]


@triton.jit(do_not_specialize=["num_pairs"])  # it follows the batch: one compile serves every size
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pairs_ptr, tile_experts_ptr, num_padded_ptr,
    N, K, num_pairs, stride_am, stride_be, stride_bn, stride_cm,
    PAIRS_PER_ROW: tl.constexpr, WEIGHTED: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[pair] = A[pair // PAIRS_PER_ROW] @ B[expert]^T (times the pair's weight) for one tile of pairs.

    A is [rows, K], B is [E, N, K] (a linear layer's weight per expert), C is [pairs, N]; K is contiguous.
    """
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = (pairs // PAIRS_PER_ROW).to(tl.int64)
    expert = tl.load(tile_experts_ptr + pid_m).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + k[None, :]
    b_ptrs = b_ptr + expert * stride_be + n.to(tl.int64)[None, :] * stride_bn + k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_mask = k < K - k_start
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if IEEE:  # noqa: SIM108 (a constexpr branch: Triton compiles one side)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if WEIGHTED:
        acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Tile rows: 16 while an expert gets at most 16 pairs on average (decode: about one tile per expert hit),
    else 64. Two variants only, and warm-up reaches both: a one-token step and the profiling pass's largest."""
    return 16 if num_pairs <= 16 * num_experts else 64


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alignment: tuple, block_m: int,
                 pairs_per_row: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``out[p] = a[p // pairs_per_row] @ b[expert(p)].T`` (times ``weights[p]``) for every routed pair p."""
    sorted_pairs, tile_experts, num_padded = alignment
    num_pairs, n = out.shape
    k = a.shape[1]
    ieee = a.dtype == torch.float32
    block_n, block_k, stages = (32, 32, 2) if ieee else (64, 64, 3)
    grid = (triton.cdiv(n, block_n), tile_experts.numel())
    _grouped_gemm_kernel[grid](
        a, b, out, out if weights is None else weights, sorted_pairs, tile_experts, num_padded,
        n, k, num_pairs, a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        PAIRS_PER_ROW=pairs_per_row, WEIGHTED=weights is not None, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=stages,
    )
    return out


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """The routed experts' MLP: x [T, H], gate_up [E, 2I, H], down [E, H, I], top-k weights and ids [T, k].

    Returns [T, H]: for each token, the sum over its k experts of weight * down(silu(gate) * up).
    """
    num_tokens, top_k = topk_ids.shape
    num_experts, intermediate = down.shape[0], down.shape[2]
    num_pairs = num_tokens * top_k
    block_m = choose_block_m(num_pairs, num_experts)
    alignment = align_to_blocks(topk_ids, num_experts, block_m)
    gate_up_out = x.new_empty(num_pairs, 2 * intermediate)
    grouped_gemm(x, gate_up, gate_up_out, alignment, block_m, pairs_per_row=top_k)
    activated = fused_ops.silu_and_mul(gate_up_out)
    down_out = x.new_empty(num_pairs, x.shape[1])
    grouped_gemm(activated, down, down_out, alignment, block_m, pairs_per_row=1,
                 weights=topk_weights.flatten().float())
    return down_out.view(num_tokens, top_k, -1).sum(dim=1)
