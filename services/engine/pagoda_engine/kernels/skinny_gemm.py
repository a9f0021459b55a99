"""Skinny GEMM ("GEMV"): ``y = x @ W^T + b`` for a few rows of ``x`` (decode steps: one row per token).

With M <= 16 rows, a linear layer does 2*M FLOP per weight element it reads: it is bound by reading W
once, and cuBLAS's kernels for one row reach well under the H200's bandwidth: Qwen3-0.6B's o_proj
(4.2 MB) takes 12.9 us, 325 GB/s, and its gate_up (12.6 MB) 6.0 us, 2.1 TB/s (bench/linear.py).
Here each program owns BLOCK_N output features and streams their rows of W over K, BLOCK_K at a time,
applying every tile to all M rows while it is in registers; so W is read exactly once, in long
contiguous runs along its rows.

Two inner products, chosen by BLOCK_M:

- ``BLOCK_M == 1`` (one token): an elementwise multiply into a [BLOCK_N, BLOCK_K] fp32 accumulator,
  summed across K once at the end, so the loop has no cross-lane reductions and no padded rows.
- ``BLOCK_M == 16``: ``tl.dot`` on x padded to 16 rows (its smallest tile); the padding costs tensor
  core work only, which is free here, and rows of x are re-read per K tile from L1/L2, not HBM.

Layers with few output features (o_proj and down: N = 1024) give too few programs to keep every SM
loading, so K is also split SPLIT_K ways: each piece writes fp32 partial sums to a workspace and a
second small kernel adds them with the bias. No atomics, so results do not depend on timing.

Every launch takes its grid from host ints and never syncs, so it can be captured in a CUDA graph, and
M is not specialised on: two compiles per layer (one row, and 2-16 rows through ``tl.dot``) serve every
batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Up to this many rows linear() takes the kernel. On an H200 it took batch-1 decode of Qwen3-0.6B from
# 1.58 to 1.26 ms/token; 16 concurrent sequences spent 3% less device time per step than with cuBLAS
# from 2 rows up, and ran -1% to +4% faster end to end over four A/B pairs (bench/RESULTS.md).
MAX_ROWS = 16
_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K
    k_first = pid_k * TILES_PER_SPLIT * BLOCK_K
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(TILES_PER_SPLIT):
        k = k_first + i * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < K
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + k, mask=k_mask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        else:
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    result = tl.sum(acc, axis=1)[None, :] if BLOCK_M == 1 else acc
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:  # fp32 partial sums, [split, M, N]; the reduce kernel adds the bias and rounds
        offsets = (pid_k * M + m)[:, None] * N + n[None, :]
        tl.store(out_ptr + offsets, result, mask=mask)
    else:
        if HAS_BIAS:
            result += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None] * N + n[None, :], result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["MN"])
def _split_k_reduce_kernel(
    partial_ptr, bias_ptr, out_ptr, MN, N,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < MN
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for piece in tl.static_range(SPLIT_K):
        total += tl.load(partial_ptr + piece * MN + offsets, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offsets % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


def default_config(m: int, n: int, k: int) -> dict[str, int]:
    """Tile sizes and launch options for an [m, k] x [n, k]^T product.

    From bench/linear.py --sweep on an H200 (Qwen3-0.6B's shapes, bf16): one row wants long K tiles
    over 16 features; padded rows want 32 features (64 on the LM head's 152k) over K tiles of 256,
    or 512 where a program's run of K is long (o_proj), which keeps tl.dot's operands in registers.
    """
    block_m, block_n = (1, 16) if m == 1 else (16, 64 if n >= 32768 else 32)
    # Long rows of few output features (down: N = 1024, K = 3072) leave SMs idle: split K, in pieces of at
    # least 768, until there are about two programs per SM (132 on an H200). o_proj (K = 2048) ran
    # faster unsplit.
    split_k = 1
    while k > 2048 and triton.cdiv(n, block_n) * split_k < 256 and k // (2 * split_k) >= 768:
        split_k *= 2
    block_k = 512 if m == 1 or k // split_k >= 2048 else 256
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4, num_stages=3)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a contiguous [M, K] ``x`` and [N, K] ``weight``, M <= 16.

    Accumulates in fp32 and rounds once to x's dtype. Writes into ``out`` ([M, N]) when given.
    ``config`` overrides ``default_config`` (the benchmark's sweep).
    """
    (m, k), (n, k_w) = x.shape, weight.shape
    if k != k_w or m > 16 or not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError(f"need contiguous x [M <= 16, K] and weight [N, K], got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = {**default_config(m, n, k), **(config or {})}
    # A constant trip count: fixed per layer (K and the config are), so it costs no extra compiles.
    num_tiles = triton.cdiv(k, cfg["BLOCK_K"])
    tiles_per_split = triton.cdiv(num_tiles, cfg.pop("SPLIT_K"))
    # Only splits that hold a tile: one row of down_proj (K = 3072, 6 tiles of 512) asked for 4 splits of 2.
    split_k = triton.cdiv(num_tiles, tiles_per_split)
    # The M = 1 path multiplies elementwise, so one row needs no padding; more rows go through tl.dot.
    cfg["BLOCK_M"] = 1 if m == 1 and cfg["BLOCK_M"] == 1 else 16
    partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    _skinny_gemm_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split_k)](
        x, weight, bias if bias is not None else x, partial, m, n, k,
        HAS_BIAS=bias is not None, SPLIT=split_k > 1,
        # fp32 inputs stay exact instead of being rounded to tf32 (Triton's default, a no-op for bf16/fp16).
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        TILES_PER_SPLIT=tiles_per_split, **cfg,
    )
    if split_k > 1:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            partial, bias if bias is not None else partial, out, m * n, n,
            HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK=block,
        )
    return out


def use_skinny_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` takes the Triton kernel: a few bf16/fp16 rows on CUDA, everything contiguous."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype in _DTYPES
            and weight.dtype == x.dtype and x.is_contiguous() and weight.is_contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through the skinny-GEMM kernel where it is faster (see ``use_skinny_gemm``)."""
    if use_skinny_gemm(x, weight) and (bias is None or bias.dtype == x.dtype):
        return skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)
