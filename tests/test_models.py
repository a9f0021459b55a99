"""Model parity with Hugging Face transformers (CPU, float32), the loader and ModelConfig.

Each case saves a tiny random transformers checkpoint, loads it with our loader and compares logits
position by position: a flat multi-prompt prefill without a cache, and a paged-cache run with a
prefix, a chunk and mixed decode steps. transformers is a test-only dependency.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda_engine.layers.attention import Attention, AttentionMetadata
from pagoda_engine.model_config import ModelConfig, MoEConfig
from pagoda_engine.models.loader import load_model

transformers = pytest.importorskip("transformers")

BLOCK_SIZE = 4
ATOL = 1e-4

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)

# name -> (architecture, config overrides, save_pretrained kwargs). Dicts are copied: transformers'
# config classes add keys to the rope dict they are given.
CASES = {
    "llama_gqa_llama3_rope": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                       tie_word_embeddings=False, rope_scaling=dict(LLAMA3_ROPE)), {}),
    "llama_mha_tied_bias": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                                                     tie_word_embeddings=True, attention_bias=True), {}),
    "qwen2_sharded_linear_rope": ("Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                           tie_word_embeddings=True,
                                                           rope_scaling=dict(rope_type="linear", factor=2.0)),
                                  dict(max_shard_size="60KB")),
    "qwen3_gqa4": ("Qwen3ForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                            tie_word_embeddings=False), {}),
    # YaRN past a 32-token original context: the defaults (Qwen2.5's long-context recipe), then every knob.
    "qwen3_yarn_rope": ("Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                 rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                   original_max_position_embeddings=32)), {}),
    # Sliding windows shorter than the prompts: every layer (Mistral), and only from max_window_layers on
    # (Qwen2), where the paged test's chunks and decodes start past the window.
    "mistral_sliding_window": ("MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                          sliding_window=5, tie_word_embeddings=False), {}),
    "qwen2_sliding_top_layer": ("Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                         use_sliding_window=True, sliding_window=6,
                                                         max_window_layers=1), {}),
    # Phi-3 stores qkv_proj and gate_up_proj fused; with Phi-3-mini-4k's kind of window (every layer).
    "phi3_fused_sliding": ("Phi3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                                                   pad_token_id=0),
                           {}),
    # Gemma 3: a sliding layer (window 5, its own RoPE base) then a global one (linear scaling), a query scale
    # that is not head_dim's, soft-capped logits, tied embeddings.
    "gemma3_text": ("Gemma3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                                              query_pre_attn_scalar=24, final_logit_softcapping=3.0, pad_token_id=0,
                                              rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0,
                                                                                      rope_theta=1e6),
                                                               "sliding_attention": dict(rope_type="default",
                                                                                         rope_theta=1e4)}), {}),
    # Gemma 2: sliding and global layers (one RoPE, scaled in both), scores and logits soft-capped (small caps,
    # so that they bite).
    "gemma2_softcaps": ("Gemma2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                  sliding_window=5, query_pre_attn_scalar=24,
                                                  attn_logit_softcapping=1.5, final_logit_softcapping=3.0,
                                                  rope_parameters=dict(rope_type="linear", factor=2.0,
                                                                       rope_theta=1e4),
                                                  pad_token_id=0), {}),
    # Granite's multipliers: embedding, residual branches, logits, and an attention scale of its own.
    "granite_scalars": ("GraniteForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                   embedding_multiplier=12.0, residual_multiplier=0.22,
                                                   logits_scaling=8.0, attention_multiplier=0.05), {}),
    # SmolLM3: no RoPE in every fourth layer (here the second of two, by an explicit no_rope_layers), tied.
    "smollm3_nope": ("SmolLM3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, no_rope_layers=[1, 0],
                                                pad_token_id=0), {}),
    # OLMo 2: norms after each block, q/k normalised over their whole projection.
    "olmo2_post_norms": ("Olmo2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0), {}),
    # Mixtures of experts. Mixtral: 4 experts, 2 a token, renormalised, Mistral's sliding window.
    "mixtral_sliding": ("MixtralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                                   num_local_experts=4, num_experts_per_tok=2, sliding_window=5), {}),
    # Qwen3-MoE: 8 experts, 3 a token, renormalised, the second layer dense (mlp_only_layers).
    "qwen3_moe_dense_layer": ("Qwen3MoeForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                          num_experts=8, num_experts_per_tok=3,
                                                          moe_intermediate_size=32, norm_topk_prob=True,
                                                          mlp_only_layers=[1]), {}),
    # Qwen2-MoE: a gated shared expert beside 6 routed ones (not renormalised), experts every second layer.
    "qwen2_moe_shared_expert": ("Qwen2MoeForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                            num_experts=6, num_experts_per_tok=2,
                                                            moe_intermediate_size=32,
                                                            shared_expert_intermediate_size=48,
                                                            decoder_sparse_step=2), {}),
    # GraniteMoE: Granite's multipliers, every expert in one tensor, the softmax of the top-2 logits of 4.
    "granitemoe_stacked": ("GraniteMoeForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                         intermediate_size=48, num_local_experts=4,
                                                         num_experts_per_tok=2, embedding_multiplier=12.0,
                                                         residual_multiplier=0.22, logits_scaling=8.0,
                                                         attention_multiplier=0.05), {}),
    # OLMoE: q/k normalised over the whole projection, q/k/v clipped (a clip that bites), top-3 of 6.
    "olmoe_clipped": ("OlmoeForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                                               num_experts=6, num_experts_per_tok=3, clip_qkv=0.8, pad_token_id=0),
                      {}),
    "llama_yarn_mscale": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                   rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                     original_max_position_embeddings=32, mscale=0.707,
                                                                     mscale_all_dim=1.0, beta_fast=16.0, beta_slow=2.0,
                                                                     truncate=False)), {}),
}


def make_checkpoint(path: Path, arch: str, overrides: dict, save_kwargs: dict, seed: int = 0):
    """Save a tiny random HF model to ``path``; returns the HF model for reference logits.

    Every weight is redrawn, norms and biases included (HF initialises those to 1 and 0, which
    would let a norm or bias that never got loaded pass unnoticed).
    """
    settings = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    config_class = "Gemma3TextConfig" if arch == "Gemma3ForCausalLM" else arch.replace("ForCausalLM", "Config")
    config = getattr(transformers, config_class)(**{**settings, **overrides})
    config.architectures = [arch]
    model = getattr(transformers, arch)(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.08 * noise)
    model.save_pretrained(path, **save_kwargs)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    out = {}
    for name, (arch, overrides, save_kwargs) in CASES.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_checkpoint(path, arch, overrides, save_kwargs))
    return out


def load_ours(path: Path, dtype: torch.dtype = torch.float32):
    return load_model(ModelConfig.from_dir(path), path, "auto", dtype, "cpu", seed=0)


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0]


@dataclass
class Chunk:
    """Positions ``start..end-1`` of ``tokens`` computed this step; ``blocks`` is the block table."""

    tokens: list[int]
    start: int
    end: int
    blocks: list[int]


def flat_batch(chunks: list[Chunk], num_decodes: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """The (input_ids, positions, metadata) the ModelRunner would build for these chunks."""
    ids, positions, slots = [], [], []
    for c in chunks:
        for p in range(c.start, c.end):
            ids.append(c.tokens[p])
            positions.append(p)
            slots.append(c.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
    starts = [0]
    for c in chunks:
        starts.append(starts[-1] + c.end - c.start)
    seq_lens = [c.end for c in chunks]
    width = max(len(c.blocks) for c in chunks)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([c.blocks + [0] * (width - len(c.blocks)) for c in chunks], dtype=torch.int32),
        num_decodes=num_decodes,
        max_query_len=max(c.end - c.start for c in chunks),
        max_seq_len=max(seq_lens),
        query_start_loc_host=starts,
        seq_lens_host=seq_lens,
    )
    return torch.tensor(ids), torch.tensor(positions), meta


def run_step(model, chunks: list[Chunk], num_decodes: int = 0) -> torch.Tensor:
    input_ids, positions, meta = flat_batch(chunks, num_decodes)
    with torch.inference_mode():
        return model.compute_logits(model(input_ids, positions, meta))


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", CASES)
def test_flat_prefill_matches_hf(checkpoints, name):
    path, hf_model = checkpoints[name]
    model = load_ours(path)
    prompts = [random_tokens(n, seed=n) for n in (7, 1, 13, 4)]
    chunks = [Chunk(p, 0, len(p), list(range(-(-len(p) // BLOCK_SIZE)))) for p in prompts]
    logits = run_step(model, chunks)
    expected = torch.cat([hf_logits(hf_model, p) for p in prompts])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", CASES)
def test_paged_cache_prefix_chunk_and_mixed_decodes_match_hf(checkpoints, name):
    path, hf_model = checkpoints[name]
    model = load_ours(path)
    num_blocks = 16
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        shape = (num_blocks, BLOCK_SIZE, attn.num_kv_heads, attn.head_dim)
        attn.k_cache, attn.v_cache = torch.zeros(shape), torch.zeros(shape)
    a, b = random_tokens(14, seed=1), random_tokens(8, seed=2)
    # Non-contiguous, shuffled blocks; the two sequences' blocks interleave in the cache.
    blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3)).tolist()
    a_blocks, b_blocks = blocks[0:8:2], blocks[1:4:2]
    expected = {"a": hf_logits(hf_model, a), "b": hf_logits(hf_model, b)}
    steps = [
        # (chunks as (sequence, start, end), num_decodes)
        ([("a", 0, 6), ("b", 0, 5)], 0),  # A's prefix and all of B's prompt
        ([("b", 5, 6), ("a", 6, 11)], 1),  # B decodes while A's next chunk prefills
        ([("b", 6, 7), ("a", 11, 12)], 2),
        ([("a", 12, 13), ("b", 7, 8)], 2),
        ([("a", 13, 14)], 1),
    ]
    seqs = {"a": (a, a_blocks), "b": (b, b_blocks)}
    for chunk_specs, num_decodes in steps:
        chunks = [Chunk(seqs[s][0], start, end, seqs[s][1]) for s, start, end in chunk_specs]
        logits = run_step(model, chunks, num_decodes)
        want = torch.cat([expected[s][start:end] for s, start, end in chunk_specs])
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=ATOL)


def test_sharded_checkpoint_was_sharded(checkpoints):
    path, _ = checkpoints["qwen2_sharded_linear_rope"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 300,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 7, "eos_token_id": 9,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dummy_weights_are_deterministic_and_give_finite_logits(dtype):
    config = ModelConfig.from_dict(TINY_QWEN3)
    model = load_model(config, None, "dummy", dtype, "cpu", seed=0)
    again = load_model(config, None, "dummy", dtype, "cpu", seed=0)
    for (name, param), other in zip(model.named_parameters(), again.parameters(), strict=True):
        assert param.dtype == dtype
        assert torch.equal(param, other), name
        if "norm" in name:
            assert torch.all(param == 1), name
    logits = run_step(model, [Chunk(random_tokens(9, seed=0), 0, 9, [0, 1, 2])])
    assert logits.shape == (9, 300) and logits.dtype == dtype
    assert torch.isfinite(logits).all() and logits.std() > 0


def _rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:
    """Copy a single-file checkpoint with its tensors passed through ``edit(dict)``."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(checkpoints, tmp_path):
    src, _ = checkpoints["qwen3_gqa4"]
    path = _rewrite_checkpoint(src, tmp_path / "ckpt", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensor\(s\): model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_ours(path)


def test_unexpected_tensor_is_named(checkpoints, tmp_path):
    src, _ = checkpoints["qwen3_gqa4"]
    path = _rewrite_checkpoint(src, tmp_path / "ckpt",
                               lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_ours(path)


def test_misshapen_tensor_is_named(checkpoints, tmp_path):
    src, _ = checkpoints["qwen3_gqa4"]
    name = "model.layers.0.mlp.up_proj.weight"
    path = _rewrite_checkpoint(src, tmp_path / "ckpt", lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(ValueError, match=rf"cannot load tensor '{name}'"):
        load_ours(path)


def test_a_fused_tensor_of_the_wrong_size_is_named_with_its_pieces(checkpoints, tmp_path):
    src, _ = checkpoints["phi3_fused_sliding"]
    name = "model.layers.1.self_attn.qkv_proj.weight"
    path = _rewrite_checkpoint(src, tmp_path / "ckpt", lambda t: t.update({name: t[name][:-16]}))
    expected = r"112 rows, expected 64 \+ 32 \+ 32 \(q, k, v\)"
    with pytest.raises(ValueError, match=rf"cannot load tensor '{name}'.*{expected}"):
        load_ours(path)


def test_a_missing_expert_is_named_as_the_checkpoint_names_it(checkpoints, tmp_path):
    src, _ = checkpoints["qwen3_moe_dense_layer"]
    name = "model.layers.0.mlp.experts.5.up_proj.weight"
    path = _rewrite_checkpoint(src, tmp_path / "ckpt", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"lacks tensor\(s\): {re.escape(name)}$"):
        load_ours(path)


def test_stacked_experts_in_a_checkpoint_load_as_per_expert_ones(checkpoints, tmp_path):
    """Every expert in one tensor (GraniteMoE's kind, and transformers' in-memory names) loads the same
    weights; a stack of the wrong expert count is named."""
    src, _ = checkpoints["qwen3_moe_dense_layer"]
    prefix = "model.layers.0.mlp.experts"

    def stack(tensors: dict) -> None:
        gate_up = [torch.cat([tensors.pop(f"{prefix}.{e}.{piece}_proj.weight") for piece in ("gate", "up")])
                   for e in range(8)]
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{prefix}.down_proj"] = torch.stack([tensors.pop(f"{prefix}.{e}.down_proj.weight") for e in range(8)])

    stacked = load_ours(_rewrite_checkpoint(src, tmp_path / "stacked", stack))
    assert all(torch.equal(a, b) for a, b in zip(stacked.state_dict().values(), load_ours(src).state_dict().values(),
                                                 strict=True))
    path = _rewrite_checkpoint(src, tmp_path / "short", lambda t: (stack(t), t.update(
        {f"{prefix}.down_proj": t[f"{prefix}.down_proj"][:7]})))
    with pytest.raises(ValueError, match=rf"'{re.escape(prefix)}\.down_proj'.*should stack 8 experts"):
        load_ours(path)


@pytest.mark.parametrize(("architecture", "fields", "expected"), [
    # The Hub's Qwen3-MoE names num_experts; transformers 5 writes num_local_experts.
    ("Qwen3MoeForCausalLM", {"num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32},
     MoEConfig(16, 4, 32, False, (True, True))),
    ("Qwen3MoeForCausalLM", {"num_local_experts": 16, "norm_topk_prob": True, "mlp_only_layers": [0]},
     MoEConfig(16, 8, 768, True, (False, True))),
    # Experts in every decoder_sparse_step-th layer; a shared expert (Qwen2-MoE's defaults).
    ("Qwen2MoeForCausalLM", {"decoder_sparse_step": 2}, MoEConfig(60, 4, 1408, False, (False, True), 5632)),
    # Mixtral's experts are intermediate_size wide, always renormalised.
    ("MixtralForCausalLM", {"num_local_experts": 4}, MoEConfig(4, 2, 96, True, (True, True))),
    ("OlmoeForCausalLM", {"num_experts": 16, "norm_topk_prob": True}, MoEConfig(16, 8, 96, True, (True, True))),
    ("GraniteMoeForCausalLM", {}, MoEConfig(8, 2, 96, True, (True, True))),
    ("LlamaForCausalLM", {"num_experts": 4}, None),
    ("Qwen3MoeForCausalLM", {"num_experts": 0}, None),  # no experts: every layer dense, as transformers builds it
])
def test_moe_configs_read_as_transformers_reads_them(architecture, fields, expected):
    assert ModelConfig.from_dict({**TINY_QWEN3, "architectures": [architecture], **fields}).moe == expected


def test_a_multimodal_gemma3_checkpoint_serves_its_language_model(tmp_path):
    """Gemma3ForConditionalGeneration (gemma-3-4b and up): text_config and the language_model.* tensors; the
    vision tower and projector are not read. Logits of a text-only prompt as transformers' whole model gives."""
    text = dict(CASES["gemma3_text"][1], vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=255, boi_token_index=253, eoi_token_index=254)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(0)
    hf_model = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.05 * torch.randn(param.shape))  # norms and the embedding away from their init
    hf_model.save_pretrained(tmp_path)
    # The reference is the checkpoint as transformers reads it back (its head tied to the embedding again).
    hf_model = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path).float().eval()
    model_config = ModelConfig.from_dir(tmp_path)
    assert (model_config.architecture, model_config.checkpoint_architecture) == (
        "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    model = load_ours(tmp_path)
    prompt = random_tokens(13, seed=4)
    logits = run_step(model, [Chunk(prompt, 0, len(prompt), list(range(-(-len(prompt) // BLOCK_SIZE))))])
    torch.testing.assert_close(logits, hf_logits(hf_model, prompt), atol=ATOL, rtol=ATOL)


def test_a_multimodal_config_ties_as_its_outer_config_says():
    """transformers ties Gemma3ForConditionalGeneration's head as the outer config says (True by default)."""
    text = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
            "vocab_size": 256, "tie_word_embeddings": False}
    outer = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": text}
    assert ModelConfig.from_dict(outer).tie_word_embeddings
    assert not ModelConfig.from_dict({**outer, "tie_word_embeddings": False}).tie_word_embeddings


def test_unknown_architecture_lists_supported():
    config = ModelConfig.from_dict({**TINY_QWEN3, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(config, None, "dummy")


def test_model_config_reads_both_layouts(checkpoints):
    # transformers 4 layout (like Qwen3-0.6B's config.json); generation_config.json's eos ids win, as in
    # transformers' generate, even where they leave config.json's out.
    old = ModelConfig.from_dict(TINY_QWEN3, {"bos_token_id": 7, "eos_token_id": [10, 9]})
    assert (old.rope_theta, old.rope_scaling, old.torch_dtype) == (1e6, None, torch.bfloat16)
    assert (old.head_dim, old.bos_token_id, old.eos_token_ids) == (32, 7, (10, 9))
    assert ModelConfig.from_dict(TINY_QWEN3, {"eos_token_id": 11}).eos_token_ids == (11,)
    assert ModelConfig.from_dict(TINY_QWEN3, {"bos_token_id": 7}).eos_token_ids == (9,)
    # transformers 5 layout, as save_pretrained wrote it: rope_parameters, dtype.
    new = ModelConfig.from_dir(checkpoints["llama_gqa_llama3_rope"][0])
    assert new.rope_scaling == LLAMA3_ROPE
    assert (new.rope_theta, new.torch_dtype, new.head_dim, new.eos_token_ids) == (10000.0, torch.float32, 16, (2,))
    assert not new.tie_word_embeddings and new.num_key_value_heads == 2


@pytest.mark.parametrize(("architecture", "window_fields", "windows"), [
    ("MistralForCausalLM", {}, (4096, 4096)),  # transformers' default window
    ("MistralForCausalLM", {"sliding_window": 64, "use_sliding_window": False}, (64, 64)),  # Mistral has no switch
    ("MistralForCausalLM", {"sliding_window": None}, (None, None)),
    ("Qwen2ForCausalLM", {"sliding_window": 64}, (None, None)),  # off unless use_sliding_window
    # Qwen slides only the layers from max_window_layers (default 28) on: none of 2 layers, by default.
    ("Qwen2ForCausalLM", {"sliding_window": 64, "use_sliding_window": True}, (None, None)),
    ("Qwen2ForCausalLM", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1}, (None, 64)),
    ("Qwen3ForCausalLM", {"use_sliding_window": True, "max_window_layers": 0}, (4096, 4096)),  # the default window
    # transformers 5 writes layer_types, which then decide.
    ("Qwen2ForCausalLM", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1,
                          "layer_types": ["sliding_attention", "full_attention"]}, (64, None)),
    ("LlamaForCausalLM", {"sliding_window": 64, "use_sliding_window": True}, (None, None)),
    ("Phi3ForCausalLM", {"sliding_window": 2047}, (2047, 2047)),
    ("Phi3ForCausalLM", {}, (None, None)),
    # transformers reads no layer_types for Mistral: every layer slides.
    ("MistralForCausalLM", {"sliding_window": 64, "layer_types": ["full_attention", "sliding_attention"]}, (64, 64)),
    # SmolLM3's layers without RoPE slide when use_sliding_window says so.
    ("SmolLM3ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "no_rope_layers": [1, 0]}, (None, 64)),
    ("SmolLM3ForCausalLM", {"sliding_window": 64}, (None, None)),
    # Mixtral slides every layer when it names a window (none by default); Qwen3-MoE every layer when switched on.
    ("MixtralForCausalLM", {}, (None, None)),
    ("MixtralForCausalLM", {"sliding_window": 64}, (64, 64)),
    ("Qwen3MoeForCausalLM", {"sliding_window": 64, "use_sliding_window": True}, (64, 64)),
    ("Qwen2MoeForCausalLM", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1}, (None, 64)),
])
def test_layers_slide_where_transformers_would(architecture, window_fields, windows):
    config = {**TINY_QWEN3, "architectures": [architecture], "max_position_embeddings": 8192, **window_fields}
    model_config = ModelConfig.from_dict(config)
    assert model_config.sliding_windows == windows
    assert model_config.max_position_embeddings == 8192  # the whole context, windowed or not


def test_only_a_window_every_layer_shares_lets_the_cache_release_blocks():
    base = {**TINY_QWEN3, "max_position_embeddings": 8192}
    assert ModelConfig.from_dict({**base, "architectures": ["MistralForCausalLM"],
                                  "sliding_window": 64}).uniform_sliding_window == 64
    qwen_top_layer = {**base, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}
    assert ModelConfig.from_dict(qwen_top_layer).uniform_sliding_window is None  # its first layer is global
    assert ModelConfig.from_dict(base).uniform_sliding_window is None


def test_a_gemma3_config_gets_transformers_defaults_for_what_it_leaves_out():
    """transformers writes only what differs from Gemma3TextConfig's defaults (gemma-3-1b's style of config)."""
    config = ModelConfig.from_dict({"architectures": ["Gemma3ForCausalLM"], "hidden_size": 1152,
                                    "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 1,
                                    "sliding_window": 512, "intermediate_size": 6912, "vocab_size": 262_144})
    assert (config.head_dim, config.query_pre_attn_scalar, config.tie_word_embeddings) == (256, 256, True)
    assert (config.rope_theta, config.sliding_rope_theta, config.hidden_act) == (1e6, 1e4, "gelu_pytorch_tanh")
    assert config.sliding_windows == (512,) * 5 + (None,) + (512,) * 5 + (None,)  # every sixth is global
    assert config.max_position_embeddings == 131_072 and config.final_logit_softcapping is None


@pytest.mark.parametrize(("change", "message"), [
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope type 'longrope' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "lacks factor"),
    ({"rope_scaling": {"type": "linear"}}, "lacks factor"),
    ({"hidden_size": None}, "lacks 'hidden_size'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"torch_dtype": "int8"}, "dtype 'int8'"),
    ({"partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75"),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor 0.5"),
    ({"architectures": ["Gemma3ForCausalLM"], "hidden_activation": "gelu"}, "hidden_act 'gelu'"),
    ({"architectures": ["Gemma3ForCausalLM"], "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"architectures": ["Qwen2MoeForCausalLM"], "qkv_bias": False}, "qkv_bias false"),
    ({"architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 5},
     "num_experts_per_tok 5 must be between 1 and the number of experts"),
    # Phi-3's old name for LongRoPE is not YaRN's.
    ({"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"type": "yarn", "factor": 4.0}},
     "rope type 'longrope' is not supported"),
])
def test_model_config_rejects_what_we_cannot_run(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**TINY_QWEN3, **change})


def _tp_worker(rank: int, world_size: int, port: int, paths: list[str], prompts: list[list[int]], out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        logits = [run_step(load_ours(Path(path)), [Chunk(p, 0, len(p), [0] * 8) for p in prompts]) for path in paths]
        if rank == 0:
            torch.save(logits, out)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensor_parallel_matches_single_rank(tmp_path):
    """Two gloo ranks over two models: Llama with its one KV head replicated on both ranks, an o_proj bias
    and a vocabulary that does not split evenly; Qwen3 with its KV heads split and q/k norms."""
    paths = [tmp_path / "llama", tmp_path / "qwen3"]
    make_checkpoint(paths[0], "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1,
                                                       vocab_size=251, attention_bias=True,
                                                       tie_word_embeddings=True), {})
    make_checkpoint(paths[1], "Qwen3ForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                                       tie_word_embeddings=False), {})
    prompts = [random_tokens(n, seed=n) for n in (5, 3)]
    expected = [run_step(load_ours(path), [Chunk(p, 0, len(p), [0] * 8) for p in prompts]) for path in paths]
    out = tmp_path / "tp_logits.pt"
    ctx = multiprocessing.get_context("spawn")
    args = (2, _free_port(), [str(p) for p in paths], prompts, str(out))
    procs = [ctx.Process(target=_tp_worker, args=(rank, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for got, want in zip(torch.load(out), expected, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def _greedy_both(model_dir: Path) -> tuple[list[list[int]], list[list[int]]]:
    from pagoda_engine import SamplingParams
    from tests.test_engine import hf_greedy, make_llm, prompts_of

    prompts = prompts_of([5, 11])
    ours = make_llm(model_dir).generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    return [o.outputs[0].token_ids for o in ours], hf_greedy(model_dir, prompts, 12)


def test_a_tied_config_with_a_head_of_its_own_keeps_the_head(tmp_path):
    """A fine-tune that untied its head but not its config: transformers keeps the head, and so must we."""
    from tests.conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m", "LlamaForCausalLM", tie_word_embeddings=False)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    ours, theirs = _greedy_both(model_dir)
    assert ours == theirs


def test_a_stray_file_beside_model_safetensors_is_not_read(tmp_path):
    from tests.conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m", "LlamaForCausalLM")
    other = make_tiny_model(tmp_path / "other", "LlamaForCausalLM", seed=1)
    shutil.copy(other / "model.safetensors", model_dir / "model_v0.safetensors")
    ours, theirs = _greedy_both(model_dir)
    assert ours == theirs


def test_a_tensor_in_two_shards_is_an_error(tmp_path):
    from tests.conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m", "LlamaForCausalLM")
    weights = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    save_file(weights, model_dir / "model-00001-of-00002.safetensors")
    save_file({"lm_head.weight": weights["lm_head.weight"]}, model_dir / "model-00002-of-00002.safetensors")
    config = ModelConfig.from_dir(model_dir)
    with pytest.raises(ValueError, match="'lm_head.weight' appears twice"):
        load_model(config, model_dir)


def test_the_shipped_benchmark_configs_read():
    """bench/configs: Qwen3-0.6B (dense) and Qwen3-30B-A3B (128 experts, 8 a token, renormalised, every layer)."""
    configs = Path(__file__).parents[1] / "bench" / "configs"
    assert ModelConfig.from_dir(configs / "qwen3-0.6b").moe is None
    moe = ModelConfig.from_dir(configs / "qwen3-30b-a3b").moe
    assert moe == MoEConfig(128, 8, 768, True, (True,) * 48)
