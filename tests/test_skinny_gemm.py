"""The skinny-GEMM kernel (kernels/skinny_gemm.py) against an fp32 torch matmul, and its dispatch.

GPU tests run the compiled kernel on random inputs, including inside a CUDA graph. The CPU test runs it
under the Triton interpreter in a subprocess, since TRITON_INTERPRET must be set before triton is first
imported. Without triton (it is in the dev extra) the whole module is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from pagoda_engine.kernels import skinny_gemm  # noqa: E402
from tests.conftest import run_under_interpreter  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The kernel sums in fp32 and rounds once, so it is within one rounding of the exact product; fp32 sums
# in another order than the reference.
TOLERANCE = {
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.float32: dict(rtol=1e-5, atol=1e-4),
}
SHAPES = [(1000, 1000), (4096, 1024), (1024, 3072), (6144, 1024), (24, 40)]  # (N, K)
# Split-K and a larger BLOCK_N, forced, on top of whatever default_config picks.
CONFIGS = [None, dict(SPLIT_K=3, BLOCK_N=32, BLOCK_K=64), dict(BLOCK_M=16)]


def make_inputs(m: int, n: int, k: int, dtype: torch.dtype, device: str, with_bias: bool):
    # Scaled so that outputs are O(1) whatever K is.
    x = torch.randn(m, k, dtype=dtype, device=device)
    weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    return x, weight, bias


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).to(x.dtype)


def check(m: int, n: int, k: int, dtype: torch.dtype, device: str, with_bias: bool, config: dict | None) -> None:
    x, weight, bias = make_inputs(m, n, k, dtype, device, with_bias)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    result = skinny_gemm.skinny_gemm(x, weight, bias, out=out, config=config)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, reference(x, weight, bias), **TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_matches_fp32_matmul(dtype, m, n, k):
    torch.manual_seed(m * n + k)
    check(m, n, k, dtype, "cuda", False, None)


# Few shapes: every (dtype, config, bias) is another compile.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "split3", "dot"])
def test_bias_and_forced_configs(dtype, m, config):
    torch.manual_seed(m)
    check(m, 1000, 1000, dtype, "cuda", True, config)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
def test_lm_head_shape(m):
    torch.manual_seed(m)
    check(m, 151936, 1024, torch.bfloat16, "cuda", False, None)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(1024, 3072), (6144, 1024)])
def test_replays_in_a_cuda_graph(n, k):
    """Captured once, replayed on new data written into the same buffers, with split-K (n=1024) or not."""
    torch.manual_seed(0)
    inputs = {m: make_inputs(m, n, k, torch.bfloat16, "cuda", True) for m in (1, 5)}
    for args in inputs.values():  # compiles; not allowed during capture
        skinny_gemm.skinny_gemm(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = {m: skinny_gemm.skinny_gemm(*args) for m, args in inputs.items()}
    for x, weight, bias in inputs.values():
        for buffer in (x, weight, bias):
            buffer.copy_(torch.randn_like(buffer) / 8)
    graph.replay()
    torch.cuda.synchronize()
    for m, (x, weight, bias) in inputs.items():
        torch.testing.assert_close(outputs[m], reference(x, weight, bias), **TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
def test_dispatch_on_cuda():
    x, weight, bias = make_inputs(skinny_gemm.MAX_ROWS, 256, 128, torch.bfloat16, "cuda", True)
    assert skinny_gemm.use_skinny_gemm(x, weight)
    for excluded in (torch.cat([x, x]), x.float(), torch.cat([x, x], dim=1)[:, ::2], x[None]):
        assert not skinny_gemm.use_skinny_gemm(excluded, weight.to(excluded.dtype))
    torch.testing.assert_close(skinny_gemm.linear(x, weight, bias), reference(x, weight, bias),
                               **TOLERANCE[torch.bfloat16])
    # Above the threshold F.linear runs: cuBLAS's result exactly.
    big = torch.cat([x, x])
    assert torch.equal(skinny_gemm.linear(big, weight, bias), F.linear(big, weight, bias))


def test_dispatch_falls_back_to_f_linear_on_cpu():
    x, weight, bias = make_inputs(1, 32, 16, torch.bfloat16, "cpu", True)
    assert not skinny_gemm.use_skinny_gemm(x, weight)
    assert torch.equal(skinny_gemm.linear(x, weight, bias), F.linear(x, weight, bias))


def check_under_interpreter() -> None:
    """The kernel's paths on small CPU inputs; run by the test below with TRITON_INTERPRET=1."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    # Not bf16: the interpreter truncates float32 -> bf16 casts instead of rounding them to nearest.
    for dtype in (torch.float32, torch.float16):
        for m in (1, 3):
            for config in CONFIGS:
                check(m, 40, 72, dtype, "cpu", with_bias=m == 3, config=config)
    # One row of down_proj's K: split K over 6 tiles of 512, 2 per split (no split left empty).
    check(1, 32, 3072, torch.float32, "cpu", with_bias=False, config=None)


def test_kernel_under_the_triton_interpreter():
    run_under_interpreter("tests.test_skinny_gemm")
