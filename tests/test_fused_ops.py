"""The fused Triton kernels (kernels/fused_ops.py) against the torch code of the layers they replace.

GPU tests run the compiled kernels on random inputs, including inside a CUDA graph. The CPU test runs
the same kernels under the Triton interpreter in a subprocess, since TRITON_INTERPRET must be set before
triton is first imported. Without triton (it is in the dev extra) the whole module is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from pagoda_engine.kernels import fused_ops  # noqa: E402
from pagoda_engine.layers.activation import GeluTanhAndMul, SiluAndMul  # noqa: E402
from pagoda_engine.layers.norm import GemmaRMSNorm, RMSNorm  # noqa: E402
from pagoda_engine.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.conftest import run_under_interpreter  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# bf16/fp16: a rounding may flip where the fp32 sum of squares differs in its last bit, twice (the
# normalised value, then its product with the weight). fp32: a few ulps.
TOLERANCE = {
    torch.bfloat16: dict(rtol=2e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}
MAX_POSITION = 4096


def make_norm(hidden: int, dtype: torch.dtype, device: str, gemma: bool = False) -> RMSNorm:
    """Llama's RMSNorm or Gemma's (which scales by 1 + weight), its weight drawn around the identity."""
    norm = (GemmaRMSNorm if gemma else RMSNorm)(hidden, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 - norm.weight_offset + 0.5 * torch.randn(hidden))
    return norm.to(dtype)


def make_qkv(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str):
    """The fused qkv projection output and q, k as the row views the attention layer splits off."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return qkv, q, k


def random_positions(tokens: int, device: str) -> torch.Tensor:
    return torch.randint(0, MAX_POSITION, (tokens,), device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 256])
@pytest.mark.parametrize("hidden", [64, 1000, 1024, 8192])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm(dtype, tokens, hidden, with_residual, gemma):
    torch.manual_seed(tokens * hidden)
    norm = make_norm(hidden, dtype, "cuda", gemma)
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    residual = torch.randn_like(x) if with_residual else None
    ours = fused_ops.rms_norm(x, norm.weight, norm.eps, residual, gemma)
    expected = norm.forward_torch(x, residual)
    if with_residual:
        torch.testing.assert_close(ours[0], expected[0], **TOLERANCE[dtype])
        # One rounded add, as in torch: exactly equal.
        assert torch.equal(ours[1], expected[1])
    else:
        torch.testing.assert_close(ours, expected, **TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 9, 300])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rms_norm_per_head_views(dtype, tokens, head_dim):
    """[T, heads, head_dim] views into the qkv output, normalised per head: copied to rows first."""
    torch.manual_seed(tokens)
    heads, kv_heads = 16, 8
    norm = make_norm(head_dim, dtype, "cuda")
    qkv, q, k = make_qkv(tokens, heads, kv_heads, head_dim, dtype, "cuda")
    before = qkv.clone()
    for view, n in ((q, heads), (k, kv_heads)):
        per_head = view.unflatten(-1, (n, head_dim))
        torch.testing.assert_close(fused_ops.rms_norm(per_head, norm.weight, norm.eps),
                                   norm.forward_torch(per_head), **TOLERANCE[dtype])
    assert torch.equal(qkv, before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 8, 128), (14, 2, 64), (4, 1, 128), (32, 8, 64)])
@pytest.mark.parametrize("layout", ["qkv_views", "contiguous"])
def test_rotary(dtype, tokens, heads, kv_heads, head_dim, layout):
    """Row views of qkv (Llama) and separate contiguous tensors (Qwen3, after its per-head norm)."""
    torch.manual_seed(tokens * heads)
    rope = RotaryEmbedding(head_dim, MAX_POSITION, theta=1e6).to("cuda")
    qkv, q, k = make_qkv(tokens, heads, kv_heads, head_dim, dtype, "cuda")
    if layout == "contiguous":
        q, k = q.contiguous(), k.contiguous()
    positions = random_positions(tokens, "cuda")
    expected_q, expected_k = rope.forward_torch(positions, q, k)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    fused_ops.rotary_embedding_(positions, q, k, rope.cos_cache, rope.sin_cache)
    torch.testing.assert_close(q, expected_q, **TOLERANCE[dtype])
    torch.testing.assert_close(k, expected_k, **TOLERANCE[dtype])
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("heads,kv_heads,head_dim,gemma", [(16, 8, 128, False), (14, 2, 64, False),
                                                            (40, 8, 128, False), (4, 1, 256, True), (8, 4, 128, True)])
