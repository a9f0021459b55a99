"""Triton kernels for the memory-bound steps between the matmuls: RMSNorm with the residual add, rotary
embedding (with Qwen3's per-head q/k RMSNorm folded in), and SiLU-and-mul.

Each kernel reads its inputs once and writes its outputs once. They repeat the torch code in layers/
step for step: float32 arithmetic, rounded to the activation dtype exactly where torch's eager ops
round. So bf16/fp16 results round like the torch path's, and fp32 results can differ from it only
through the order of RMSNorm's sum of squares, and the exp in SiLU under the interpreter. The fp32 GPU
engine is compared token for token with transformers, which is why this matters.

The layers call these when their input is on CUDA; their torch code stays the CPU path and the oracle.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Eager torch rounds after every multiply and add, one op per kernel; a fused multiply-add would skip a
# rounding. libdevice's non-flush-to-zero expf is the routine torch's CUDA silu calls.
_TORCH_FLOAT_SEMANTICS = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


# Not specialised on n_rows, which changes from step to step: one compile serves every batch.
@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    n_rows, n_cols, x_stride, residual_stride, inv_n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)
    # Padding lanes load 0 so that they add nothing to the sum of squares.
    x = tl.load(x_ptr + (rows * x_stride)[:, None] + cols[None, :], mask=mask, other=0.0)
    out_offsets = rows[:, None] * n_cols + cols[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + (rows * residual_stride)[:, None] + cols[None, :], mask=mask, other=0.0)
        # The sum is rounded to the activation dtype before it is normalised, as Hugging Face's is.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + out_offsets, x, mask=mask)
    xf = x.to(tl.float32)
    # torch's mean multiplies the sum by 1/n rather than dividing by n.
    mean_square = tl.sum(xf * xf, axis=1) * inv_n_cols
    weight = tl.load(weight_ptr + cols, mask=cols < n_cols).to(tl.float32)
    if GEMMA:  # x * (1 + weight) in float32, rounded once
        out = xf * tl.math.rsqrt(mean_square + eps)[:, None] * (1.0 + weight)
    else:
        normed = (xf * tl.math.rsqrt(mean_square + eps)[:, None]).to(x.dtype)
        out = normed.to(tl.float32) * weight
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, gemma: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``RMSNorm.forward`` in one pass over the last dimension (up to 8192 wide); ``gemma``: GemmaRMSNorm's.

    ``x`` (and ``residual``) are [..., n]; rows may be strided (a slice of a wider tensor), other layouts
    are copied first. Returns new contiguous tensors: ``norm(x)``, or ``(norm(x + residual), x + residual)``.
    """
    x_rows = _rows(x)
    n_rows, n_cols = x_rows.shape
    # Llama's norm multiplies in the promoted dtype; Gemma's casts back to the input's.
    dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    residual_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else out
    residual_rows = _rows(residual) if residual is not None else x_rows
    block_cols = triton.next_power_of_2(n_cols)
    # Narrow rows (a per-head norm's 64-128): a program takes several so that each still moves a few KB.
    block_rows = max(1, 2048 // block_cols)
    _rms_norm_kernel[(triton.cdiv(n_rows, block_rows),)](
        x_rows, residual_rows, weight, out, residual_out,
        n_rows, n_cols, x_rows.stride(0), residual_rows.stride(0), 1.0 / n_cols, eps,
        HAS_RESIDUAL=residual is not None, GEMMA=gemma, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        num_warps=min(max(block_rows * block_cols // 512, 1), 16), **_TORCH_FLOAT_SEMANTICS,
    )
    return out if residual is None else (out, residual_out)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, n] with contiguous rows: a view when its layout allows, else a copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


# positions_ptr is a view into the step's one flat input array, 16-byte aligned or not by the parity of
# the step's token count; each program loads one position, so alignment buys nothing and must not
# decide the compiled variant.
@triton.jit(do_not_specialize_on_alignment=["positions_ptr"])
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, q_weight_ptr, k_weight_ptr,
    q_stride, k_stride, cache_stride, n_q_heads, n_k_heads, inv_head_dim, eps,
    HAS_NORM: tl.constexpr, GEMMA: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
):
    # One program per token: its cos/sin row is read once and used for every q and k head.
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    dtype = q_ptr.dtype.element_ty
    # Hugging Face rounds cos/sin to the activation dtype before applying them.
    cos = tl.load(cos_ptr + position * cache_stride + d, mask=d_mask).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + position * cache_stride + d, mask=d_mask).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + token * q_stride, n_q_heads, cos, sin, d, d_mask, q_weight_ptr, inv_head_dim, eps,
                  HAS_NORM, GEMMA, HALF, BLOCK_Q_HEADS)
    _rotate_heads(k_ptr + token * k_stride, n_k_heads, cos, sin, d, d_mask, k_weight_ptr, inv_head_dim, eps,
                  HAS_NORM, GEMMA, HALF, BLOCK_K_HEADS)


