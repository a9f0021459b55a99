"""The fused Gumbel-max kernel (pagoda_engine.kernels.sampling) against the torch draw it replaces.

The reference is ``random_noise(...) + logits`` then ``argmax``. The kernel's integer hash is the
same bit for bit, but it ranks the values in log2 units with the hardware's approximate ``lg2`` (about
1e-5 off), so tokens must match exactly wherever the reference's top two values are more than 1e-4
apart, and on >= 99.9% of rows overall.
The GPU tests need CUDA and Triton; the interpreter test runs the same kernel on the CPU under
TRITON_INTERPRET=1 (skipped without Triton, as in CI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pagoda_engine.layers import sampler
from pagoda_engine.layers.sampler import Sampler, SamplerRequest, SamplingMetadata, random_noise
from pagoda_engine.sampling_params import SamplingParams

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
CLEAR_GAP = 1e-4
QWEN_VOCAB = 151_936


def make_case(batch: int, vocab: int, seed: int = 0, device: str = "cpu"):
    """Random logits, seeds and positions, with rows like the filters leave them (mostly -inf)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3.0
    # Every third row keeps about a tenth of its tokens, as top_k/top_p/min_p would.
    filtered = (torch.rand(batch, vocab, generator=g) < 0.9) & (torch.arange(batch) % 3 == 2).unsqueeze(1)
    logits[filtered] = float("-inf")
    if batch > 1:  # a row with a single finite logit must pick it, noise or not
        logits[1] = float("-inf")
        logits[1, int(torch.randint(vocab, (1,), generator=g))] = 1.5
    # Seeds over the whole int64 range: the per-row key uses arithmetic shifts of negative seeds too.
    seeds = torch.randint(-(2**63), 2**63 - 1, (batch,), generator=g, dtype=torch.int64)
    seeds[: min(batch, 3)] = torch.tensor([0, 1, 2**32 + 7][: min(batch, 3)])
    positions = torch.randint(0, 5000, (batch,), generator=g, dtype=torch.int64)
    return logits.to(device), seeds.to(device), positions.to(device)


def reference(logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, temperature=None):
    """The torch path's tokens, and each row's gap between its two best noisy values."""
    scaled = logits.float() if temperature is None else logits.float() / temperature.unsqueeze(1)
    values = random_noise(seeds, positions, logits.shape[1]).add_(scaled)
    if logits.shape[1] == 1:
        return values.argmax(-1), torch.full((logits.shape[0],), float("inf"), device=logits.device)
    top2 = values.topk(2, dim=-1).values
    return values.argmax(-1), top2[:, 0] - top2[:, 1]


def assert_same_draw(got: torch.Tensor, expected: torch.Tensor, gap: torch.Tensor, label: object = "") -> None:
    assert got.dtype == torch.int64 and got.shape == expected.shape, label
    clear = gap > CLEAR_GAP  # -inf second best gives +inf: clear
    mismatched = (got != expected) & clear
    assert not mismatched.any(), f"{label}: rows {mismatched.nonzero().flatten().tolist()[:10]} differ"
    assert (got == expected).float().mean().item() >= 0.999, label


# ---- on the GPU ----

SHAPES = [(1, QWEN_VOCAB), (3, 1), (7, 1000), (5, 1023), (64, 4097), (256, QWEN_VOCAB), (300, 5000)]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,vocab", SHAPES)
def test_kernel_matches_torch_draw(batch, vocab):
    pytest.importorskip("triton")
    from pagoda_engine.kernels.sampling import gumbel_argmax

    logits, seeds, positions = make_case(batch, vocab, seed=batch * 7 + vocab, device="cuda")
    expected, gap = reference(logits, seeds, positions)
    got = gumbel_argmax(logits, seeds, positions)
    assert_same_draw(got, expected, gap)
    # Slicing rows differently only regroups a max with first-index ties: the same tokens exactly.
    for num_splits in (1, 3, 64):
        assert torch.equal(gumbel_argmax(logits, seeds, positions, num_splits=num_splits), got)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,vocab", [(1, QWEN_VOCAB), (64, 4097), (256, QWEN_VOCAB)])