def test_rotary_with_qk_norm(dtype, tokens, heads, kv_heads, head_dim, gemma):
    """Qwen3's (and Gemma 3's) per-head q/k RMSNorm folded into the rotary kernel, in place on the qkv
    output's views."""
    torch.manual_seed(tokens * heads + 1)
    rope = RotaryEmbedding(head_dim, MAX_POSITION, theta=1e6).to("cuda")
    norms = (make_norm(head_dim, dtype, "cuda", gemma), make_norm(head_dim, dtype, "cuda", gemma))
    qkv, q, k = make_qkv(tokens, heads, kv_heads, head_dim, dtype, "cuda")
    positions = random_positions(tokens, "cuda")
    expected = reference_qk_norm_rotary(rope, norms, positions, q, k)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    ours = rope(positions, q, k, norms)
    assert ours[0].data_ptr() == q.data_ptr() and ours[1].data_ptr() == k.data_ptr(), "not in place"
    # A sum of squares that differs in its last bit may flip the rounding of a normalised value of
    # magnitude up to ~4, and the rotation's difference of two such products can be far smaller than
    # either: so an absolute bound of one flip (4 eps) besides the relative one (H200: 1 eps in fp16).
    tolerance = dict(TOLERANCE[dtype], atol=max(TOLERANCE[dtype]["atol"], 4 * torch.finfo(dtype).eps))
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, **tolerance)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)


