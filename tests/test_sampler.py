"""Sampler tests on the CPU: each feature against a straightforward per-row Python reference."""

from __future__ import annotations

import math

import pytest
import torch

from pagoda_engine.layers.sampler import (
    Sampler,
    SamplerRequest,
    SamplingMetadata,
    _mix32,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    random_noise,
)
from pagoda_engine.sampling_params import SamplingParams
from pagoda_engine.sequence import Sequence

V = 64


def req(seed: int = 0, prompt=(1, 2, 3), output=(), stop=(), **params) -> SamplerRequest:
    return SamplerRequest(SamplingParams(**params), seed, list(prompt) + list(output), len(prompt), list(stop))


def run(logits: torch.Tensor, requests: list[SamplerRequest]):
    return Sampler()(logits, SamplingMetadata.build(requests, logits.shape[-1], logits.device))


def random_logits(batch: int, vocab: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def chi2_critical(df: int, z: float = 3.72) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.72: about p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# ---- greedy, logprobs, dtypes ----


def test_greedy_is_argmax():
    logits = random_logits(8)
    out = run(logits, [req(seed=i, temperature=0.0) for i in range(8)])
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_ids is None


def test_tiny_temperature_is_greedy():
    logits = random_logits(4, scale=30.0)
    out = run(logits, [req(seed=i, temperature=1e-9, top_p=0.5, min_p=0.1) for i in range(4)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_logprobs_are_raw_log_softmax_and_sorted():
    logits = random_logits(4)
    requests = [req(seed=i, temperature=0.8, logprobs=5, repetition_penalty=1.5, top_k=3, output=[7, 7])
                for i in range(3)] + [req(seed=9, temperature=0.0)]
    out = run(logits, requests)
    expected = torch.log_softmax(logits.double(), -1).float()
    chosen = expected.gather(1, out.sampled_token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, chosen)
    assert out.top_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    torch.testing.assert_close(out.top_logprobs, expected.gather(1, out.top_ids))
    assert torch.equal(out.top_ids, logits.argsort(-1, descending=True)[:, :5])
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_logprobs_zero_gives_chosen_only():
    out = run(random_logits(2), [req(logprobs=0), req(seed=1)])
    assert out.logprobs.shape == (2,) and out.top_ids.shape == (2, 0)


@pytest.mark.parametrize("params", [
    dict(top_p=0.9, logprobs=2),
    dict(),  # unfiltered: the GPU's fused draw reads the 16-bit logits as they are
    dict(repetition_penalty=1.5, presence_penalty=0.5, logprobs=1),
    dict(min_tokens=3, top_k=5),
    dict(logit_bias={4: 2.5, 11: -1.0}, logprobs=2),
    dict(allowed_token_ids=[3, 5, 8, 13]),  # no float32 arithmetic: the 16-bit logits are masked as they are
], ids=["top_p+logprobs", "plain", "penalties", "suppress+top_k", "bias", "allowlist"])
def test_bf16_logits_give_what_their_float32_copy_gives(params):
    """The sampler keeps logits in the model's dtype until it needs float32 arithmetic: same tokens and
    logprobs as when handed the float32 copy."""
    logits = random_logits(6).bfloat16()
    requests = [req(seed=i, temperature=t, output=(5, 7), stop=(9,), **params)
                for i, t in enumerate([0.0, 0.7, 1.0] * 2)]
    out16, out32 = run(logits, requests), run(logits.float(), requests)
    assert torch.equal(out16.sampled_token_ids, out32.sampled_token_ids)
    if out32.logprobs is not None:
        assert out16.logprobs.dtype == torch.float32
        assert torch.equal(out16.logprobs, out32.logprobs) and torch.equal(out16.top_logprobs, out32.top_logprobs)
    greedy = [req(seed=i, temperature=0.0) for i in range(6)]
    assert torch.equal(run(logits, greedy).sampled_token_ids, logits.float().argmax(-1))


def test_float32_input_is_not_modified():
    logits = random_logits(2)
    before = logits.clone()
    run(logits, [req(stop=[3], min_tokens=2, repetition_penalty=2.0, presence_penalty=1.0, temperature=0.5,
                     top_p=0.5, min_p=0.1, top_k=5, output=[4])] * 2)
    assert torch.equal(logits, before)
    # float32 logits need no conversion, so the bias and the allowlist have the model's own tensor in hand.
    for greedy in (True, False):
        run(logits, [req(temperature=0.0 if greedy else 1.0, logit_bias={1: 5.0}, allowed_token_ids=[1, 2])] * 2)
        run(logits, [req(temperature=0.0 if greedy else 1.0, allowed_token_ids=[1, 2]), req()])
    assert torch.equal(logits, before)


# ---- the draw ----


def test_temperature_sampling_matches_softmax():
    vocab, draws, temperature = 8, 40_000, 0.7
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.5]])
    # Half the draws vary the seed, half the output position: both must look like independent draws.
    half = draws // 2
    meta = SamplingMetadata.build([req(seed=s, temperature=temperature) for s in range(half)]
                                  + [req(seed=123, temperature=temperature)] * half, vocab, "cpu")
    # Positions set directly: building 20,000 output lists of growing length would dominate the test.
    meta.positions = torch.cat([torch.zeros(half, dtype=torch.int64), torch.arange(half)])
    tokens = Sampler()(logits.expand(draws, vocab), meta).sampled_token_ids
    expected = torch.softmax(logits[0].double() / temperature, -1) * draws
    observed = torch.bincount(tokens, minlength=vocab).double()
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_critical(vocab - 1), (observed, expected)