def test_kernel_divides_by_temperature(batch, vocab):
    pytest.importorskip("triton")
    from pagoda_engine.kernels.sampling import gumbel_argmax

    logits, seeds, positions = make_case(batch, vocab, seed=1, device="cuda")
    temperature = torch.rand(batch, device="cuda") * 1.5 + 0.05
    expected, gap = reference(logits, seeds, positions, temperature)
    assert_same_draw(gumbel_argmax(logits, seeds, positions, temperature), expected, gap)


@pytest.mark.gpu
def test_kernel_reads_bf16_and_strided_rows():
    pytest.importorskip("triton")
    from pagoda_engine.kernels.sampling import gumbel_argmax

    wide, seeds, positions = make_case(32, 3000, seed=2, device="cuda")
    logits = wide[:, :2500]  # row stride 3000, as a view into a padded vocabulary would be
    expected, gap = reference(logits, seeds, positions)
    assert_same_draw(gumbel_argmax(logits, seeds, positions), expected, gap)
    half = logits.bfloat16()
    expected, gap = reference(half, seeds, positions)
    assert_same_draw(gumbel_argmax(half, seeds, positions), expected, gap)


@pytest.mark.gpu
def test_kernel_empty_batch():
    pytest.importorskip("triton")
    from pagoda_engine.kernels.sampling import gumbel_argmax

    empty = torch.empty(0, dtype=torch.int64, device="cuda")
    out = gumbel_argmax(torch.empty(0, 100, device="cuda"), empty, empty)
    assert out.shape == (0,) and out.dtype == torch.int64


@pytest.mark.gpu
def test_kernel_in_cuda_graph():
    pytest.importorskip("triton")
    from pagoda_engine.kernels.sampling import gumbel_argmax

    logits, seeds, positions = make_case(64, QWEN_VOCAB, seed=3, device="cuda")
    temperature = torch.full((64,), 0.6, device="cuda")
    gumbel_argmax(logits, seeds, positions, temperature)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gumbel_argmax(logits, seeds, positions, temperature)
    # New inputs in the captured buffers: the replay must draw for them, not for the captured ones.
    fresh, fresh_seeds, fresh_positions = make_case(64, QWEN_VOCAB, seed=4, device="cuda")
    logits.copy_(fresh)
    seeds.copy_(fresh_seeds)
    positions.copy_(fresh_positions)
    graph.replay()
    expected, gap = reference(fresh, fresh_seeds, fresh_positions, temperature)
    assert_same_draw(out, expected, gap)


def _requests(batch: int, **params) -> list[SamplerRequest]:
    return [SamplerRequest(SamplingParams(**params), 1000 + i, [1, 2, 3] + [4] * i, 3, []) for i in range(batch)]


