"""The sampler's seeded Gumbel-max draw fused into one pass over the logits (Triton).

``sampler.sample`` on the torch path builds the whole [B, V] noise tensor of ``random_noise`` (about
18 full passes over [B, V] once every hash step and float function is counted) and then takes an
argmax. Here each program reads its slice of a row once, computes the same noise on the fly from
(seed, position, token id) and keeps a running (max, argmax).

The integer hash is the torch path's bit for bit; the float part is cheaper. With ``E = -log(u)`` the
torch path's value is ``x / T - ln(E)``. The kernel ranks ``x * log2(e) / T - log2(E * log2(e))``
instead, the same value times log2(e) minus a constant, so the same token wins. That needs two
hardware ``lg2`` instructions and a short series where ``u`` is near 1 (the draws that win), in place
of libdevice's exact ``log1p``, ``log`` and a correctly rounded division, about 130 instructions per
token: 256 rows of Qwen's vocabulary took 158 us that way and 66 us this way, against a 20 us read
(H200, bench/sampling.py). The hash's integer work is most of what is left. The values differ from
the torch path's by about 1e-5 (float32 rounding, the ``lg2`` error), so the chosen tokens are the
same except on near-ties.

Rows may be split into ``num_splits`` slices so that small batches still fill the GPU; a second tiny
kernel then reduces each row's partial (max, argmax) pairs. Ties go to the lowest token id, as in
``torch.argmax``, so the split never changes the result. No host syncs: the draw can be captured in
a CUDA graph (after one warm-up call, so that the compilation happens outside the capture).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from pagoda_engine.kernels.sm_count import num_sms
from pagoda_engine.layers import sampler

# The hash constants are the sampler's own, so the two paths cannot drift apart.
_MUL: tl.constexpr = tl.constexpr(sampler._MUL)
_GOLDEN: tl.constexpr = tl.constexpr(sampler._GOLDEN)
_MASK32: tl.constexpr = tl.constexpr(sampler._MASK32)
# random_noise's scale from 32 bits to (0, 1), and its clamp below 1.
_TWO_POW_M32: tl.constexpr = tl.constexpr(2.0**-32)
_MAX_ONE_MINUS_U: tl.constexpr = tl.constexpr(1.0 - 2.0**-24)
_LOG2_E: tl.constexpr = tl.constexpr(math.log2(math.e))
# Below this 1 - u, -log2(u) comes from its series: lg2's error is absolute (about 2**-22 near 1),
# too coarse for the small exponentials that win. Four terms leave a relative error under 2**-26.
_SERIES_BELOW: tl.constexpr = tl.constexpr(2.0**-6)

# Columns per loop step of one program, and its warps (8 columns a thread): a middle-of-the-road
# choice; bench/sampling.py --sweep compares others.
BLOCK = 1024
NUM_WARPS = 4
# Split rows until there are about this many programs per SM (the kernel is bound by integer work,
# which wants every warp slot busy), but give each program at least this many blocks so that its
# per-row setup stays a small cost. 16 splits of 256 rows took 65 us where 4 per SM's 3 took 80 (H200).
_PROGRAMS_PER_SM = 16
_MIN_BLOCKS_PER_PROGRAM = 2

# Triton's CPU interpreter (TRITON_INTERPRET=1, read at import) has no libdevice; the tests use it.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _mix32(x):
    """sampler._mix32 on int64 or uint32 values.

    On uint32 the multiply wraps modulo 2**32, which is what the int64 version's mask does, and the
    mask is then a no-op; on int64 (the per-row key, where a negative seed's arithmetic shift
    matters) every step is the torch one.
    """
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK32
    return x ^ (x >> 16)


@triton.jit
def _lg2(x, HARDWARE: tl.constexpr):
    if HARDWARE:
        # The lg2.approx instruction. tl.log2 lowers to libdevice's exact log2f, which made the kernel
        # spend about 130 instructions per token (H200 PTX) instead of reading at full bandwidth.
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)  # interpreter only


@triton.jit
def _exponential_log2(one_minus_u, HARDWARE_LG2: tl.constexpr):
    """-log2(u), the Exp(1) draw -ln(u) in log2 units, for float32 1 - u in (0, 1)."""
    e = one_minus_u
    series = e * (1.0 + e * (0.5 + e * (1.0 / 3.0 + e * 0.25))) * _LOG2_E
    return tl.where(e < _SERIES_BELOW, series, -_lg2(1.0 - e, HARDWARE_LG2))


# Neither kernel is specialised on num_splits, which follows the batch size: the batch shrinks as
# sequences finish, and each new specialisation would compile in the middle of serving.
@triton.jit(do_not_specialize=["num_splits"])
def _gumbel_argmax_kernel(
    logits_ptr,
    row_stride,
    seeds_ptr,
    positions_ptr,
    temperature_ptr,
    partial_max_ptr,
    partial_idx_ptr,
    vocab_size,
    split_size,
    num_splits,
    HAS_TEMPERATURE: tl.constexpr,
    HARDWARE_LG2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)

    # The row's 32-bit key, step for step as random_noise computes it, in int64.
    seed = tl.load(seeds_ptr + row)
    position = tl.load(positions_ptr + row)
    key = _mix32(((position + _GOLDEN) & _MASK32) ^ _mix32(seed >> 32))
    key = _mix32(key ^ (seed & _MASK32)).to(tl.uint32)
    scale = _LOG2_E  # logits to log2 units, divided by the temperature
    if HAS_TEMPERATURE:
        scale = _LOG2_E / tl.load(temperature_ptr + row)

    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    lo = split * split_size
    hi = tl.minimum(lo + split_size, vocab_size)
    offsets = tl.arange(0, BLOCK)
    # Each lane keeps its own best; a lane sees increasing token ids and replaces only on a strictly
    # larger value, so it holds its first maximum. Index 0 on an all -inf row, as torch.argmax.
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        cols = start + offsets
        x = tl.load(row_ptr + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
        bits = _mix32(key ^ _mix32(cols.to(tl.uint32) + _GOLDEN))
        one_minus_u = tl.minimum((bits.to(tl.float32) + 0.5) * _TWO_POW_M32, _MAX_ONE_MINUS_U)
        # log2(E * log2(e)) = log2(E) + a constant that every token shares: the module docstring.
        value = x * scale - _lg2(_exponential_log2(one_minus_u, HARDWARE_LG2), HARDWARE_LG2)
        better = value > best
        best = tl.where(better, value, best)
        best_idx = tl.where(better, cols, best_idx)

    top = tl.max(best, axis=0)
    # The lowest token id among the lanes holding the maximum: torch.argmax's first occurrence.
    top_idx = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
    out = row * num_splits + split
    tl.store(partial_max_ptr + out, top)
    tl.store(partial_idx_ptr + out, top_idx.to(tl.int64))


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(partial_max_ptr, partial_idx_ptr, out_ptr, num_splits, BLOCK_SPLITS: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK_SPLITS)
    mask = offsets < num_splits
    base = row.to(tl.int64) * num_splits
    values = tl.load(partial_max_ptr + base + offsets, mask=mask, other=float("-inf"))
    # Padding lanes say (-inf, 0): they can only win on an all -inf row, whose answer is 0 anyway.
    indices = tl.load(partial_idx_ptr + base + offsets, mask=mask, other=0)
    top = tl.max(values, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(values == top, indices, 2147483647), axis=0))


def _max_num_splits(vocab_size: int, block: int) -> int:
    return max(1, triton.cdiv(vocab_size, block * _MIN_BLOCKS_PER_PROGRAM))


def _default_num_splits(batch: int, vocab_size: int, block: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    wanted = triton.cdiv(_PROGRAMS_PER_SM * num_sms(device), batch)
    return max(1, min(wanted, _max_num_splits(vocab_size, block)))


def gumbel_argmax(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    temperature: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """Per row, argmax over v of logits[v] / temperature + random_noise(seed, position)[v]: int64 [B].

    logits: [B, V], float32 (or 16-bit, read as float32), -inf for filtered tokens; any row stride.
    seeds, positions: [B] int64, as in SamplingMetadata. temperature: [B] float32, or None when the
    logits are already scaled. Greedy rows are the caller's business (they need no noise).
    num_splits, block, num_warps: tuning knobs (the result does not depend on them); num_splits
    defaults to enough slices per row to give every SM a few programs.
    """
    # int32 seeds or positions would shift differently from random_noise's int64 (a host-side check: no sync).
    assert seeds.dtype == positions.dtype == torch.int64, (seeds.dtype, positions.dtype)
    batch, vocab_size = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if num_splits is None:
        num_splits = _default_num_splits(batch, vocab_size, block, logits.device)
    # Whole blocks per slice, so only the row's last block is ever partial.
    split_size = triton.cdiv(triton.cdiv(vocab_size, num_splits), block) * block
    num_splits = triton.cdiv(vocab_size, split_size)

    # With one slice the partial index is already the answer: write it straight into `out`.
    partial_idx = out if num_splits == 1 else torch.empty(batch * num_splits, dtype=torch.int64, device=out.device)
    partial_max = torch.empty(batch * num_splits, dtype=torch.float32, device=out.device)
    _gumbel_argmax_kernel[(batch, num_splits)](
        logits,
        logits.stride(0),
        seeds,
        positions,
        logits if temperature is None else temperature,  # never read without a temperature
        partial_max,
        partial_idx,
        vocab_size,
        split_size,
        num_splits,
        HAS_TEMPERATURE=temperature is not None,
        HARDWARE_LG2=not _INTERPRETED,
        BLOCK=block,
        num_warps=num_warps,
    )
    if num_splits > 1:
        # One width for every split count the vocabulary allows, so one compile serves every batch.
        width = triton.next_power_of_2(max(num_splits, _max_num_splits(vocab_size, block)))
        _reduce_splits_kernel[(batch,)](partial_max, partial_idx, out, num_splits, BLOCK_SPLITS=width)
    return out
