"""The routed experts of a mixture-of-experts MLP as two grouped GEMMs, in Triton.

Each token goes to ``top_k`` of E experts. A loop over the experts would run E small matmuls, each
after a host sync to learn which tokens it has; instead the (token, expert) pairs are sorted by expert
on the device and each expert's run is padded to whole ``BLOCK_M``-row tiles (``align_to_blocks``, as
vLLM's moe_align_block_size does). One launch then covers every tile: a program reads its tile's
expert and the pairs in its rows, gathers those rows of the input and multiplies them by that
expert's weight (vLLM's and SGLang's fused_moe work the same way). Sizes depend only on the number
of tokens, never on the routing, so a CUDA graph captures the whole layer; tiles past the routed
pairs return at once.

The pipeline (``fused_experts``): gate/up GEMM over gathered token rows -> SiLU-and-mul
(fused_ops) -> down GEMM, each row scaled by its routing weight -> the top_k rows of a token summed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda_engine.kernels import fused_ops

# Pairs each program of the count and place kernels takes: a 16K-token prefill's 131K pairs in 512 programs.
PAIRS_PER_PROGRAM = 256


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the pairs after padding: at most min(pairs, experts) experts get a partial tile."""
    return (triton.cdiv(num_pairs, block_m) + min(num_pairs, num_experts)) * block_m


@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(ids_ptr, counts_ptr, num_pairs, BLOCK_E: tl.constexpr, BLOCK: tl.constexpr):
    """Add this program's BLOCK pairs to each expert's count (zeroed by the caller)."""
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pairs < num_pairs
    ids = tl.load(ids_ptr + pairs, mask=valid, other=0).to(tl.int32)
    counts = tl.histogram(ids, BLOCK_E, mask=valid)
    tl.atomic_add(counts_ptr + tl.arange(0, BLOCK_E), counts, mask=counts > 0)


