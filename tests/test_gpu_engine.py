"""The engine on a CUDA GPU: Triton attention + CUDA graphs against transformers and against eager."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pagoda_engine import LLM, SamplingParams
from pagoda_engine.sampling_params import StructuredOutput
from pagoda_engine.sequence import FinishReason
from pagoda_engine.structured_output.compiler import to_regex
from pagoda_engine.structured_output.vocabulary import read_token_bytes
from tests.conftest import make_tiny_model
from tests.test_engine import hf_greedy, prompts_of
from tests.tokenizer_helpers import byte_level_tokenizer_json, write_tokenizer_dir

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def gpu_model_dirs(tmp_path_factory):
    """Tiny models with the head dims the GPU kernels are built for (64 and 128)."""
    return {
        "llama": make_tiny_model(tmp_path_factory.mktemp("llama64"), "LlamaForCausalLM", hidden_size=256,
                                 num_attention_heads=4, num_key_value_heads=2),
        "qwen3": make_tiny_model(tmp_path_factory.mktemp("qwen3_128"), "Qwen3ForCausalLM", hidden_size=128,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=128),
        # A 24-token window: prompts and answers run past it in prefill, chunks and decodes.
        "mistral_sliding": make_tiny_model(tmp_path_factory.mktemp("mistral64"), "MistralForCausalLM",
                                           hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                           sliding_window=24),
        # Gemma 3's head dim (256), a sliding and a global layer, soft-capped logits.
        "gemma3": make_tiny_model(tmp_path_factory.mktemp("gemma3_256"), "Gemma3ForCausalLM", hidden_size=256,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=24,
                                  layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
                                  pad_token_id=0),
        # Gemma 2's soft-capped scores (a small cap, so that it bites) through the kernels.
        "gemma2": make_tiny_model(tmp_path_factory.mktemp("gemma2_256"), "Gemma2ForCausalLM", hidden_size=256,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=24,
                                  attn_logit_softcapping=5.0, pad_token_id=0),
        # Mixtures of experts through the grouped GEMM: Qwen3-MoE's top-8 of 32 (decode batches give 16-row
        # tiles, prefills 64-row ones) and Qwen2-MoE's shared expert.
        "qwen3_moe": make_tiny_model(tmp_path_factory.mktemp("qwen3_moe_128"), "Qwen3MoeForCausalLM",
                                     hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                                     num_experts=32, num_experts_per_tok=8, moe_intermediate_size=64,
                                     norm_topk_prob=True),
        "qwen2_moe": make_tiny_model(tmp_path_factory.mktemp("qwen2_moe_64"), "Qwen2MoeForCausalLM",
                                     hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                                     num_experts_per_tok=2, moe_intermediate_size=96,
                                     shared_expert_intermediate_size=128),
        # OLMoE: torch-level q/k norms over the whole projection, clipped q/k/v, then the grouped GEMMs.
        "olmoe": make_tiny_model(tmp_path_factory.mktemp("olmoe_64"), "OlmoeForCausalLM", hidden_size=256,
                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_experts=8,
                                 num_experts_per_tok=2, clip_qkv=2.0, pad_token_id=0),
    }


def gpu_llm(model_dir, **config) -> LLM:
    config.setdefault("num_kv_blocks", 512)
    config.setdefault("block_size", 16)
    return LLM(model_dir, device="cuda", **config)


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral_sliding", "gemma2", "gemma3", "qwen3_moe",
                                  "qwen2_moe", "olmoe"])
def test_fp32_gpu_matches_transformers(gpu_model_dirs, name):
    model_dir = gpu_model_dirs[name]
    prompts = prompts_of([5, 17, 40, 64])
    llm = gpu_llm(model_dir, dtype="float32")
    assert llm.engine.runner.backend_name != "torch"
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert ours == hf_greedy(model_dir, prompts, 32)


@pytest.mark.parametrize(("dtype", "batch_invariant", "num_prompts"),
                         [("float32", False, 7), ("bfloat16", False, 7), ("bfloat16", True, 7),
                          ("bfloat16", False, 40)])
def test_cuda_graphs_match_eager(gpu_model_dirs, dtype, batch_invariant, num_prompts):
    """Token for token, as the batch shrinks through graph sizes it pads up to (7 rows replay size 8, ...).
    Forty prompts take the linear layers past the skinny GEMM to cuBLAS, at padded and unpadded row counts."""
    model_dir = gpu_model_dirs["qwen3"]
    prompts = prompts_of([3 + (17 * i) % 67 for i in range(num_prompts)])
    params = [replace(GREEDY, max_tokens=12 + 3 * i) for i in range(len(prompts))]
    eager = gpu_llm(model_dir, dtype=dtype, enforce_eager=True, batch_invariant=batch_invariant)
    graphs = gpu_llm(model_dir, dtype=dtype, batch_invariant=batch_invariant)
    assert graphs.engine.runner.graphs is not None
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in graphs.generate(prompts, params)] == expected


def test_moe_cuda_graphs_match_eager(gpu_model_dirs):
    """The routed experts' alignment and grouped GEMMs inside the decode graphs, in bf16, as batches shrink."""
    prompts = prompts_of([3 + (17 * i) % 67 for i in range(20)])
    params = [replace(GREEDY, max_tokens=12 + 3 * i) for i in range(len(prompts))]
    eager = gpu_llm(gpu_model_dirs["qwen3_moe"], dtype="bfloat16", enforce_eager=True)
    graphs = gpu_llm(gpu_model_dirs["qwen3_moe"], dtype="bfloat16")
    assert graphs.engine.runner.graphs is not None
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in graphs.generate(prompts, params)] == expected


