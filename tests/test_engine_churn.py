"""Random churn through the real engine (CPU): requests arrive, stop early, get aborted mid-flight and
preempted under a tiny KV cache, while each step is launched before the previous one's tokens are known.

Against each request run alone, greedy outputs must be unchanged, and the bookkeeping must hold after
every step: block invariants, nothing leaked at the end, every non-aborted sample ending for its reason.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from pagoda_engine import SamplingParams
from pagoda_engine.sequence import FinishReason
from tests.test_engine import assert_all_blocks_free, make_llm, prompts_of


def random_requests(rng: random.Random, count: int) -> list[tuple[list[int], SamplingParams]]:
    shared = prompts_of([24], seed=rng.randrange(1000))[0]  # a common prefix, for prefix-cache hits
    requests = []
    for i in range(count):
        own = prompts_of([rng.randint(1, 40)], seed=1000 + i)[0]
        prompt = (shared[: rng.choice([0, 8, 24])] + own) or own
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 24), ignore_eos=True,
                                stop_token_ids=[rng.randrange(3, 256)] if rng.random() < 0.4 else [],
                                repetition_penalty=1.2 if rng.random() < 0.2 else 1.0,
                                n=2 if rng.random() < 0.15 else 1)
        requests.append((prompt, params))
    return requests


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_churn_matches_each_request_alone(tiny_model_dirs, seed):
    rng = random.Random(seed)
    model_dir = tiny_model_dirs["qwen3"]
    requests = random_requests(rng, 14)
    alone = make_llm(model_dir)
    expected = [[o.token_ids for o in alone.generate(p, s)[0].outputs] for p, s in requests]

    llm = make_llm(model_dir, num_kv_blocks=40, max_num_batched_tokens=48, max_num_seqs=6)
    engine = llm.engine
    outputs: dict[str, dict[int, list[int]]] = {}
    finish: dict[str, dict[int, FinishReason]] = {}
    aborted: set[str] = set()
    pending = list(enumerate(requests))
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 2)):  # arrivals between steps
            if pending:
                i, (prompt, params) = pending.pop(0)
                engine.add_request(str(i), prompt, params)
                outputs[str(i)], finish[str(i)] = {}, {}
        if engine.requests and rng.random() < 0.05:  # an abort, often with a step in flight
            victim = rng.choice(sorted(engine.requests))
            engine.abort_request(victim)
            aborted.add(victim)
        for out in engine.step():
            outputs[out.request_id].setdefault(out.index, []).extend(out.token_ids)
            if out.finish_reason is not None:
                finish[out.request_id][out.index] = out.finish_reason
        engine.block_manager.check_invariants()
    assert_all_blocks_free(llm)
    for key, (_, params) in enumerate(requests):
        request_id = str(key)
        if request_id in aborted:
            continue
        got = [outputs[request_id].get(index, []) for index in range(params.n)]
        assert got == expected[key], f"request {key}: {params}"
        for index, tokens in enumerate(got):
            stopped = bool(params.stop_token_ids) and tokens[-1] in params.stop_token_ids
            assert finish[request_id][index] is (FinishReason.STOP if stopped else FinishReason.LENGTH)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_churn_with_prompt_logprobs_and_samples_aborted_one_by_one(tiny_model_dirs, seed):
    """Requests of up to three samples, most scoring their prompt, lose samples one at a time (sample 0 often
    before its first token) under preemption: each request that puts out a token gets its prompt logprobs
    once, with that first token, as it gets them run alone; the samples left are unchanged."""
    rng = random.Random(seed)
    model_dir = tiny_model_dirs["qwen3"]
    requests = [(prompt, replace(params, n=rng.randint(1, 3), prompt_logprobs=rng.choice([None, 0, 2])))
                for prompt, params in random_requests(rng, 12)]
    alone = [make_llm(model_dir).generate(p, s)[0] for p, s in requests]

    llm = make_llm(model_dir, num_kv_blocks=40, max_num_batched_tokens=16, max_num_seqs=6)
    engine = llm.engine
    outputs: dict[str, list] = {}
    aborted: set[tuple[str, int]] = set()
    pending = list(enumerate(requests))
    while pending or engine.has_unfinished_requests():
        if pending and rng.random() < 0.5:
            i, (prompt, params) = pending.pop(0)
            engine.add_request(str(i), prompt, params)
            outputs[str(i)] = []
        if engine.requests and rng.random() < 0.2:
            victim = rng.choice(sorted(engine.requests))
            index = rng.randrange(requests[int(victim)][1].n)
            outputs[victim] += engine.abort_request(victim, [index])
            aborted.add((victim, index))
        for out in engine.step():
            outputs[out.request_id].append(out)
        engine.block_manager.check_invariants()
    assert_all_blocks_free(llm)
    assert engine.scheduler.num_scoring == 0
    for key, ((_, params), expected) in enumerate(zip(requests, alone, strict=True)):
        outs = outputs[str(key)]
        first_token = next((out for out in outs if out.token_ids), None)
        carrying = [out for out in outs if out.prompt_logprobs is not None]
        if params.prompt_logprobs is None or first_token is None:
            assert carrying == [], f"request {key}"
            continue
        assert len(carrying) == 1 and carrying[0] is first_token, f"request {key}: {params}"
        got = [logprob for logprob, _ in first_token.prompt_logprobs]
        assert got == pytest.approx([logprob for logprob, _ in expected.prompt_logprobs], abs=1e-4)
        for index in range(params.n):
            if (str(key), index) not in aborted:
                tokens = [t for out in outs if out.index == index for t in out.token_ids]
                assert tokens == expected.outputs[index].token_ids, f"request {key} sample {index}"