@triton.jit(do_not_specialize=["num_pairs", "num_tiles"])
def _layout_kernel(
    counts_ptr, cursors_ptr, sorted_pairs_ptr, tile_experts_ptr, num_padded_ptr, num_pairs, num_tiles,
    NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program: each expert's run padded to whole tiles, every tile's expert, the padding slots marked,
    and each expert's cursor set to its run's first slot."""
    e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + e)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)
    padded_start = padded_end - padded
    total = tl.sum(padded, 0)
    tl.store(num_padded_ptr, total)
    tl.store(cursors_ptr + e, padded_start, mask=e < NUM_EXPERTS)
    # A tile's expert is the first whose run ends past the tile's first slot.
    for tile_start in range(0, num_tiles, BLOCK_T):
        tiles = tile_start + tl.arange(0, BLOCK_T)
        first_slot = tiles * BLOCK_M
        expert = tl.sum((padded_end[None, :] <= first_slot[:, None]).to(tl.int32), 1)
        expert = tl.minimum(expert, NUM_EXPERTS - 1)
        mine = e[None, :] == expert[:, None]
        run_start = tl.sum(tl.where(mine, padded_start[None, :], 0), 1)
        run_count = tl.sum(tl.where(mine, counts[None, :], 0), 1)
        tl.store(tile_experts_ptr + tiles, expert, mask=tiles < num_tiles)
        slots = first_slot[:, None] + tl.arange(0, BLOCK_M)[None, :]
        padding = (slots - run_start[:, None] >= run_count[:, None]) | (first_slot[:, None] >= total)
        sentinel = num_pairs + tl.zeros_like(slots)
        tl.store(sorted_pairs_ptr + slots, sentinel, mask=padding & (tiles < num_tiles)[:, None])


@triton.jit(do_not_specialize=["num_pairs"])
def _place_kernel(ids_ptr, cursors_ptr, sorted_pairs_ptr, num_pairs, BLOCK: tl.constexpr):
    """Each pair takes the next slot of its expert's run through an atomic cursor. Their order within a run
    varies from call to call; no result does, as each row of a GEMM is computed alone."""
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pairs < num_pairs
    ids = tl.load(ids_ptr + pairs, mask=valid, other=0).to(tl.int32)
    slots = tl.atomic_add(cursors_ptr + ids, 1, mask=valid)
    tl.store(sorted_pairs_ptr + slots, pairs, mask=valid)


def align_to_blocks(topk_ids: torch.Tensor, num_experts: int,
                    block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (flat indices into ``topk_ids``) sorted by expert, each expert's run padded to whole tiles.

    Returns ``sorted_pairs`` [P] (padding slots hold the number of pairs, an index past the last),
    ``tile_experts`` [P / block_m] (the expert of each tile) and ``num_padded`` [1] (the slots in use).
    Three launches (count, lay out, place) whose shapes follow ``topk_ids.shape`` alone: no host sync,
    capturable in a CUDA graph.
    """
    ids = topk_ids.view(-1)
    num_pairs = ids.numel()
    size = max_padded_pairs(num_pairs, num_experts, block_m)
    block_e = triton.next_power_of_2(num_experts)
    counts = torch.zeros(block_e, dtype=torch.int32, device=ids.device)
    cursors = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    sorted_pairs = torch.empty(size, dtype=torch.int32, device=ids.device)
    tile_experts = torch.empty(size // block_m, dtype=torch.int32, device=ids.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=ids.device)
    grid = (triton.cdiv(num_pairs, PAIRS_PER_PROGRAM),)
    _count_kernel[grid](ids, counts, num_pairs, BLOCK_E=block_e, BLOCK=PAIRS_PER_PROGRAM)
    _layout_kernel[(1,)](counts, cursors, sorted_pairs, tile_experts, num_padded, num_pairs, size // block_m,
                         NUM_EXPERTS=num_experts, BLOCK_E=block_e, BLOCK_M=block_m, BLOCK_T=max(1, 2048 // block_m),
                         num_warps=8)
    _place_kernel[grid](ids, cursors, sorted_pairs, num_pairs, BLOCK=PAIRS_PER_PROGRAM)
    return sorted_pairs, tile_experts, num_padded


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


def gemm_config(block_m: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages): the best of bench/moe.py's sweep on the H200 for Qwen3-30B-A3B's
    shapes (16-row tiles at 1-256 tokens, 64-row at 4,096), within 1.5% of each count's best; fp32 (tests)
    smaller tiles, to fit."""
    if dtype == torch.float32:
        return 32, 32, 4, 2
    return (64, 128, 4, 3) if block_m == 16 else (64, 64, 4, 3)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alignment: tuple, block_m: int,
                 pairs_per_row: int, weights: torch.Tensor | None = None,
                 config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``out[p] = a[p // pairs_per_row] @ b[expert(p)].T`` (times ``weights[p]``) for every routed pair p;
    ``config`` overrides ``gemm_config`` (the benchmark's sweep)."""
    sorted_pairs, tile_experts, num_padded = alignment
    num_pairs, n = out.shape
    block_n, block_k, warps, stages = config or gemm_config(block_m, a.dtype)
    grid = (triton.cdiv(n, block_n), tile_experts.numel())
    _grouped_gemm_kernel[grid](
        a, b, out, out if weights is None else weights, sorted_pairs, tile_experts, num_padded,
        n, a.shape[1], num_pairs, a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        PAIRS_PER_ROW=pairs_per_row, WEIGHTED=weights is not None, IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """The routed experts' MLP: x [T, H], gate_up [E, 2I, H], down [E, H, I], top-k weights and ids [T, k].

    Returns [T, H]: for each token, the sum over its k experts of weight * down(silu(gate) * up).
    """
    num_tokens, top_k = topk_ids.shape
    num_experts, intermediate = down.shape[0], down.shape[2]
    num_pairs = num_tokens * top_k
    block_m = choose_block_m(num_pairs, num_experts)
    alignment = align_to_blocks(topk_ids, num_experts, block_m)
    gate_up_out = x.new_empty(num_pairs, 2 * intermediate)
    grouped_gemm(x, gate_up, gate_up_out, alignment, block_m, pairs_per_row=top_k, config=config)
    activated = fused_ops.silu_and_mul(gate_up_out)
    down_out = x.new_empty(num_pairs, x.shape[1])
    grouped_gemm(activated, down, down_out, alignment, block_m, pairs_per_row=1,
                 weights=topk_weights.flatten().float(), config=config)
    return down_out.view(num_tokens, top_k, -1).sum(dim=1)