def test_bias_and_allowlist_with_cuda_graphs_match_eager(gpu_model_dirs):
    """The sampler runs after the graph's forward, on every step's own metadata: with graphs on, biased and
    restricted rows (greedy, and seeded draws through the fused kernel) give eager's tokens, as the batch
    shrinks through padded graph sizes."""
    model_dir = gpu_model_dirs["qwen3"]
    prompts = prompts_of([3 + (13 * i) % 50 for i in range(11)])
    kinds = [dict(temperature=0.0, logit_bias={77: 100.0}), dict(temperature=0.8, allowed_token_ids=[5, 9, 77, 200]),
             dict(temperature=1.0, logit_bias={9: 3.0, 10: -100.0}), dict(temperature=0.7), dict(temperature=0.0)]
    params = [SamplingParams(seed=i, max_tokens=10 + 2 * i, ignore_eos=True, **kinds[i % len(kinds)])
              for i in range(len(prompts))]
    eager = gpu_llm(model_dir, dtype="bfloat16", enforce_eager=True)
    graphs = gpu_llm(model_dir, dtype="bfloat16")
    assert graphs.engine.runner.graphs is not None
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in graphs.generate(prompts, params)] == expected
    for p, tokens in zip(params, expected, strict=True):
        if p.logit_bias.get(77) == 100.0:
            assert tokens == [77] * p.max_tokens
        assert 10 not in tokens or p.logit_bias.get(10) != -100.0
        assert not p.allowed_token_ids or set(tokens) <= set(p.allowed_token_ids)


def test_structured_output_with_cuda_graphs_matches_eager(tmp_path):
    """Grammar rows (a regex, a choice, any JSON object) beside free rows, greedy and seeded: the bit masks
    reach the sampler after the graph's forward, so graphs give eager's tokens, and every finished
    structured sample spells a whole match."""
    model_dir = make_tiny_model(tmp_path, "Qwen3ForCausalLM", vocab_size=400, hidden_size=128, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=128, bos_token_id=0, eos_token_id=2)
    write_tokenizer_dir(model_dir, byte_level_tokenizer_json(400))
    specs = [StructuredOutput(regex="[a-z]{2,6}( [a-z]{2,6}){2}[.!]"), StructuredOutput(choice=("yes", "no")),
             StructuredOutput(json_object=True), None]
    prompts = prompts_of([5 + (7 * i) % 30 for i in range(8)])
    params = [SamplingParams(temperature=0.0 if i % 3 else 0.8, seed=i, max_tokens=40,
                             structured_output=specs[i % len(specs)]) for i in range(len(prompts))]
    eager = gpu_llm(model_dir, dtype="bfloat16", enforce_eager=True)
    graphs = gpu_llm(model_dir, dtype="bfloat16")
    expected = [o.outputs[0] for o in eager.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in graphs.generate(prompts, params)] == [s.token_ids for s in expected]
    token_bytes = read_token_bytes(model_dir / "tokenizer.json", 400)
    for p, sample in zip(params, expected, strict=True):
        if p.structured_output is None or sample.finish_reason is not FinishReason.STOP:
            continue
        text = b"".join(token_bytes[t] or b"" for t in sample.token_ids).decode()
        assert re.fullmatch(to_regex(p.structured_output), text), text