def reference_qk_norm_rotary(rope: RotaryEmbedding, norms: tuple[RMSNorm, RMSNorm], positions: torch.Tensor,
                             q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch layers one after the other: each head normalised, then rotated."""
    per_head = [norm.forward_torch(x.unflatten(-1, (-1, rope.head_dim))).flatten(1)
                for norm, x in zip(norms, (q, k), strict=True)]
    return rope.forward_torch(positions, *per_head)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 256])
@pytest.mark.parametrize("intermediate", [1000, 3072, 11008])
def test_silu_and_mul(dtype, tokens, intermediate):
    torch.manual_seed(tokens + intermediate)
    x = 3 * torch.randn(tokens, 2 * intermediate, dtype=dtype, device="cuda")
    torch.testing.assert_close(fused_ops.silu_and_mul(x), SiluAndMul().forward_torch(x), **TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 256])
@pytest.mark.parametrize("intermediate", [1000, 6912])
def test_gelu_tanh_and_mul(dtype, tokens, intermediate):
    """Gemma's gate: torch's tanh-approximated GELU (its kernel computes in float32 and calls tanhf too)."""
    torch.manual_seed(tokens + intermediate)
    x = 3 * torch.randn(tokens, 2 * intermediate, dtype=dtype, device="cuda")
    torch.testing.assert_close(fused_ops.gelu_tanh_and_mul(x), GeluTanhAndMul().forward_torch(x),
                               **TOLERANCE[dtype])


@pytest.mark.gpu
def test_layers_use_the_kernels_on_cuda():
    torch.manual_seed(0)
    norm = make_norm(256, torch.bfloat16, "cuda")
    x, residual = torch.randn(2, 5, 256, dtype=torch.bfloat16, device="cuda")
    for ours, kernel in zip(norm(x, residual), fused_ops.rms_norm(x, norm.weight, norm.eps, residual), strict=True):
        assert torch.equal(ours, kernel)
    gemma_norm = make_norm(256, torch.bfloat16, "cuda", gemma=True)
    for ours, kernel in zip(gemma_norm(x, residual), fused_ops.rms_norm(x, gemma_norm.weight, gemma_norm.eps,
                                                                        residual, gemma=True), strict=True):
        assert torch.equal(ours, kernel)
    gate_up = torch.randn(5, 512, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(SiluAndMul()(gate_up), fused_ops.silu_and_mul(gate_up))
    assert torch.equal(GeluTanhAndMul()(gate_up), fused_ops.gelu_tanh_and_mul(gate_up))
    rope = RotaryEmbedding(64, MAX_POSITION, theta=1e4).to("cuda")
    _, q, k = make_qkv(5, 4, 2, 64, torch.bfloat16, "cuda")
    rotated_q, rotated_k = rope(random_positions(5, "cuda"), q, k)
    assert rotated_q.data_ptr() == q.data_ptr() and rotated_k.data_ptr() == k.data_ptr(), "not rotated in place"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kernels_replay_in_a_cuda_graph(dtype):
    """Captured once, replayed on new data written into the same input buffers."""
    torch.manual_seed(0)
    tokens, heads, kv_heads, head_dim, hidden, intermediate = 5, 16, 8, 128, 1024, 3072
    norm, q_norm = make_norm(hidden, dtype, "cuda"), make_norm(head_dim, dtype, "cuda")
    rope = RotaryEmbedding(head_dim, MAX_POSITION, theta=1e6).to("cuda")
    act = SiluAndMul()
    x, residual = torch.randn(2, tokens, hidden, dtype=dtype, device="cuda")
    qkv, q, k = make_qkv(tokens, heads, kv_heads, head_dim, dtype, "cuda")
    positions = random_positions(tokens, "cuda")
    gate_up = torch.randn(tokens, 2 * intermediate, dtype=dtype, device="cuda")

    def step():
        normed, summed = norm(x, residual)
        q_normed = q_norm(q.unflatten(-1, (heads, head_dim)))
        rope(positions, q, k)
        return normed, summed, q_normed, act(gate_up)

    step()  # compiles the kernels; compilation cannot happen during capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    for buffer in (x, residual, qkv, gate_up):
        buffer.copy_(torch.randn_like(buffer))
    positions.copy_(random_positions(tokens, "cuda"))
    expected = (*norm.forward_torch(x, residual), q_norm.forward_torch(q.unflatten(-1, (heads, head_dim))),
                *rope.forward_torch(positions, q, k), act.forward_torch(gate_up))
    graph.replay()
    torch.cuda.synchronize()
    normed, summed, q_normed, activated = outputs
    for ours, reference in zip((normed, summed, q_normed, q, k, activated), expected, strict=True):
        torch.testing.assert_close(ours, reference, **TOLERANCE[dtype])


def check_under_interpreter() -> None:
    """Every kernel on small CPU inputs; run by the test below with TRITON_INTERPRET=1."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    # Not bf16: the interpreter truncates float32 -> bf16 casts instead of rounding them to nearest.
    for dtype in (torch.float32, torch.float16):
        tolerance = TOLERANCE[dtype]
        norm = make_norm(100, dtype, "cpu")
        x, residual = torch.randn(2, 3, 100, dtype=dtype)
        torch.testing.assert_close(fused_ops.rms_norm(x, norm.weight, norm.eps), norm.forward_torch(x), **tolerance)
        ours, expected = fused_ops.rms_norm(x, norm.weight, norm.eps, residual), norm.forward_torch(x, residual)
        torch.testing.assert_close(ours[0], expected[0], **tolerance)
        assert torch.equal(ours[1], expected[1])

        heads, kv_heads, head_dim = 6, 2, 16
        q_norm = make_norm(head_dim, dtype, "cpu")
        qkv, q, k = make_qkv(3, heads, kv_heads, head_dim, dtype, "cpu")
        per_head = q.unflatten(-1, (heads, head_dim))
        torch.testing.assert_close(fused_ops.rms_norm(per_head, q_norm.weight, q_norm.eps),
                                   q_norm.forward_torch(per_head), **tolerance)
        rope = RotaryEmbedding(head_dim, MAX_POSITION, theta=1e4)
        positions = random_positions(3, "cpu")
        expected_q, expected_k = rope.forward_torch(positions, q, k)
        v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
        fused_ops.rotary_embedding_(positions, q, k, rope.cos_cache, rope.sin_cache)
        torch.testing.assert_close(q, expected_q, **tolerance)
        torch.testing.assert_close(k, expected_k, **tolerance)
        assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)

        norms = (q_norm, make_norm(head_dim, dtype, "cpu"))
        expected_q, expected_k = reference_qk_norm_rotary(rope, norms, positions, q, k)
        fused_ops.rotary_embedding_(positions, q, k, rope.cos_cache, rope.sin_cache,
                                    (norms[0].weight, norms[1].weight), q_norm.eps)
        torch.testing.assert_close(q, expected_q, **tolerance)
        torch.testing.assert_close(k, expected_k, **tolerance)

        gate_up = 3 * torch.randn(3, 2 * 1100, dtype=dtype)
        torch.testing.assert_close(fused_ops.silu_and_mul(gate_up), SiluAndMul().forward_torch(gate_up), **tolerance)
        # 1 + tanh cancels for very negative gates, where this tanh and the CPU's differ by an ulp: outputs of
        # about 1e-6 then differ by as much (on CUDA the kernel calls the tanhf torch's kernel calls).
        torch.testing.assert_close(fused_ops.gelu_tanh_and_mul(gate_up), GeluTanhAndMul().forward_torch(gate_up),
                                   **dict(tolerance, atol=1e-5))

        # Gemma's norms: 1 + weight, one rounding; alone, with the residual add, and folded into the rotary.
        gemma = make_norm(100, dtype, "cpu", gemma=True)
        torch.testing.assert_close(fused_ops.rms_norm(x, gemma.weight, gemma.eps, gemma=True), gemma.forward_torch(x),
                                   **tolerance)
        ours, expected = fused_ops.rms_norm(x, gemma.weight, gemma.eps, residual, gemma=True), gemma.forward_torch(
            x, residual)
        torch.testing.assert_close(ours[0], expected[0], **tolerance)
        assert torch.equal(ours[1], expected[1])
        gemma_norms = (make_norm(head_dim, dtype, "cpu", gemma=True), make_norm(head_dim, dtype, "cpu", gemma=True))
        expected_q, expected_k = reference_qk_norm_rotary(rope, gemma_norms, positions, q, k)
        fused_ops.rotary_embedding_(positions, q, k, rope.cos_cache, rope.sin_cache,
                                    (gemma_norms[0].weight, gemma_norms[1].weight), gemma_norms[0].eps, gemma=True)
        torch.testing.assert_close(q, expected_q, **tolerance)
        torch.testing.assert_close(k, expected_k, **tolerance)


def test_kernels_under_the_triton_interpreter():
    run_under_interpreter("tests.test_fused_ops")