def count_kernel_calls(monkeypatch) -> list[int]:
    """Wraps the sampler's fused kernel: the returned list gets each call's argument count."""
    kernel = sampler._fused_gumbel_argmax()
    calls: list[int] = []

    def counted(*args):
        calls.append(len(args))
        return kernel(*args)

    monkeypatch.setattr(sampler, "_fused_gumbel_argmax", lambda: counted)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("params", [
    dict(temperature=0.6),  # the offline benchmark's: the kernel also divides by the temperature
    dict(temperature=0.8, top_k=50),
    dict(temperature=1.0, top_p=0.9, min_p=0.01),
], ids=["temperature", "top_k", "top_p_min_p"])
def test_sampler_uses_kernel_on_cuda(monkeypatch, params):
    pytest.importorskip("triton")
    batch = 64
    logits = make_case(batch, QWEN_VOCAB, seed=5)[0].cuda()
    logits[logits.isinf()] = -20.0  # raw model logits are finite
    requests = _requests(batch, **params)
    requests[5] = SamplerRequest(SamplingParams(temperature=0.0), 7, [1, 2], 1, [])  # a greedy row too
    meta = SamplingMetadata.build(requests, QWEN_VOCAB, "cuda")

    calls = count_kernel_calls(monkeypatch)
    fused = Sampler()(logits, meta).sampled_token_ids
    # With no filter on, the kernel also takes the temperature (4 arguments); else pre-scaled logits.
    assert calls == [4 if params.keys() == {"temperature"} else 3]
    monkeypatch.setattr(sampler, "_fused_gumbel_argmax", lambda: None)
    unfused = Sampler()(logits, meta).sampled_token_ids
    assert fused[5].item() == logits[5].argmax().item()
    assert (fused == unfused).float().mean().item() >= 0.999


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "params", "num_args"), [
    (torch.bfloat16, dict(temperature=0.7, logit_bias={17: 100.0, 18: -2.0}), 4),  # float32 now, divided as read
    (torch.bfloat16, dict(temperature=0.9, allowed_token_ids=[17, 300, 151_000]), 4),  # still 16-bit, masked
    (torch.float32, dict(top_k=20, logit_bias={17: 100.0}, allowed_token_ids=[17, 18, 300]), 3),  # filtered
], ids=["bias", "allowlist", "both+top_k"])
def test_sampler_with_bias_and_allowlist_uses_kernel_on_cuda(monkeypatch, dtype, params, num_args):
    """The fused Gumbel draw sees the biased, restricted logits: the same tokens as the torch draw of the
    same logits, the forced token on every row a +100 bias forces, and only allowed ids elsewhere."""
    pytest.importorskip("triton")
    batch = 64
    logits = make_case(batch, QWEN_VOCAB, seed=6)[0]
    logits[logits.isinf()] = -20.0
    logits = logits.to(dtype).cuda()
    requests = _requests(batch, **params)
    requests[5] = SamplerRequest(SamplingParams(temperature=0.0, **{k: v for k, v in params.items()
                                                                     if k != "temperature"}), 7, [1, 2], 1, [])
    requests[6] = SamplerRequest(SamplingParams(temperature=0.8), 8, [1, 2], 1, [])  # asks for neither
    meta = SamplingMetadata.build(requests, QWEN_VOCAB, "cuda")
    calls = count_kernel_calls(monkeypatch)
    fused = Sampler()(logits, meta).sampled_token_ids
    assert calls == [num_args]
    monkeypatch.setattr(sampler, "_fused_gumbel_argmax", lambda: None)
    assert (fused == Sampler()(logits, meta).sampled_token_ids).float().mean().item() >= 0.999
    rows = [i for i in range(batch) if i != 6]
    if params.get("logit_bias", {}).get(17) == 100.0:
        assert fused[rows].tolist() == [17] * len(rows)
    if "allowed_token_ids" in params:
        assert set(fused[rows].tolist()) <= set(params["allowed_token_ids"])
    alone = Sampler()(logits[6:7], SamplingMetadata.build([requests[6]], QWEN_VOCAB, "cuda")).sampled_token_ids
    assert fused[6] == alone[0]


# ---- on the CPU, under Triton's interpreter ----

_INTERPRETER_SCRIPT = textwrap.dedent("""
    import inspect
    import json
    import torch
    import triton.runtime.interpreter as interpreter

    # Triton 3.6's interpreter calls int() on 1-element arrays, which NumPy >= 2.4 refuses
    # (triton-lang/triton#9171); take the element first. Harmless where already fixed.
    _patch = getattr(interpreter, "_patch_lang_tensor", None)
    if _patch is not None and "scope" in inspect.signature(_patch).parameters:
        def _patch_lang_tensor(tensor, scope):
            _patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
        interpreter._patch_lang_tensor = _patch_lang_tensor

    from pagoda_engine.kernels.sampling import gumbel_argmax
    from tests.test_sampling_kernel import make_case, reference

    results = []
    for batch, vocab, num_splits, temperature, dtype in [
        (16, 2500, 1, False, torch.float32),
        (16, 2500, 3, False, torch.float32),  # row slices and the second, reducing kernel
        (6, 1, 1, False, torch.float32),
        (5, 1023, 2, True, torch.float32),
        (4, 1500, 2, False, torch.bfloat16),
    ]:
        logits, seeds, positions = make_case(batch, vocab, seed=batch + vocab)
        logits = logits.to(dtype)
        t = torch.rand(batch) + 0.3 if temperature else None
        expected, gap = reference(logits, seeds, positions, t)
        got = gumbel_argmax(logits, seeds, positions, t, num_splits=num_splits, block=512)
        results.append(dict(case=[batch, vocab, num_splits, temperature, str(dtype)], got=got.tolist(),
                            expected=expected.tolist(), gap=gap.tolist()))
    print(json.dumps(results))
""")


@needs_triton
def test_kernel_under_interpreter_matches_torch_draw():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.path.join(root, "services", "engine"),
                                                      env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for result in json.loads(done.stdout.strip().splitlines()[-1]):
        got, expected, gap = (torch.tensor(result[k]) for k in ("got", "expected", "gap"))
        assert_same_draw(got, expected, gap, result["case"])