def teacher_forced(ref: LLM, low: LLM, steps: int = 128):
    """Along ``ref``'s greedy run, ``low``'s next token at each prefix: (agree, ref's top-two margins, the
    chosen-token logprob differences where they agree)."""
    prompt = prompts_of([12])[0]
    out = ref.generate(prompt, SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True,
                                              logprobs=2))[0].outputs[0]
    margins = [top[0][1] - top[1][1] for _, top in out.logprobs]
    prefixes = [prompt + out.token_ids[:i] for i in range(steps)]
    one_step = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=1)
    forced = low.generate(prefixes, one_step)
    agree = [f.outputs[0].token_ids[0] == out.token_ids[i] for i, f in enumerate(forced)]
    diffs = [abs(f.outputs[0].logprobs[0][0] - out.logprobs[i][0]) for i, f in enumerate(forced) if agree[i]]
    return agree, margins, diffs


def test_bf16_tracks_fp32_over_a_long_generation(gpu_model_dirs):
    """Teacher-forced along fp32's 128-token greedy run, bf16 picks the same next token wherever fp32's
    choice is clear, with a close logprob: errors stay at rounding level rather than compounding.

    Random weights make many near-ties (top two within bf16's rounding), where either pick is right."""
    model_dir = gpu_model_dirs["llama"]
    agree, margins, diffs = teacher_forced(gpu_llm(model_dir, dtype="float32"),
                                           gpu_llm(model_dir, dtype="bfloat16"))
    clear = [i for i, margin in enumerate(margins) if margin > 0.25]
    assert len(clear) >= 0.5 * len(agree) and all(agree[i] for i in clear)
    assert sum(agree) >= 0.85 * len(agree)
    # bf16 keeps 8 significant bits: logits of magnitude ~10 carry ~0.04 of rounding each (measured mean 0.054
    # on the H200); a wrong kernel is off by whole nats.
    assert sum(diffs) / len(diffs) < 0.1


def test_fp8_kv_cache_tracks_bf16(tmp_path):
    """Teacher-forced along the bf16 cache's 128-token greedy run, the fp8 cache picks the same token
    wherever the choice is clear, with close logprobs; CUDA graphs on. It holds twice the blocks per byte.
    Narrower weights than gpu_model_dirs', as in test_engine's fp8 test: attention less peaked."""
    model_dir = make_tiny_model(tmp_path, "LlamaForCausalLM", hidden_size=256, num_attention_heads=4,
                                num_key_value_heads=2, initializer_range=0.05)
    bf16 = gpu_llm(model_dir, dtype="bfloat16")
    fp8 = gpu_llm(model_dir, dtype="bfloat16", kv_cache_dtype="fp8")
    runner = fp8.engine.runner
    assert runner.kv_cache.dtype == torch.float8_e4m3fn and runner.graphs is not None
    assert runner.kv_bytes_per_block() * 2 == bf16.engine.runner.kv_bytes_per_block()
    agree, margins, diffs = teacher_forced(bf16, fp8)
    clear = [i for i, margin in enumerate(margins) if margin > 0.25]
    print(f"fp8 KV: agree {sum(agree)}/{len(agree)}, clear {len(clear)}, mean |dlogprob| {sum(diffs) / len(diffs):.3f}")
    assert len(clear) >= 0.3 * len(agree) and all(agree[i] for i in clear)
    assert sum(agree) >= 0.8 * len(agree)
    assert sum(diffs) / len(diffs) < 0.1


