"""Tensor parallelism: two ranks give the tokens one gives; a worker that dies is a clear error, never a hang.

The CPU tests run rank 0 in this process and rank 1 in a spawned worker, over gloo. The GPU test
(two or more CUDA GPUs) runs NCCL with CUDA graphs.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from pagoda_engine import LLM, SamplingParams
from pagoda_engine.async_engine import AsyncEngine, EngineDeadError
from pagoda_engine.tp_workers import RanksOutOfStepError, WorkerDiedError
from tests.conftest import TINY_CONFIGS, make_tiny_model
from tests.test_engine import make_llm, prompts_of
from tests.test_engine_service import Server, collect, greedy

# What each case shards differently across two ranks.
CASES = {
    # One KV head, replicated on both ranks; a tied vocabulary that does not split evenly (of 251 rows,
    # the second rank holds 125 and a padding row).
    "llama_one_kv_head": dict(arch="LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=1,
                              vocab_size=251, tie_word_embeddings=True),
    # KV heads split one per rank; q/k/v biases sharded with their weights.
    "qwen2": dict(arch="Qwen2ForCausalLM", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # q/k RMSNorms over each rank's heads; an explicit head_dim.
    "qwen3": TINY_CONFIGS["qwen3"],
    # Fused qkv_proj and gate_up_proj in the checkpoint, cut into pieces and then sliced per rank.
    "phi3": TINY_CONFIGS["phi3"],
    # Gemma's four norms a layer and per-head q/k norms, a sliding layer and a global one.
    "gemma3": TINY_CONFIGS["gemma3"],
    # Soft-capped scores and logits.
    "gemma2": TINY_CONFIGS["gemma2"],
    # q/k norms over the whole projection: each rank's sum of squares, summed over the ranks.
    "olmo2": TINY_CONFIGS["olmo2"],
    # Each expert's intermediate features split across the ranks, the router replicated; a shared expert.
    "qwen3_moe": TINY_CONFIGS["qwen3_moe"],
    "qwen2_moe": TINY_CONFIGS["qwen2_moe"],
    # OLMoE: OLMo's q/k norms summed over the ranks, and experts.
    "olmoe": TINY_CONFIGS["olmoe"],
    # GraniteMoE's stacked experts, cut per expert and then per rank.
    "granitemoe": TINY_CONFIGS["granitemoe"],
}

# A 48-token budget chunks the 70-token prompt; the repeated prefix is served from the prefix cache.
PROMPTS = prompts_of([3, 70, 20, 9], vocab=250) + [prompts_of([40], vocab=250)[0] + [7, 8]] * 2
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE = dict(max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {name: make_tiny_model(tmp_path_factory.mktemp(name), **settings) for name, settings in CASES.items()}


def greedy_tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", CASES)
def test_two_ranks_match_one(model_dirs, name):
    expected = greedy_tokens(make_llm(model_dirs[name], **ENGINE))
    with make_llm(model_dirs[name], tensor_parallel_size=2, **ENGINE) as llm:
        assert greedy_tokens(llm) == expected
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
        # Its process group would split a second engine's layers too.
        with pytest.raises(RuntimeError, match="already belongs to a process group of 2 ranks"):
            make_llm(model_dirs[name])
    assert not torch.distributed.is_initialized()


@pytest.mark.timeout(60)
def test_two_ranks_score_prompts_as_one(model_dirs):
    """Prompt logprobs run the LM head, which gathers the vocabulary (split unevenly here) across ranks, on
    every scored row: the worker follows rank 0's slices, here its default and then three rows (several
    gathers per step). The 70-token prompt spans two steps; the repeated one is scored whole both times."""
    model_dir = model_dirs["llama_one_kv_head"]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=4)
    expected = make_llm(model_dir, **ENGINE).generate(PROMPTS, params)
    with make_llm(model_dir, tensor_parallel_size=2, **ENGINE) as llm:
        for slice_rows in (llm.engine.runner.prompt_slice_rows, 3):
            llm.engine.runner.prompt_slice_rows = slice_rows
            got = llm.generate(PROMPTS, params)
            for prompt, ours, want in zip(PROMPTS, got, expected, strict=True):
                assert ours.outputs[0].token_ids == want.outputs[0].token_ids
                assert len(ours.prompt_logprobs) == len(prompt) - 1
                for (logprob, top), (want_logprob, want_top) in zip(ours.prompt_logprobs, want.prompt_logprobs,
                                                                    strict=True):
                    assert logprob == pytest.approx(want_logprob, abs=1e-4)
                    assert [lp for _, lp in top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.timeout(60)
def test_a_model_that_does_not_split_is_a_clear_error_and_leaves_nothing_behind(tmp_path):
    model_dir = make_tiny_model(tmp_path, "LlamaForCausalLM", hidden_size=48, num_attention_heads=3,
                                num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"number of attention heads \(3\) is not divisible by the tensor-parallel"):
        make_llm(model_dir, tensor_parallel_size=2)
    assert not tp_worker_pids()
    assert not torch.distributed.is_initialized()


@pytest.mark.timeout(60)
def test_kv_heads_that_cannot_be_replicated_are_a_clear_error(monkeypatch):
    from pagoda_engine.layers import linear

    monkeypatch.setattr(linear, "tp_size", lambda: 3)
    monkeypatch.setattr(linear, "tp_rank", lambda: 0)
    with pytest.raises(ValueError, match=r"size \(3\) must be a multiple of the number of KV heads \(2\)"):
        linear.QKVParallelLinear(48, 8, 6, 2)


# Imported at start by every process with this on its PYTHONPATH, which the test sets only for the workers
# it spawns: each exits where it would size its KV cache with rank 0.
EXIT_IN_SETUP_CACHE = """
import os
from pagoda_engine.model_runner import ModelRunner
ModelRunner.setup_cache = lambda self: os._exit(3)
"""


@pytest.mark.timeout(60)
def test_a_worker_that_dies_while_the_cache_is_sized_is_a_clear_error(model_dirs, tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(EXIT_IN_SETUP_CACHE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    with pytest.raises(WorkerDiedError, match="rank 1 .* exited with code 3"):
        make_llm(model_dirs["qwen2"], tensor_parallel_size=2)
    assert not tp_worker_pids()
    assert not torch.distributed.is_initialized()


@pytest.mark.timeout(60)
def test_a_step_interrupted_on_rank_0_fails_the_next_at_once(model_dirs):
    """Ctrl-C in rank 0's forward leaves the worker inside the step: the next step must not pair with it."""
    with make_llm(model_dirs["qwen2"], tensor_parallel_size=2) as llm:
        mlp = llm.engine.runner.model.model.layers[1].mlp
        forward = mlp.forward

        def interrupted(x):
            mlp.forward = forward
            raise KeyboardInterrupt

        mlp.forward = interrupted
        with pytest.raises(KeyboardInterrupt):
            greedy_tokens(llm)
        start = time.monotonic()
        with pytest.raises(RanksOutOfStepError, match="out of step"):
            greedy_tokens(llm)
        assert time.monotonic() - start < 5
    assert not tp_worker_pids()
    assert not torch.distributed.is_initialized()