def test_noise_is_gumbel_distributed():
    noise = random_noise(torch.arange(200), torch.zeros(200, dtype=torch.int64), 1000).double().flatten()
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6.
    assert abs(noise.mean().item() - 0.5772) < 0.01
    assert abs(noise.var().item() - math.pi**2 / 6) < 0.03
    assert noise.isfinite().all()


def test_hash_matches_python_integers():
    """The RNG's integer part is defined by plain 32-bit arithmetic, so every device must agree with it."""

    def mix(x: int) -> int:
        x = (((x >> 16) ^ x) * 0x045D9F3B) % 2**32
        x = (((x >> 16) ^ x) * 0x045D9F3B) % 2**32
        return (x >> 16) ^ x

    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert _mix32(torch.tensor(values)).tolist() == [mix(v) for v in values]
    # A bijection on 32 bits: distinct inputs, distinct outputs.
    assert len(set(_mix32(torch.arange(100_000)).tolist())) == 100_000


def test_same_seed_same_token_whatever_the_batch():
    vocab = 1000
    logits = random_logits(1, vocab, scale=1.0)
    target = req(seed=42, output=[5] * 7, temperature=1.0, top_p=0.95)
    alone = run(logits, [target]).sampled_token_ids.item()
    for others in range(1, 6):
        filler = [req(seed=1000 + j, temperature=0.0 if j % 2 else 0.5, top_k=10, repetition_penalty=1.3)
                  for j in range(others)]
        batch = filler[:others // 2] + [target] + filler[others // 2:]
        batch_logits = torch.cat([random_logits(others, vocab, seed=others), logits])
        row = others // 2
        batch_logits = torch.cat([batch_logits[:row], logits, batch_logits[row:-1]])
        assert run(batch_logits, batch).sampled_token_ids[row].item() == alone


def test_resumed_request_draws_the_same_tokens():
    """A preempted request rebuilt from scratch must continue exactly as it would have."""
    vocab = 500
    logits = random_logits(12, vocab, scale=0.5)
    output: list[int] = []
    for step in range(12):
        token = run(logits[step : step + 1], [req(seed=7, output=output, temperature=1.0)]).sampled_token_ids
        output.append(token.item())
    replay = [run(logits[s : s + 1], [req(seed=7, output=output[:s], temperature=1.0)]).sampled_token_ids.item()
              for s in range(12)]
    assert replay == output


def test_different_seeds_and_positions_differ():
    vocab = 1000
    logits = torch.zeros(64, vocab)  # uniform: every draw is pure noise
    by_seed = run(logits, [req(seed=s) for s in range(64)]).sampled_token_ids
    by_position = run(logits, [req(seed=3, output=[0] * p) for p in range(64)]).sampled_token_ids
    assert len(set(by_seed.tolist())) > 55
    assert len(set(by_position.tolist())) > 55
    huge = run(logits[:2], [req(seed=2**63 - 1), req(seed=2**63 - 1 - 2**32)]).sampled_token_ids
    assert huge[0] != huge[1]  # the seed's high half matters too


def test_mixed_greedy_and_sampled_rows():
    logits = random_logits(6, scale=1.0)
    requests = [req(seed=i, temperature=0.0 if i % 2 == 0 else 1.0, top_k=5) for i in range(6)]
    tokens = run(logits, requests).sampled_token_ids
    for i, r in enumerate(requests):
        if i % 2 == 0:
            assert tokens[i] == logits[i].argmax()
        assert tokens[i] == run(logits[i : i + 1], [r]).sampled_token_ids[0]
    # With these logits the sampled rows do not all fall on the argmax (the test would be vacuous).
    assert any(tokens[i] != logits[i].argmax() for i in range(1, 6, 2))


# ---- filters ----


def reference_keep(row: torch.Tensor, temperature: float, min_p: float, top_k: int, top_p: float) -> set[int]:
    """The tokens a row may draw, filter by filter, in float64 with plain Python."""
    probs = torch.softmax(row.double() / temperature, -1).tolist()
    keep = set(range(len(probs)))
    if min_p > 0:
        keep = {t for t in keep if probs[t] >= min_p * max(probs)}
    if 0 < top_k < len(probs):
        keep = set(sorted(keep, key=lambda t: -probs[t])[:top_k])
    if top_p < 1:
        total, kept, mass = sum(probs[t] for t in keep), set(), 0.0
        for t in sorted(keep, key=lambda t: -probs[t]):
            kept.add(t)
            mass += probs[t] / total
            if mass >= top_p:
                break
        keep = kept
    return keep


FILTER_CASES = [
    dict(top_k=1), dict(top_k=5), dict(top_k=V + 10), dict(top_p=0.5), dict(top_p=0.05), dict(top_p=0.999),
    dict(min_p=0.1), dict(min_p=0.9), dict(top_k=10, top_p=0.6), dict(min_p=0.05, top_k=20, top_p=0.8),
    dict(temperature=0.3, top_p=0.7), dict(temperature=2.0, min_p=0.2, top_k=7), dict(),
]


@pytest.mark.parametrize("mix", [False, True], ids=["one-filter-per-batch", "all-in-one-batch"])
def test_filters_keep_the_reference_sets(mix):
    logits = random_logits(len(FILTER_CASES), seed=5)
    requests = [req(seed=i, **case) for i, case in enumerate(FILTER_CASES)]
    batches = [list(range(len(requests)))] if mix else [[i] for i in range(len(requests))]
    for rows in batches:
        meta = SamplingMetadata.build([requests[i] for i in rows], V, "cpu")
        filtered = logits[rows] / meta.temperature[:, None]
        if meta.any_min_p:
            filtered = apply_min_p(filtered, meta.min_p)
        if meta.any_top_k or meta.any_top_p:
            filtered = apply_top_k_top_p(filtered, meta.top_k, meta.max_top_k, meta.top_p)
        for j, i in enumerate(rows):
            p = requests[i].params
            expected = reference_keep(logits[i], p.temperature, p.min_p, p.top_k, p.top_p)
            assert set(filtered[j].isfinite().nonzero().flatten().tolist()) == expected, FILTER_CASES[i]


def test_sampling_never_picks_a_filtered_token_and_reaches_every_kept_one():
    draws = 3000
    for case in FILTER_CASES[:-1]:
        row = random_logits(1, seed=11, scale=1.5)
        p = SamplingParams(**case)
        expected = reference_keep(row[0], p.temperature, p.min_p, p.top_k, p.top_p)
        tokens = run(row.expand(draws, V), [req(seed=s, **case) for s in range(draws)]).sampled_token_ids
        picked = set(tokens.tolist())
        assert picked <= expected, case
        if len(expected) <= 10:
            assert picked == expected, case


def test_no_full_sort_without_top_p():
    logits = random_logits(4, vocab=5000)
    requests = [req(seed=i, top_k=20, min_p=0.01, repetition_penalty=1.2) for i in range(4)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(logits, requests)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::sort" not in ops and "aten::topk" in ops


def test_the_common_path_launches_nothing_for_bias_or_allowlist():
    """Without a row that asks for them, no index kernel runs: the forward is what it was before they existed."""
    logits = random_logits(4)
    requests = [req(seed=i, temperature=[0.0, 0.7][i % 2], top_k=5) for i in range(4)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(logits, requests)
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::index_add", "aten::index_copy_", "aten::index_select", "aten::index_fill"}, ops
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(logits, [*requests[:3], req(seed=3, logit_bias={1: 1.0}, allowed_token_ids=[1, 2])])
    assert {"aten::index_add", "aten::index_copy_"} <= {e.key for e in prof.key_averages()}


def test_flags_skip_unused_work():
    neutral = SamplingMetadata.build([req(temperature=0.0, top_k=5, top_p=0.5, min_p=0.5)], V, "cpu")
    assert neutral.all_greedy and not (neutral.any_top_k or neutral.any_top_p or neutral.any_min_p)
    assert not neutral.any_penalties and neutral.repetition_penalty is None and neutral.suppress_index is None
    assert neutral.bias_index is neutral.bias is neutral.allowed_rows is neutral.allowed_index is None
    assert neutral.max_num_logprobs is None
    meta = SamplingMetadata.build([req(top_k=V), req(top_k=3, logprobs=2), req(logprobs=4, temperature=0.0)],
                                  V, "cpu")
    assert meta.any_top_k and meta.max_top_k == 3 and meta.top_k.tolist() == [0, 3, 0]
    assert not meta.any_top_p and meta.top_p is None and meta.max_num_logprobs == 4
    assert meta.greedy.tolist() == [False, False, True] and meta.temperature.tolist() == [1.0, 1.0, 1.0]



@pytest.mark.parametrize("batch", [1, 2, 3])
def test_every_metadata_tensor_starts_16_byte_aligned(batch):
    """The sampling kernels would compile a second variant at the first batch of the other parity."""
    requests = [req(seed=i, output=(4,) * i, stop=(5,), top_k=3, top_p=0.5, min_p=0.1, repetition_penalty=1.2,
                    temperature=0.0 if i == 1 else 0.7, min_tokens=4, logit_bias={7: 1.0} if i != 1 else {},
                    allowed_token_ids=list(range(i + 1, 9))) for i in range(batch)]
    meta = SamplingMetadata.build(requests, V, "cpu")
    views = [meta.seeds, meta.positions, meta.top_k, meta.prompt_index, meta.output_index, meta.suppress_index,
             meta.bias_index, meta.bias, meta.allowed_rows, meta.allowed_index]
    assert all(v is not None for v in views)
    assert [v.storage_offset() * v.element_size() % 16 for v in views] == [0] * len(views)
    assert meta.seeds.tolist() == list(range(batch))
    assert meta.top_k.tolist() == [0 if i == 1 else 3 for i in range(batch)]  # row 1 is greedy


# ---- penalties and min_tokens ----


def reference_penalties(row: list[float], r: SamplerRequest) -> list[float]:
    p, out = r.params, list(row)
    for t in set(r.prompt_token_ids) | set(r.output_token_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(r.output_token_ids):
        out[t] -= p.presence_penalty + p.frequency_penalty * r.output_token_ids.count(t)
    return out


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(3)
    settings = [dict(repetition_penalty=1.5), dict(repetition_penalty=0.7), dict(presence_penalty=1.2),
                dict(frequency_penalty=0.6), dict(frequency_penalty=-0.5, presence_penalty=-1.0),
                dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4), dict()]
    requests = [
        req(seed=i, temperature=0.0, prompt=torch.randint(0, V, (20,), generator=g).tolist(),
            output=torch.randint(0, V, (15,), generator=g).tolist(), **s)
        for i, s in enumerate(settings)
    ]
    logits = random_logits(len(requests), seed=4)
    meta = SamplingMetadata.build(requests, V, "cpu")
    penalized = apply_penalties(logits, meta)
    expected = torch.tensor([reference_penalties(logits[i].tolist(), r) for i, r in enumerate(requests)])
    torch.testing.assert_close(penalized, expected)
    # The presence/frequency-only rows must leave prompt-only tokens alone.
    row, r = 2, requests[2]
    untouched = [t for t in range(V) if t not in r.output_token_ids]
    assert torch.equal(penalized[row, untouched], logits[row, untouched])
    # And the greedy choice follows the penalized logits.
    assert torch.equal(Sampler()(logits, meta).sampled_token_ids, expected.argmax(-1))


def test_min_tokens_suppresses_stop_ids():
    logits = torch.zeros(4, V)
    logits[:, 2] = 10.0  # EOS
    logits[:, 9] = 9.0  # a request's stop token id
    logits[:, 20] = 5.0
    requests = [
        req(temperature=0.0, stop=[2, 9], min_tokens=3, output=[1, 1]),  # still under min_tokens
        req(temperature=0.0, stop=[2, 9], min_tokens=3, output=[1, 1, 1]),  # reached it
        req(temperature=0.0, stop=[2], min_tokens=1),  # only EOS suppressed
        req(seed=1, temperature=1.0, stop=[2, 9], min_tokens=5, output=[4]),
    ]
    tokens = run(logits, requests).sampled_token_ids.tolist()
    assert tokens[:3] == [20, 2, 9]
    assert tokens[3] not in (2, 9)
    many = run(logits[:1].expand(500, V) * 0.3, [req(seed=s, stop=[2, 9], min_tokens=1) for s in range(500)])
    assert not set(many.sampled_token_ids.tolist()) & {2, 9}


def test_stop_ids_past_the_vocabulary_are_ignored():
    logits = torch.zeros(2, V)
    logits[:, 2] = 5.0
    out = run(logits, [req(temperature=0.0, stop=[V + 2], min_tokens=3), req(temperature=0.0)])
    assert out.sampled_token_ids.tolist() == [2, 2]


# ---- logit_bias and allowed_token_ids ----


def reference_logits(row: torch.Tensor, r: SamplerRequest) -> torch.Tensor:
    """The row as the draw sees it, step by step in plain Python: penalties, bias, allowlist (float64)."""
    out = reference_penalties(row.double().tolist(), r)
    for t, b in r.params.logit_bias.items():
        out[t] += b
    if r.params.allowed_token_ids:
        out = [x if t in r.params.allowed_token_ids else -math.inf for t, x in enumerate(out)]
    return torch.tensor(out, dtype=torch.float64)


def test_logit_bias_moves_the_greedy_argmax():
    logits = random_logits(4)
    losers = logits.argmin(-1).tolist()
    requests = [req(temperature=0.0, logit_bias={losers[0]: 100.0}),
                # -100 on every row's winner: the runner-up wins.
                req(temperature=0.0, logit_bias={int(logits[1].argmax()): -100.0}),
                req(temperature=0.0, logit_bias={losers[2]: 0.5, 7: -0.25, 9: 3.0}),
                req(temperature=0.0)]
    tokens = run(logits, requests).sampled_token_ids
    expected = torch.stack([reference_logits(logits[i], r) for i, r in enumerate(requests)]).argmax(-1)
    assert torch.equal(tokens, expected)
    assert tokens[0] == losers[0] and tokens[1] == logits[1].topk(2).indices[1]
    # bf16 logits: the bias is added in float32, as to their float32 copy.
    assert torch.equal(run(logits.bfloat16(), requests).sampled_token_ids,
                       run(logits.bfloat16().float(), requests).sampled_token_ids)


@pytest.mark.parametrize("params", [dict(), dict(top_k=5, top_p=0.8), dict(min_p=0.1, repetition_penalty=1.5)],
                         ids=["plain", "top_k+top_p", "min_p+penalty"])
def test_a_bias_of_100_is_drawn_every_time(params):
    draws, forced = 2000, 11
    logits = random_logits(1, seed=2).expand(draws, V)
    # Token 11 is seen, so the repetition penalty applies to it first; the bias comes after.
    requests = [req(seed=s, temperature=1.0, output=[forced], logit_bias={forced: 100.0}, **params)
                for s in range(draws)]
    assert set(run(logits, requests).sampled_token_ids.tolist()) == {forced}


def test_allowed_token_ids_restrict_every_draw_to_their_distribution():
    draws, allowed = 20_000, [3, 17, 40, 41]
    row = random_logits(1, seed=3, scale=1.0)
    tokens = run(row.expand(draws, V), [req(seed=s, allowed_token_ids=allowed) for s in range(draws)])
    observed = torch.bincount(tokens.sampled_token_ids, minlength=V).double()
    assert set(observed.nonzero().flatten().tolist()) == set(allowed)
    # The draw is from the softmax over the allowed tokens alone.
    expected = torch.softmax(row[0, allowed].double(), -1) * draws
    chi2 = ((observed[allowed] - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_critical(len(allowed) - 1), (observed[allowed], expected)


COMBINED_CASES = [
    dict(allowed_token_ids=[1, 5, 9, 20, 33], top_k=3),
    dict(allowed_token_ids=[1, 5, 9, 20, 33], top_k=10),  # more than the allowlist: all of it stays
    dict(allowed_token_ids=[2, 4, 8, 16, 32, 63], top_p=0.6, logit_bias={4: 2.0}),
    dict(allowed_token_ids=list(range(0, V, 3)), min_p=0.2, temperature=0.7),
    dict(logit_bias={0: 5.0, 1: 4.0, 2: -100.0}, top_k=4, repetition_penalty=1.4, presence_penalty=0.5),
    dict(logit_bias={5: 1.5, 6: 1.5}, min_p=0.05, top_p=0.9, frequency_penalty=1.0),
    dict(allowed_token_ids=[1, 2, 3], logit_bias={3: 1.0, 1: -1.0}, repetition_penalty=2.0),
]


@pytest.mark.parametrize("case", range(len(COMBINED_CASES)))
def test_bias_and_allowlist_combine_with_penalties_and_filters(case):
    """The tokens drawn over many seeds are the reference's kept set: filters see the penalised, biased and
    restricted logits. The same rows, greedy, pick the reference's argmax."""
    params, draws = COMBINED_CASES[case], 3000
    row = random_logits(1, seed=20 + case, scale=1.5)
    requests = [req(seed=s, output=[1, 2, 3, 5, 5], **params) for s in range(draws)]
    adjusted = reference_logits(row[0], requests[0])
    p = requests[0].params
    finite = set(adjusted.isfinite().nonzero().flatten().tolist())
    expected = reference_keep(adjusted, p.temperature, p.min_p, p.top_k, p.top_p) & finite
    picked = set(run(row.expand(draws, V), requests).sampled_token_ids.tolist())
    assert picked <= expected
    if len(expected) <= 10:
        assert picked == expected
    greedy = req(temperature=0.0, output=[1, 2, 3, 5, 5], **{k: v for k, v in params.items() if k != "temperature"})
    assert run(row, [greedy]).sampled_token_ids.item() == reference_logits(row[0], greedy).argmax().item()


def test_min_tokens_wins_over_bias_and_allowlist():
    """A stop id stays banned under min_tokens, even when allowed and biased +100."""
    logits = torch.zeros(3, V)
    requests = [req(temperature=0.0, stop=[2], min_tokens=2, logit_bias={2: 100.0}),
                req(seed=1, stop=[2], min_tokens=2, allowed_token_ids=[2, 7], logit_bias={2: 100.0}),
                req(temperature=0.0, stop=[2], min_tokens=2, output=[4, 4], logit_bias={2: 100.0})]  # past it
    assert run(logits, requests).sampled_token_ids.tolist() == [0, 7, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_bias_or_allowlist_are_bit_unchanged(dtype):
    """Rows that ask for neither get the very tokens and logprobs they get in a batch where no row does."""
    logits = random_logits(10, seed=8).to(dtype)
    plain = [req(seed=i, temperature=[0.0, 0.8, 1.0][i % 3], top_k=[0, 5, 0][i % 3], top_p=[1.0, 1.0, 0.7][i % 3],
                 repetition_penalty=1.2 if i == 4 else 1.0, stop=(3,), min_tokens=1 if i == 2 else 0, logprobs=2)
             for i in range(5)]
    special = [req(seed=9, logit_bias={4: 100.0}), req(seed=10, temperature=0.0, allowed_token_ids=[1, 2]),
               req(seed=11, logit_bias={5: -3.0}, allowed_token_ids=[5, 6, 7], top_p=0.5, logprobs=3),
               req(seed=12, temperature=0.0, logit_bias={8: 50.0}), req(seed=13, allowed_token_ids=[9])]
    alone = run(logits[:5], plain)
    mixed = run(torch.cat([logits[:5], logits[5:]]), plain + special)
    assert torch.equal(mixed.sampled_token_ids[:5], alone.sampled_token_ids)
    assert torch.equal(mixed.logprobs[:5], alone.logprobs)
    assert torch.equal(mixed.top_ids[:5, :2], alone.top_ids) and torch.equal(mixed.top_logprobs[:5, :2],
                                                                            alone.top_logprobs)
    forced = mixed.sampled_token_ids[5:].tolist()
    assert forced[0] == 4 and forced[1] == 1 + int(logits[6, 2] > logits[6, 1]) and forced[2] in (5, 6, 7)
    assert forced[3:] == [8, 9]
    # Their logprobs are of the raw distribution, without bias or allowlist.
    raw = logits[5:].float().log_softmax(-1)
    assert torch.equal(mixed.logprobs[5:], raw.gather(1, mixed.sampled_token_ids[5:, None]).squeeze(1))
    assert torch.equal(mixed.top_ids[7], raw[2].topk(3).indices)


def test_metadata_reads_sequence_token_arrays_as_lists():
    """The runner hands the sampler Sequence.token_array (an int64 view kept in step with token_ids across
    buffer growth); penalty, bias and allowlist indices come out as from plain lists."""
    params = SamplingParams(temperature=0.7, repetition_penalty=1.2, presence_penalty=0.5,
                            logit_bias={7: 1.5, 3: -2.0}, allowed_token_ids=[3, 7, 9])
    seqs = [Sequence(f"r{i}", list(range(i + 1, i + 6)), params, i, frozenset([2])) for i in range(3)]
    for step in range(40):  # past the buffer's first two doublings
        for seq in seqs:
            seq.num_pending_tokens += 1
            seq.append_token((step * 7 + seq.seed) % V)
    assert all(seq.token_array.tolist() == seq.token_ids for seq in seqs)
    as_arrays = SamplingMetadata.build(
        [SamplerRequest(s.params, s.seed, s.token_array, s.num_prompt_tokens, s.stop_ids) for s in seqs], V, "cpu")
    as_lists = SamplingMetadata.build(
        [SamplerRequest(s.params, s.seed, list(s.token_ids), s.num_prompt_tokens, s.stop_ids) for s in seqs], V,
        "cpu")
    for name in ("prompt_index", "output_index", "bias_index", "bias", "allowed_index"):
        assert torch.equal(getattr(as_arrays, name), getattr(as_lists, name)), name