@triton.jit
def _rotate_heads(head_ptr, n_heads, cos, sin, d, d_mask, weight_ptr, inv_head_dim, eps,
                  HAS_NORM: tl.constexpr, GEMMA: tl.constexpr, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)
    mask = (heads < n_heads)[:, None] & d_mask[None, :]
    first = head_ptr + heads[:, None] * (2 * HALF) + d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        # RMSNorm of each head first, rounded where the separate norm rounds (see _rms_norm_kernel).
        mean_square = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) * inv_head_dim
        scale = tl.math.rsqrt(mean_square + eps)[:, None]
        w1 = tl.load(weight_ptr + d, mask=d_mask).to(tl.float32)[None, :]
        w2 = tl.load(weight_ptr + HALF + d, mask=d_mask).to(tl.float32)[None, :]
        if GEMMA:  # GemmaRMSNorm: x * (1 + weight) in float32, rounded once
            x1 = (x1 * scale * (1.0 + w1)).to(dtype).to(tl.float32)
            x2 = (x2 * scale * (1.0 + w2)).to(dtype).to(tl.float32)
        else:
            x1 = ((x1 * scale).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
            x2 = ((x2 * scale).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    # Each product is rounded to the activation dtype before the sum, as the separate torch ops do.
    out1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    tl.store(first, out1.to(dtype), mask=mask)
    tl.store(first + HALF, out2.to(dtype), mask=mask)


def rotary_embedding_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
    norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None, eps: float = 0.0, gemma: bool = False,
) -> None:
    """Rotate ``q`` [T, heads * head_dim] and ``k`` [T, kv_heads * head_dim] in place, neox style.

    ``cos_cache``/``sin_cache`` are float32 [max_position, head_dim // 2], looked up by ``positions`` [T].
    q and k may be row views (e.g. slices of the fused qkv output) whose last dimension is contiguous.
    With ``norm_weights`` (q's and k's, [head_dim] each), every head is RMS-normalised first, as Qwen3's
    q_norm/k_norm do (``gemma``: as Gemma 3's GemmaRMSNorm q/k norms do): one kernel instead of three.
    """
    half = cos_cache.shape[1]
    head_dim = 2 * half
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1 or t.shape[-1] % head_dim:
            raise ValueError(f"{name} must be [T, heads * {head_dim}] with a contiguous last dim")
    n_q_heads, n_k_heads = q.shape[-1] // head_dim, k.shape[-1] // head_dim
    block_half = triton.next_power_of_2(half)
    block_q_heads = triton.next_power_of_2(n_q_heads)
    q_weight, k_weight = norm_weights if norm_weights is not None else (q, k)  # unused without a norm
    _rotary_kernel[(positions.shape[0],)](
        positions, q, k, cos_cache, sin_cache, q_weight, k_weight,
        q.stride(0), k.stride(0), cos_cache.stride(0), n_q_heads, n_k_heads, 1.0 / head_dim, eps,
        HAS_NORM=norm_weights is not None, GEMMA=gemma, HALF=half, BLOCK_HALF=block_half, BLOCK_Q_HEADS=block_q_heads,
        BLOCK_K_HEADS=triton.next_power_of_2(n_k_heads),
        num_warps=min(max(block_q_heads * block_half // 256, 1), 8), **_TORCH_FLOAT_SEMANTICS,
    )


@triton.jit
def _gated_kernel(x_ptr, out_ptr, n_cols, x_stride, GELU: tl.constexpr, LIBDEVICE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """``act(gate) * up`` over one row's block of columns: SiLU, or with GELU the tanh-approximated GELU."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask)
    g = gate.to(tl.float32)
    act = _gelu_tanh(g, LIBDEVICE) if GELU else _silu(g, LIBDEVICE)
    # Rounded before the product with up, as torch's separate ops do.
    out = act.to(gate.dtype).to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, out.to(gate.dtype), mask=mask)


@triton.jit
def _silu(g, LIBDEVICE: tl.constexpr):
    # tl.exp is a fast approximation; libdevice's expf matches torch but cannot run in the interpreter.
    exp_neg = libdevice.exp(-g) if LIBDEVICE else tl.exp(-g)
    # torch's silu: x / (1 + exp(-x)) with IEEE division.
    return tl.math.div_rn(g, 1.0 + exp_neg)


# torch's tanh-approximated GELU: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), in float32.
_GELU_BETA: tl.constexpr = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_KAPPA: tl.constexpr = tl.constexpr(0.044715)


@triton.jit
def _gelu_tanh(g, LIBDEVICE: tl.constexpr):
    inner = _GELU_BETA * (g + _GELU_KAPPA * (g * g * g))
    # libdevice's tanhf is CUDA's, as torch's kernel calls it; the interpreter has no libdevice.
    tanh = libdevice.tanh(inner) if LIBDEVICE else tanh_from_exp(inner)
    return 0.5 * g * (1.0 + tanh)


@triton.jit
def tanh_from_exp(x):
    """tanh from one exp of a non-positive argument (no overflow): no libdevice, so the interpreter runs it."""
    decay = tl.exp(-2.0 * tl.abs(x))
    return tl.where(x >= 0, 1.0, -1.0) * (1.0 - decay) / (1.0 + decay)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [..., gate | up]``: [..., 2 * I] -> new [..., I]."""
    return _gated_activation(x, gelu=False)


def _gated_activation(x: torch.Tensor, gelu: bool) -> torch.Tensor:
    """``[gate | up] -> act(gate) * up`` over the rows of ``x``."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        raise ValueError(f"the last dimension must be contiguous, got strides {tuple(x.stride())}")
    n_cols = rows.shape[1] // 2
    out = torch.empty((*x.shape[:-1], n_cols), dtype=x.dtype, device=x.device)
    block = 1024
    _gated_kernel[(rows.shape[0], triton.cdiv(n_cols, block))](
        rows, out, n_cols, rows.stride(0), GELU=gelu, LIBDEVICE=x.is_cuda, BLOCK=block, num_warps=4,
        **_TORCH_FLOAT_SEMANTICS,
    )
    return out


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` for ``x = [..., gate | up]`` (Gemma's MLP): [..., 2 * I] -> new [..., I]."""
    return _gated_activation(x, gelu=True)
