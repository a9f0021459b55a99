"""The engine end to end on the CPU: HF parity, prefix caching, chunking, preemption, sampling, aborts."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from pagoda_engine import LLM, InvalidRequestError, SamplingParams
from pagoda_engine.sequence import FinishReason
from tests.conftest import make_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def prompts_of(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def make_llm(model_dir, **config) -> LLM:
    config.setdefault("num_kv_blocks", 256)
    config.setdefault("block_size", 4)
    return LLM(model_dir, dtype="float32", device="cpu", **config)


def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()
    assert not llm.engine.requests


@pytest.mark.parametrize("name", ["llama", "llama_tied_mha", "qwen2", "qwen3", "mistral_sliding", "phi3", "gemma2",
                                  "gemma3", "granite", "smollm3", "olmo2", "mixtral", "qwen3_moe",
                                  "qwen2_moe", "olmoe", "granitemoe"])
def test_greedy_matches_transformers(tiny_model_dirs, name):
    model_dir = tiny_model_dirs[name]
    prompts = prompts_of([5, 17, 33, 64])
    llm = make_llm(model_dir)
    ours = [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY)]
    assert ours == hf_greedy(model_dir, prompts, 32)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_sliding_window_model_holds_only_its_window(tiny_model_dirs, prefix_caching):
    """Mistral's window (24 tokens) in every layer: blocks behind it are released as sequences advance, so
    six sequences of ~100 tokens (150 blocks of 4 in all) run in 64 blocks without a preemption, and the
    released blocks, handed to other sequences meanwhile, change no token."""
    model_dir = tiny_model_dirs["mistral_sliding"]
    prompts = prompts_of([40, 37, 44, 29, 41, 35])
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    llm = make_llm(model_dir, num_kv_blocks=64, enable_prefix_caching=prefix_caching)
    assert llm.engine.block_manager.window == 24
    ours = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
    assert llm.engine.scheduler.num_preemptions == 0
    assert ours == hf_greedy(model_dir, prompts, 60)
    assert_all_blocks_free(llm)


def test_prefix_cache_hits_and_changes_nothing(tiny_model_dirs):
    model_dir = tiny_model_dirs["qwen3"]
    shared = prompts_of([40])[0]
    prompts = [shared + [5, 6, 7], shared + [8, 9]]
    cached = make_llm(model_dir)
    first = cached.generate(prompts[0], GREEDY)[0]
    second = cached.generate(prompts[1], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40  # ten full blocks of 4
    plain = make_llm(model_dir, enable_prefix_caching=False)
    expected = [out.outputs[0].token_ids for out in plain.generate(prompts, GREEDY)]
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == expected
    assert_all_blocks_free(cached)


def test_fully_cached_prompt_recomputes_last_token(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"])
    prompt = prompts_of([16])[0]  # exactly four blocks
    first = llm.generate(prompt, GREEDY)[0]
    again = llm.generate(prompt, GREEDY)[0]
    assert again.num_cached_tokens == 12
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_chunked_prefill_and_preemption_match_the_plain_run(tiny_model_dirs):
    model_dir = tiny_model_dirs["qwen2"]
    prompts = prompts_of([30, 45, 12, 60, 25, 50])
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in make_llm(model_dir).generate(prompts, params)]
    # 40 blocks of 4 tokens cannot hold six sequences of up to 100 tokens: preemption is forced,
    # and a 16-token budget splits every prompt into chunks.
    tight = make_llm(model_dir, num_kv_blocks=40, max_num_batched_tokens=16)
    got = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == expected
    assert_all_blocks_free(tight)


def test_preemption_with_prefix_hits_and_no_cache(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    shared = prompts_of([24])[0]
    prompts = [shared + p for p in prompts_of([6, 10, 14, 3], seed=1)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in make_llm(model_dir).generate(prompts, params)]
    for caching in (True, False):
        tight = make_llm(model_dir, num_kv_blocks=30, max_num_batched_tokens=20, enable_prefix_caching=caching)
        assert [o.outputs[0].token_ids for o in tight.generate(prompts, params)] == expected
        assert_all_blocks_free(tight)


def test_seeded_sampling_ignores_batch_composition(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["qwen3"])
    prompt = prompts_of([20])[0]
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate(prompt, params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, seed=s, max_tokens=10, ignore_eos=True) for s in range(3)]
    batch = llm.generate(prompts_of([7, 9, 30], seed=5) + [prompt], others + [params])
    assert batch[-1].outputs[0].token_ids == alone
    different = llm.generate(prompt, SamplingParams(temperature=0.9, seed=99, max_tokens=24, ignore_eos=True))
    assert different[0].outputs[0].token_ids != alone


def test_next_step_launches_before_the_previous_tokens_are_applied(tiny_model_dirs):
    """Decodes read their input token on the device; a row with penalties makes the engine wait instead."""
    llm = make_llm(tiny_model_dirs["llama"])
    engine = llm.engine
    prompts = prompts_of([9, 21])
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=20,
                               ignore_eos=True)
    alone = [llm.generate(p, s)[0].outputs[0].token_ids for p, s in zip(prompts, (GREEDY, penalised), strict=True)]
    engine.add_request("plain", prompts[0], GREEDY)
    for _ in range(3):
        engine.step()
    seq = engine.requests["plain"][0]
    assert seq.num_pending_tokens == 1 and len(seq.token_ids) == seq.num_tokens - 1
    engine.add_request("penalised", prompts[1], penalised)
    outputs: dict[str, list[int]] = {"plain": list(seq.output_token_ids), "penalised": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
    assert [outputs["plain"], outputs["penalised"]] == alone
    assert_all_blocks_free(llm)


def test_n_samples_share_the_prompt_and_differ(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"])
    prompt = prompts_of([33])[0]
    params = SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=16, ignore_eos=True)
    out = llm.generate(prompt, params)[0]
    samples = [c.token_ids for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(s) == 16 for s in samples) and len({tuple(s) for s in samples}) == 3
    assert out.num_cached_tokens == 32  # later samples reuse the first one's full prompt blocks
    assert llm.generate(prompt, params)[0].outputs[0].token_ids == samples[0]
    assert_all_blocks_free(llm)


def test_stop_ids_min_and_max_tokens(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["qwen2"])
    prompt = prompts_of([10])[0]
    free_run = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    stop = free_run[5]
    first_stop = free_run.index(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[stop]))[0].outputs[0]
    assert out.finish_reason is FinishReason.STOP and out.token_ids == free_run[: first_stop + 1]
    # min_tokens masks the stop token until enough tokens exist.
    later = SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[stop], min_tokens=first_stop + 2)
    out = llm.generate(prompt, later)[0].outputs[0]
    assert stop not in out.token_ids[: first_stop + 2] and len(out.token_ids) >= first_stop + 2
    short = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert short.finish_reason is FinishReason.LENGTH and short.token_ids == free_run[:3]


def test_logprobs_are_returned_per_token(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"])
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
    out = llm.generate(prompts_of([9])[0], params)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, (chosen, top) in zip(out.token_ids, out.logprobs, strict=True):
        assert len(top) == 3 and top[0][0] == token and chosen == pytest.approx(top[0][1])
        assert chosen <= 0 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_abort_frees_every_block(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"])
    engine = llm.engine
    for i, prompt in enumerate(prompts_of([30, 50, 70])):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    finals = [out for i in range(3) for out in engine.abort_request(f"r{i}")]
    assert {out.finish_reason for out in finals} == {FinishReason.ABORT}
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(llm)


def test_abort_of_one_sample_leaves_the_others_running(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"])
    engine = llm.engine
    engine.add_request("r", prompts_of([20])[0], SamplingParams(n=3, temperature=1.0, max_tokens=30, ignore_eos=True))
    for _ in range(4):
        engine.step()
    (final,) = engine.abort_request("r", [1])
    assert (final.index, final.finish_reason) == (1, FinishReason.ABORT)
    assert engine.abort_request("r", [1]) == []  # already stopped
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({out.index: out for out in engine.step() if out.finish_reason is not None})
    assert {i: (out.finish_reason, out.num_output_tokens) for i, out in finals.items()} == {
        0: (FinishReason.LENGTH, 30), 2: (FinishReason.LENGTH, 30)}
    assert_all_blocks_free(llm)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "empty"),
        ([1, 9999], SamplingParams(), "outside the vocabulary"),
        ([1] * 10, SamplingParams(max_tokens=10_000), "exceeds the max model length"),
        ([1], SamplingParams(temperature=-1), "temperature"),
        ([1], SamplingParams(top_p=0), "top_p"),
        ([1], SamplingParams(n=0), "n must be"),
        ([1], SamplingParams(logprobs=100), "logprobs"),
        ([1], SamplingParams(prompt_logprobs=21), r"prompt_logprobs must be in \[0, 20\]"),
        ([1], SamplingParams(prompt_logprobs=-1), "prompt_logprobs must be"),
        # Finite in float64, inf in the sampler's float32: a suppressed token's -inf / inf was NaN, drawn.
        ([1], SamplingParams(temperature=1e39), "temperature must be a finite float32"),
        ([1], SamplingParams(repetition_penalty=1e39), "repetition_penalty must be a finite float32"),
        ([1], SamplingParams(stop_token_ids=list(range(1025))), "at most 1024 stop_token_ids"),
        ([1], SamplingParams(logit_bias={5: 100.5}), "logit_bias values must be in \\[-100, 100\\], got 100.5"),
        ([1], SamplingParams(logit_bias={5: float("nan")}), "got nan for token 5"),
        ([1], SamplingParams(logit_bias={5: float("-inf")}), "got -inf for token 5"),
        ([1], SamplingParams(logit_bias={256: 1.0}), "logit_bias token id 256 is outside the vocabulary"),
        ([1], SamplingParams(logit_bias=dict.fromkeys(range(1025), 1.0)), "at most 1024 logit_bias entries"),
        ([1], SamplingParams(allowed_token_ids=[3, 2**32 - 1]), "allowed_token_ids id 4294967295 is outside"),
        ([1], SamplingParams(allowed_token_ids=[-1]), "allowed_token_ids must be >= 0"),
        ([1], SamplingParams(allowed_token_ids=[0] * 1025), "at most 1024 allowed_token_ids entries"),
        # EOS (2) and a stop id are all that is allowed: min_tokens would leave nothing to draw.
        ([1], SamplingParams(allowed_token_ids=[2, 9], stop_token_ids=[9], min_tokens=1), "would ban every token"),
    ],
)
def test_invalid_requests_are_rejected_with_a_reason(tiny_model_dirs, prompt, params, message):
    llm = make_llm(tiny_model_dirs["llama"])
    with pytest.raises(InvalidRequestError, match=message):
        llm.engine.add_request("bad", prompt, params)
    assert not llm.engine.has_unfinished_requests()


def test_logit_bias_forces_a_token_and_logprobs_stay_raw(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"])
    prompt = prompts_of([11])[0]
    free = llm.generate(prompt, replace(GREEDY, logprobs=3))[0].outputs[0]
    forced = next(t for t in range(3, 256) if t not in free.token_ids)
    biased = llm.generate(prompt, replace(GREEDY, logprobs=3, logit_bias={forced: 100.0}))[0].outputs[0]
    assert biased.token_ids == [forced] * 32
    # The first position's distribution is the model's either way (up to the last bits: the second run finds
    # the prompt's blocks cached): its logprobs do not see the bias.
    (_, biased_top), (_, free_top) = biased.logprobs[0], free.logprobs[0]
    assert [t for t, _ in biased_top] == [t for t, _ in free_top]
    assert [lp for _, lp in biased_top] == pytest.approx([lp for _, lp in free_top], abs=1e-5)
    assert biased.logprobs[0][0] < free.logprobs[0][0] <= 0  # the forced token was not the model's choice
    banned = llm.generate(prompt, replace(GREEDY, logit_bias={free.token_ids[0]: -100.0}))[0].outputs[0]
    assert banned.token_ids[0] == free.logprobs[0][1][1][0]  # the runner-up
    assert free.token_ids[0] not in banned.token_ids
    assert_all_blocks_free(llm)


def test_allowed_token_ids_restrict_every_sample_and_imply_no_eos(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"])
    prompt, allowed = prompts_of([9])[0], [17, 40, 41, 200]
    params = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=24, allowed_token_ids=allowed)
    samples = llm.generate(prompt, params)[0].outputs
    assert all(set(s.token_ids) <= set(allowed) and s.finish_reason is FinishReason.LENGTH for s in samples)
    assert len({tuple(s.token_ids) for s in samples}) == 3 and set().union(*(s.token_ids for s in samples)) == set(
        allowed)
    # EOS (2) may end a sample only when it is allowed; a bias then makes it the first token.
    stops = llm.generate(prompt, replace(params, n=1, allowed_token_ids=[2, 17], logit_bias={2: 100.0}))[0]
    assert (stops.outputs[0].token_ids, stops.outputs[0].finish_reason) == ([2], FinishReason.STOP)
    assert_all_blocks_free(llm)


def test_bias_and_allowlist_survive_chunking_and_preemption(tiny_model_dirs):
    """Seeded draws under a bias and an allowlist, with n > 1, come out the same when the run is chunked and
    preempted (a resumed sequence draws again what it drew before)."""
    model_dir = tiny_model_dirs["qwen2"]
    prompts = prompts_of([30, 45, 12, 60, 25, 50], seed=3)
    base = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)
    params = [replace(base, seed=i, n=1 + i % 2,
                      logit_bias={7: 3.0, 8: -100.0, 9 + i: 2.5} if i % 3 != 1 else {},
                      allowed_token_ids=list(range(5, 60, 1 + i)) if i % 3 != 0 else [],
                      top_k=20 if i == 4 else -1, repetition_penalty=1.3 if i == 5 else 1.0)
              for i in range(len(prompts))]
    expected = [[c.token_ids for c in o.outputs] for o in make_llm(model_dir).generate(prompts, params)]
    tight = make_llm(model_dir, num_kv_blocks=40, max_num_batched_tokens=16)
    assert [[c.token_ids for c in o.outputs] for o in tight.generate(prompts, params)] == expected
    assert tight.engine.get_load().preemptions > 0
    for p, samples in zip(params, expected, strict=True):
        assert all(8 not in s and (not p.allowed_token_ids or set(s) <= set(p.allowed_token_ids)) for s in samples)
    assert_all_blocks_free(tight)


def test_logprobs_past_the_vocabulary_are_refused_whatever_max_logprobs_allows(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"], max_logprobs=1_000_000)
    vocab_size = llm.engine.model_config.vocab_size
    assert llm.engine.limits.max_logprobs == vocab_size  # what ModelInfo.max_logprobs reports
    with pytest.raises(InvalidRequestError, match=f"logprobs must be in \\[0, {vocab_size}\\]"):
        llm.engine.add_request("many", [1, 2], SamplingParams(logprobs=vocab_size + 1))
    params = SamplingParams(max_tokens=2, ignore_eos=True, logprobs=vocab_size)
    out = llm.generate([[1, 2]], params)[0].outputs[0]
    assert len(out.logprobs) == 2 and all(len(top) == vocab_size for _, top in out.logprobs)


def test_generate_with_a_bad_prompt_queues_nothing(tiny_model_dirs):
    """A bad prompt among good ones: generate raises, and the next call sees only its own requests."""
    llm = make_llm(tiny_model_dirs["llama"])
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[1, 2, 3], [1, 9999]], params)
    assert not llm.engine.has_unfinished_requests()
    outputs = llm.generate([[4, 5, 6]], params)
    assert len(outputs) == 1 and len(outputs[0].outputs[0].token_ids) == 4
    assert_all_blocks_free(llm)


def test_generate_interrupted_part_way_leaves_nothing_running(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"])
    real_step, calls = llm.engine.step, []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    llm.engine.step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts_of([30, 50]), SamplingParams(max_tokens=20, ignore_eos=True))
    llm.engine.step = real_step
    assert not llm.engine.has_unfinished_requests()
    assert_all_blocks_free(llm)


def test_a_step_interrupted_in_its_launch_leaves_no_unwritten_block_in_the_prefix_cache(tiny_model_dirs):
    """Ctrl-C during the forward (most of a CPU step): the blocks that step was to fill had been published
    when it was scheduled. The same prompt afterwards must not reuse them, nor may the engine, stepped on,
    lose a token or never finish."""
    prompt, params = prompts_of([40])[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = make_llm(tiny_model_dirs["llama"]).generate([prompt], params)[0].outputs[0].token_ids
    llm = make_llm(tiny_model_dirs["llama"])
    runner = llm.engine.runner
    real_forward, calls = runner.forward, []

    def forward(inputs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_forward(inputs)

    runner.forward = forward
    with pytest.raises(KeyboardInterrupt):
        llm.generate([prompt], params)
    assert not llm.engine.block_manager.cached_blocks
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == expected

    calls.clear()  # the engine stepped on after the error, as a caller catching it might
    llm.engine.add_request("again", prompt, params)
    with pytest.raises(KeyboardInterrupt):
        llm.engine.step()
    outputs = []
    for _ in range(50):
        if not llm.engine.has_unfinished_requests():
            break
        outputs += llm.engine.step()
    assert [t for out in outputs for t in out.token_ids] == expected
    assert_all_blocks_free(llm)


def test_max_model_len_past_the_models_positions_is_refused(tiny_model_dirs):
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        make_llm(tiny_model_dirs["llama"], max_model_len=1024)


def test_without_chunked_prefill_the_step_budget_holds_a_whole_prompt(tiny_model_dirs):
    """Settled before the runner is built, so its memory-profiling pass runs the step the scheduler will."""
    llm = make_llm(tiny_model_dirs["llama"], enable_chunked_prefill=False, max_num_batched_tokens=64,
                   max_model_len=300)
    assert llm.engine.config.max_num_batched_tokens == 300 == llm.engine.scheduler.max_num_batched_tokens
    prompt = prompts_of([250])[0]
    assert len(llm.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids) == 2


def test_warm_up_steps_write_nothing(tiny_model_dirs):
    """The GPU warm-up's dummy steps and draws, run here on the CPU: valid inputs, and the cache untouched."""
    llm = make_llm(tiny_model_dirs["qwen3"], max_num_seqs=8)
    prompts, params = prompts_of([5, 17, 30]), SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    runner = llm.engine.runner
    before = runner.kv_cache.clone()  # holds the prompts' cached prefix blocks
    runner._warm_up_cached_step()
    runner._warm_up_sampling()
    assert torch.equal(runner.kv_cache, before)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected


