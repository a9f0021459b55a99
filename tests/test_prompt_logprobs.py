"""Prompt logprobs (SamplingParams.prompt_logprobs) in the offline API, against transformers on the CPU in
float32: chunked prefill, slicing of the LM head, the prefix cache, n > 1, preemption and an interrupted
launch. The gRPC services' side is in test_engine_service.py and test_tokenizer_service.py, tensor
parallelism in test_tensor_parallel.py, the GPU in test_gpu_engine.py."""

from __future__ import annotations

import pytest
import torch

from pagoda_engine import SamplingParams
from pagoda_engine.prompt_logprobs import SLICE_BYTES, rows_per_slice
from pagoda_engine.sequence import FinishReason, SequenceStatus
from tests.test_engine import assert_all_blocks_free, make_llm, prompts_of

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_models(tiny_model_dirs):
    """Each tiny checkpoint as transformers loads it, in float32."""
    return {name: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in tiny_model_dirs.items()}


def hf_logprobs(hf_model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i is the log-softmax of the logits that predict prompt token i + 1."""
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0, :-1].log_softmax(dim=-1)


def assert_matches(entries, reference: torch.Tensor, prompt: list[int], k: int, atol: float = ATOL) -> None:
    """``entries`` (the engine's, for ``prompt``) against the reference log-softmax rows: the prompt token's
    logprob, and the k most likely tokens (compared by value, so that near-ties may come in either order)."""
    assert len(entries) == len(prompt) - 1
    if not entries:
        return
    own = torch.tensor([logprob for logprob, _ in entries])
    torch.testing.assert_close(own, reference[torch.arange(len(entries)), torch.tensor(prompt[1:])],
                               atol=atol, rtol=0)
    for (_, top), row in zip(entries, reference, strict=True):
        assert len(top) == k
        ids, logprobs = [t for t, _ in top], torch.tensor([lp for _, lp in top])
        torch.testing.assert_close(logprobs, row.topk(k).values, atol=atol, rtol=0)
        torch.testing.assert_close(logprobs, row[ids], atol=atol, rtol=0)


def assert_idle(llm) -> None:
    assert_all_blocks_free(llm)
    assert llm.engine.scheduler.num_scoring == 0


def params(prompt_logprobs: int = 5, **fields) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 3, "ignore_eos": True,
                             "prompt_logprobs": prompt_logprobs, **fields})


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_prompt_logprobs_match_transformers_across_chunks(tiny_model_dirs, hf_models, name):
    """A 70-token prompt spans three 32-token steps: each chunk's last position predicts the next chunk's
    first token. Short prompts share those steps; one token has no entry at all."""
    prompts = prompts_of([70, 1, 2, 9, 33])
    llm = make_llm(tiny_model_dirs[name], max_num_batched_tokens=32)
    outputs = llm.generate(prompts, params())
    plain = make_llm(tiny_model_dirs[name]).generate(prompts, params(None))
    for prompt, out, expected in zip(prompts, outputs, plain, strict=True):
        assert_matches(out.prompt_logprobs, hf_logprobs(hf_models[name], prompt), prompt, 5)
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids  # what is sampled does not change
        assert out.num_cached_tokens == 0
    assert all(out.prompt_logprobs is None for out in plain)
    assert_idle(llm)


def test_zero_gives_the_prompt_tokens_own_logprobs_only(tiny_model_dirs, hf_models):
    prompt = prompts_of([12], seed=1)[0]
    out = make_llm(tiny_model_dirs["qwen2"]).generate(prompt, params(0))[0]
    assert_matches(out.prompt_logprobs, hf_logprobs(hf_models["qwen2"], prompt), prompt, 0)


def test_the_lm_head_runs_in_slices_that_stay_small(tiny_model_dirs, hf_models):
    """A slice holds at most SLICE_BYTES of float32 logits however long the chunk (a few hundred rows at
    Qwen's 152k vocabulary); three-row slices here give what one slice per step gives."""
    assert rows_per_slice(151_936) > 300 and rows_per_slice(151_936) * 151_936 * 4 <= SLICE_BYTES
    assert rows_per_slice(10**9) == 1
    prompts = prompts_of([50, 7], seed=2)
    whole = make_llm(tiny_model_dirs["llama"]).generate(prompts, params(3))
    llm = make_llm(tiny_model_dirs["llama"])
    llm.engine.runner.prompt_slice_rows = 3
    sliced = llm.generate(prompts, params(3))
    for prompt, a, b in zip(prompts, whole, sliced, strict=True):
        reference = hf_logprobs(hf_models["llama"], prompt)
        assert_matches(a.prompt_logprobs, reference, prompt, 3)
        assert_matches(b.prompt_logprobs, reference, prompt, 3)


def test_steps_look_for_prompt_rows_only_while_a_request_asks(tiny_model_dirs):
    """The decode path of requests without prompt logprobs is unchanged: their steps build no plan at all."""
    llm = make_llm(tiny_model_dirs["llama"])
    runner = llm.engine.runner
    real_prepare, seen = runner.prepare_inputs, []

    def prepare(batch):
        inputs = real_prepare(batch)
        seen.append((batch.may_score_prompts, inputs.shape.num_prompt_logits, inputs.prompt_rows is None))
        return inputs

    runner.prepare_inputs = prepare
    plain = params(None, max_tokens=4)
    llm.generate(prompts_of([9, 5]), plain)
    assert set(seen) == {(False, 0, True)}
    seen.clear()
    llm.generate(prompts_of([9, 5]), [params(2, max_tokens=4), plain])
    assert seen[0] == (True, 8, False) and set(seen[1:]) == {(True, 0, True)}
    seen.clear()
    llm.generate(prompts_of([9]), plain)
    assert set(seen) == {(False, 0, True)}
    assert_idle(llm)


def test_a_cached_prompt_is_scored_whole_and_still_feeds_the_cache(tiny_model_dirs, hf_models):
    """Cached positions have no logits, so a request asking for prompt logprobs skips the lookup (as vLLM
    v1) and is not counted as one; its blocks still join the cache for the requests after it."""
    llm = make_llm(tiny_model_dirs["llama"])
    prompt = prompts_of([40], seed=3)[0]
    reference = hf_logprobs(hf_models["llama"], prompt)
    first = llm.generate(prompt, params(None))[0]  # caches the prompt's blocks
    scored = [llm.generate(prompt, params(4))[0] for _ in range(2)]
    for out in scored:
        assert out.num_cached_tokens == 0
        assert_matches(out.prompt_logprobs, reference, prompt, 4)
        assert out.outputs[0].token_ids == first.outputs[0].token_ids
    load = llm.engine.get_load()
    assert (load.prefix_query_tokens, load.prefix_hit_tokens) == (40, 0)
    again = llm.generate(prompt, params(None))[0]
    assert again.num_cached_tokens == 36  # nine full blocks of 4: the last token is always computed
    assert_idle(llm)


def test_n_samples_score_the_prompt_once(tiny_model_dirs, hf_models):
    """Sample 0 scores the prompt; the others find its blocks in the cache. One output carries the entries."""
    llm = make_llm(tiny_model_dirs["llama"])
    prompt = prompts_of([33], seed=4)[0]
    engine = llm.engine
    engine.add_request("r", prompt, params(2, temperature=1.0, seed=5, n=3, max_tokens=6))
    carrying = []
    while engine.has_unfinished_requests():
        carrying += [out for out in engine.step() if out.prompt_logprobs is not None]
    assert [(out.index, len(out.token_ids), out.num_output_tokens) for out in carrying] == [(0, 1, 1)]
    assert_matches(carrying[0].prompt_logprobs, hf_logprobs(hf_models["llama"], prompt), prompt, 2)
    out = llm.generate(prompt, params(2, temperature=1.0, seed=5, n=3, max_tokens=6))[0]
    assert len(out.outputs) == 3 and out.num_cached_tokens == 32
    assert out.prompt_logprobs == carrying[0].prompt_logprobs
    assert_idle(llm)


def test_a_prompt_preempted_mid_prefill_is_scored_once(tiny_model_dirs, hf_models):
    """B's second chunk finds no blocks and B, the newest, is preempted after its first chunk was scored.
    Recomputed from position 0 later, it scores only the positions it had not."""
    llm = make_llm(tiny_model_dirs["llama"], num_kv_blocks=14, max_num_batched_tokens=16)
    engine = llm.engine
    prompts = prompts_of([40, 40], seed=6)
    engine.add_request("a", prompts[0], params(1, max_tokens=8))
    engine.add_request("b", prompts[1], params(1, max_tokens=8))
    b = engine.requests["b"][0]
    results, preempted_while_scoring = {}, False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                results[out.request_id] = out.prompt_logprobs
        if b.status is SequenceStatus.WAITING and b.num_preemptions and not b.num_output_tokens:
            preempted_while_scoring |= 0 < len(b.prompt_logprobs) < len(prompts[1]) - 1
    assert preempted_while_scoring
    for request_id, prompt in zip("ab", prompts, strict=True):
        assert_matches(results[request_id], hf_logprobs(hf_models["llama"], prompt), prompt, 1)
    assert_idle(llm)


def test_a_launch_interrupted_mid_prompt_scores_nothing_twice(tiny_model_dirs, hf_models):
    """Ctrl-C in the second chunk's forward: the first chunk's entries are still on their way when the prompt
    is recomputed from position 0, which scores them again; they are kept once."""
    llm = make_llm(tiny_model_dirs["llama"], max_num_batched_tokens=16)
    runner = llm.engine.runner
    real_forward, calls = runner.forward, []

    def forward(inputs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_forward(inputs)

    runner.forward = forward
    prompt = prompts_of([40], seed=7)[0]
    llm.engine.add_request("r", prompt, params(2))
    llm.engine.step()
    with pytest.raises(KeyboardInterrupt):
        llm.engine.step()
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += llm.engine.step()
    (carrying,) = [out for out in outputs if out.prompt_logprobs is not None]
    assert_matches(carrying.prompt_logprobs, hf_logprobs(hf_models["llama"], prompt), prompt, 2)
    assert_idle(llm)


# After how many engine steps to abort which samples (abort_request's indices) of an n = 3 request whose
# 40-token prompt takes three 16-token chunks: sample 0's first token comes out of the fourth step.
ABORTS = {
    "sample 0 waiting": [(0, [0])],
    "sample 0 between chunks": [(1, [0])],
    "sample 0 two chunks in": [(2, [0])],
    "sample 0 last chunk in flight": [(3, [0])],
    "sample 0 after its first token": [(4, [0])],
    "samples 0 and 1 at once": [(2, [0, 1])],
    "sample 0, then its heir mid-prompt": [(1, [0]), (2, [1])],
}


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
@pytest.mark.parametrize("aborts", ABORTS.values(), ids=ABORTS)
def test_prompt_logprobs_outlive_an_aborted_sample_0(tiny_model_dirs, hf_models, aborts, prefix_caching):
    """Sample 0 scores the prompt and sends the entries with its first token. Aborted before that (waiting,
    between chunks, or with the entries still in flight), another sample sends them instead: once, on the
    request's first token, as long as a sample is left. No block leaks, and the invariants hold every step."""
    llm = make_llm(tiny_model_dirs["llama"], max_num_batched_tokens=16, enable_prefix_caching=prefix_caching)
    engine = llm.engine
    prompt = prompts_of([40], seed=8)[0]
    engine.add_request("r", prompt, params(2, temperature=1.0, seed=3, n=3, max_tokens=4))
    outputs, steps, aborted = [], 0, set()
    for at, indices in aborts:
        for _ in range(at - steps):
            outputs += engine.step()
            engine.block_manager.check_invariants()
        steps = at
        outputs += engine.abort_request("r", indices)
        aborted |= set(indices)
    while engine.has_unfinished_requests():
        outputs += engine.step()
        engine.block_manager.check_invariants()
    first_token = next(out for out in outputs if out.token_ids)
    assert [out for out in outputs if out.prompt_logprobs is not None] == [first_token]
    assert first_token.num_output_tokens == 1
    assert_matches(first_token.prompt_logprobs, hf_logprobs(hf_models["llama"], prompt), prompt, 2)
    finals = {out.index: out.finish_reason for out in outputs if out.finish_reason is not None}
    assert finals == {i: FinishReason.ABORT if i in aborted else FinishReason.LENGTH for i in range(3)}
    assert_idle(llm)


def test_a_request_aborted_whole_mid_prompt_sends_no_prompt_logprobs(tiny_model_dirs):
    """No sample is left to carry them: the entries still in flight are dropped, and nothing leaks."""
    llm = make_llm(tiny_model_dirs["llama"], max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("r", prompts_of([40], seed=8)[0], params(2, n=3))
    outputs = engine.step() + engine.step()
    outputs += engine.abort_request("r")
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert engine.step() == []  # the last chunk's step, launched before the abort, finishes here
    assert all(out.prompt_logprobs is None for out in outputs)
    assert sorted(out.index for out in outputs if out.finish_reason is FinishReason.ABORT) == [0, 1, 2]
    assert_idle(llm)