def tp_worker_pids() -> list[int]:
    return [p.pid for p in multiprocessing.active_children() if p.name.startswith("pagoda-tp-rank")]


@pytest.mark.timeout(60)
def test_a_worker_killed_mid_generation_is_a_clear_error(model_dirs):
    with make_llm(model_dirs["qwen2"], tensor_parallel_size=2) as llm:
        (pid,) = tp_worker_pids()
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=f"rank 1 \\(pid {pid}\\) exited with code -9"):
            greedy_tokens(llm, PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        assert time.monotonic() - start < 20
    assert not torch.distributed.is_initialized()


@pytest.mark.timeout(60)
def test_a_worker_killed_while_idle_fails_the_async_engine(model_dirs):
    """Nothing is running when the worker dies: the engine core still notices at once (the service then stops)."""
    config = make_llm(model_dirs["qwen2"]).engine.config
    config.tensor_parallel_size = 2

    async def main() -> None:
        engine = AsyncEngine(config)
        await engine.start()
        (worker,) = psutil.Process(engine._process.pid).children()  # the core's rank 1
        os.kill(worker.pid, signal.SIGKILL)
        await asyncio.wait_for(engine.failed.wait(), timeout=20)
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("after", PROMPTS[0], GREEDY):
                pass
        await engine.stop()
        assert not engine._process.is_alive()

    asyncio.run(main())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_with_cuda_graphs_match_one(tmp_path):
    model_dir = make_tiny_model(tmp_path / "llama", "LlamaForCausalLM", hidden_size=256, num_attention_heads=4,
                                num_key_value_heads=2)
    prompts = prompts_of([5, 17, 40, 64, 3, 9, 30, 21])
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    config = dict(device="cuda", dtype="float32", num_kv_blocks=512, block_size=16)
    with LLM(model_dir, **config) as llm:
        expected = greedy_tokens(llm, prompts, params)
    with LLM(model_dir, tensor_parallel_size=2, **config) as llm:
        assert llm.engine.runner.graphs is not None
        assert greedy_tokens(llm, prompts, params) == expected


def spawned_children(pid: int) -> list[int]:
    """Pids of the processes ``pid`` spawned through multiprocessing (not its resource tracker)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.timeout(60)
def test_the_service_exits_when_a_worker_dies(model_dirs):
    server = Server(model_dirs["qwen2"], "--tensor-parallel-size", "2", "--block-size", "4", "--num-kv-blocks", "64")
    try:
        server.health_statuses_until_serving()
        assert collect(server.stub.Generate(greedy(PROMPTS[0], 4)))[0].tokens
        (worker,) = spawned_children(server.process.pid)
        os.kill(worker, signal.SIGKILL)
        assert server.process.wait(timeout=20) == 1
    finally:
        server.stop()