def test_prefix_statistics_count_each_prompt_once(tiny_model_dirs):
    """Counted at first admission: not per step a prompt waits, nor when a preempted one comes back."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    # Twelve blocks of 4 tokens: the second prompt waits for the first to finish, looked up at every step.
    llm = make_llm(tiny_model_dirs["llama"], num_kv_blocks=12)
    llm.generate(prompts_of([30, 30]), params)
    assert (llm.engine.get_load().prefix_query_tokens, llm.engine.get_load().prefix_hit_tokens) == (60, 0)
    llm = make_llm(tiny_model_dirs["llama"], max_num_seqs=1)
    shared = prompts_of([24])[0]
    llm.generate([shared + [7], shared + [8], shared + [9]], params)
    load = llm.engine.get_load()
    assert load.prefix_query_tokens == 3 * 25
    assert load.prefix_hit_tokens == 2 * 24  # six shared blocks of 4 tokens, found by the second and third


def test_duplicate_request_id_is_rejected(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"])
    llm.engine.add_request("same", [1, 2, 3], SamplingParams())
    with pytest.raises(InvalidRequestError, match="already in use"):
        llm.engine.add_request("same", [1, 2, 3], SamplingParams())


def test_attention_backend_choice():
    from pagoda_engine.layers.attention import select_backend

    assert select_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="expected auto, torch or triton"):
        select_backend("flash_attn", torch.device("cpu"))


def test_fp8_kv_cache_holds_four_times_fp32_and_tracks_it(tmp_path):
    """The float8 cache (torch reference backend): a quarter of fp32's bytes per block, and the prompt's
    next-token distribution within fp8 rounding of fp32's (0.02-0.04 nats at worst over three seeds).

    The weights are drawn narrower than the shared tiny models': those make attention so peaked that
    fp8's 3 mantissa bits move logprobs by up to 0.3 nats there, which would hide a plumbing error."""
    model_dir = make_tiny_model(tmp_path, "LlamaForCausalLM", initializer_range=0.05)
    sized = {"num_kv_blocks": None, "cpu_kv_cache_gib": 0.002}
    exact, fp8 = make_llm(model_dir, **sized), make_llm(model_dir, kv_cache_dtype="fp8", **sized)
    assert fp8.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.engine.runner.kv_bytes_per_block() * 4 == exact.engine.runner.kv_bytes_per_block()
    assert abs(fp8.engine.block_manager.num_blocks - 4 * exact.engine.block_manager.num_blocks) < 4
    prompts = prompts_of([9, 30, 61, 100, 5, 77])
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=5)
    for ref, ours in zip(exact.generate(prompts, params), fp8.generate(prompts, params), strict=True):
        top, fp8_top = ref.outputs[0].logprobs[0][1], ours.outputs[0].logprobs[0][1]
        if top[0][1] - top[1][1] > 0.1:
            assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
        ref_lp, fp8_lp = dict(top), dict(fp8_top)
        assert max(abs(ref_lp[t] - fp8_lp[t]) for t in ref_lp.keys() & fp8_lp.keys()) < 0.08
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto, fp8 or fp8_e4m3"):
        make_llm(model_dir, kv_cache_dtype="int8")


def test_engine_recovers_after_a_launch_interrupted_in_the_sampler(tiny_model_dirs):
    """An interrupt inside the sampler, after the forward: the undone step must leave the previous launch's
    tokens readable, or a decode whose input is still pending there raised KeyError on every later step."""
    llm = make_llm(tiny_model_dirs["llama"], num_kv_blocks=8, max_num_batched_tokens=16)
    engine = llm.engine
    sampler, calls = engine.runner.sampler, [0]

    def interrupted(logits, meta):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return sampler(logits, meta)

    engine.runner.sampler = interrupted
    for i, prompt in enumerate(prompts_of([6, 6, 6], seed=8)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    interrupts = 0
    for _ in range(300):
        if not engine.has_unfinished_requests():
            break
        try:
            engine.step()
        except KeyboardInterrupt:
            interrupts += 1
    assert interrupts == 1
    assert not engine.has_unfinished_requests()