def test_preemption_and_chunking_on_gpu(gpu_model_dirs):
    model_dir = gpu_model_dirs["qwen3"]
    prompts = prompts_of([30, 45, 12, 60, 25, 50])
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in gpu_llm(model_dir, dtype="float32").generate(prompts, params)]
    tight = gpu_llm(model_dir, dtype="float32", num_kv_blocks=12, max_num_batched_tokens=32)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params)] == expected


def test_kv_cache_is_sized_from_free_memory(gpu_model_dirs):
    llm = gpu_llm(gpu_model_dirs["llama"], dtype="bfloat16", num_kv_blocks=None, gpu_memory_utilization=0.3)
    runner = llm.engine.runner
    cache_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0.1 * total < cache_bytes < 0.3 * total


# Run in a fresh process: kernels earlier tests compiled would otherwise hide what warm-up misses (the hook
# reports a kernel the process has not compiled or loaded yet; a load from the disk cache counts too).
_SERVE_AND_REPORT = """
import json, sys
from dataclasses import replace
from pagoda_engine import LLM, SamplingParams
from pagoda_engine.kernels.compile_watch import triton_compiles
from tests.test_engine import prompts_of
llm = LLM(sys.argv[1], device="cuda", dtype="bfloat16", block_size=16, max_num_batched_tokens=256,
          num_kv_blocks=int(sys.argv[2]) or None, gpu_memory_utilization=float(sys.argv[3]),
          **json.loads(sys.argv[4]))
lengths = [17, 280, 33, 300, 420, 5, 260, 390, 64, 310, 129, 450, 40, 8, 600, 77, 150, 3, 500, 222]
samplers = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.6),
            SamplingParams(temperature=0.8, top_k=20, top_p=0.9), SamplingParams(repetition_penalty=1.2),
            SamplingParams(min_p=0.1, logprobs=2), SamplingParams(temperature=0.7, n=2, prompt_logprobs=3),
            SamplingParams(temperature=0.9, logit_bias={5: 2.0, 9: -100.0}),
            SamplingParams(allowed_token_ids=list(range(3, 8192, 9))),
            SamplingParams(temperature=0.0, logit_bias={3: 1.0}, allowed_token_ids=[3, 4, 5], top_p=0.9)]
params = [replace(samplers[i % len(samplers)], max_tokens=4 + 5 * i, ignore_eos=True) for i in range(len(lengths))]
with triton_compiles() as compiled:
    llm.generate(prompts_of(lengths), params)
print(json.dumps(compiled))
"""


# A mixture of experts whose decode batches take 16-row tiles and prefill chunks 64-row ones.
MOE = dict(arch="Qwen3MoeForCausalLM", num_experts=32, num_experts_per_tok=8, moe_intermediate_size=64)


@pytest.mark.parametrize(("num_kv_blocks", "flags", "model"), [
    (1024, {}, {}), (0, {}, {}), (1024, {"batch_invariant": True, "enforce_eager": True}, {}),
    (0, {"kv_cache_dtype": "fp8"}, {}), (1024, {}, MOE),
], ids=["explicit-cache", "sized-from-memory", "batch-invariant-eager", "fp8-cache", "moe-explicit-cache"])
def test_warm_up_leaves_no_kernel_to_compile(tmp_path_factory, num_kv_blocks, flags, model):
    """After the engine's own warm-up, serving compiles no Triton kernel: a batch that shrinks through many
    sizes and split counts (8 KV heads), contexts of several decode pieces, chunked prefill beside decodes
    (eager steps with block tables of many widths), greedy, sampled, filtered and penalised rows, a
    vocabulary the draw slices over several programs; with the cache sized either way (an explicit size
    skips the memory-profiling pass); batch-invariant decode without graphs, whose capture would have
    compiled the split variants otherwise; and a mixture of experts without the profiling pass."""
    model = make_tiny_model(tmp_path_factory.mktemp("warm_up"), **{
        "arch": "Qwen3ForCausalLM", "hidden_size": 256, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 8192, "max_position_embeddings": 2048, **model})
    # The budget counts memory other processes hold, this test process among them: leave 10% over it.
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    utilization = f"{min(0.95, (total - free) / total + 0.1):.3f}"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _SERVE_AND_REPORT, str(model), str(num_kv_blocks), utilization,
                             json.dumps(flags)], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
