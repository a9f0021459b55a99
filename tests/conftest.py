"""Shared fixtures and helpers: the default model (converted once per machine), GPU skipping, tiny random
checkpoints, and running a kernel check under the Triton interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (fetched and converted on first use)."""
    from pagoda_client.fetch_model import DEFAULT_MODEL, fetch_model

    override = os.environ.get("PAGODA_TEST_MODEL_DIR")
    if override:
        return Path(override)
    return fetch_model(DEFAULT_MODEL)


TINY_CONFIGS = {
    "llama": dict(arch="LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "llama_tied_mha": dict(arch="LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=4,
                           tie_word_embeddings=True),
    "qwen2": dict(arch="Qwen2ForCausalLM", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(arch="Qwen3ForCausalLM", num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                  tie_word_embeddings=False),
    # A sliding window shorter than most prompts plus their answers.
    "mistral_sliding": dict(arch="MistralForCausalLM", num_attention_heads=4, num_key_value_heads=2,
                            sliding_window=24, tie_word_embeddings=False),
    # Fused qkv_proj and gate_up_proj in the checkpoint.
    "phi3": dict(arch="Phi3ForCausalLM", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 pad_token_id=0),
    # Sliding and global layers (window 24), soft-capped logits, tied embeddings.
    "gemma3": dict(arch="Gemma3ForCausalLM", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   sliding_window=24, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
                   final_logit_softcapping=30.0, pad_token_id=0),
    # Alternating sliding (24) and global layers, soft-capped scores and logits.
    "gemma2": dict(arch="Gemma2ForCausalLM", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   sliding_window=24, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                   final_logit_softcapping=30.0, pad_token_id=0),
    # Every fourth layer without RoPE: of four, the last.
    "smollm3": dict(arch="SmolLM3ForCausalLM", num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                    pad_token_id=0),
    "olmo2": dict(arch="Olmo2ForCausalLM", num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    # Mixtures of experts: Mixtral's renormalised top-2 of 4; Qwen3-MoE's top-3 of 8 with a dense layer;
    # Qwen2-MoE's shared expert beside top-2 of 6.
    "mixtral": dict(arch="MixtralForCausalLM", num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                    num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(arch="Qwen3MoeForCausalLM", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True,
                      mlp_only_layers=[1]),
    "qwen2_moe": dict(arch="Qwen2MoeForCausalLM", num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                      num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "granitemoe": dict(arch="GraniteMoeForCausalLM", num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                       num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                       logits_scaling=8.0, attention_multiplier=0.05),
    "olmoe": dict(arch="OlmoeForCausalLM", num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                  num_experts=6, num_experts_per_tok=3, clip_qkv=2.0, pad_token_id=0),
    "granite": dict(arch="GraniteForCausalLM", num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=12.0,
                    residual_multiplier=0.22, logits_scaling=8.0, attention_multiplier=0.05),
}


def make_tiny_model(path: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Save a small random Hugging Face checkpoint (safetensors) and return its directory.

    Weights are drawn wider than HF's default init so that greedy decoding has clear winners: parity
    tests then compare real choices, not float-rounding coin tosses between near-equal logits.
    """
    import torch
    import transformers

    # Each architecture's config class is named after it, but for Gemma 3's text-only one.
    config_cls = getattr(transformers, "Gemma3TextConfig" if arch == "Gemma3ForCausalLM"
                         else arch.replace("ForCausalLM", "Config"))
    settings = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    max_position_embeddings=512, initializer_range=0.15, bos_token_id=1, eos_token_id=2)
    settings.update(overrides)
    config = config_cls(**settings)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny checkpoint per entry of TINY_CONFIGS."""
    return {
        name: make_tiny_model(tmp_path_factory.mktemp(name), **settings) for name, settings in TINY_CONFIGS.items()
    }


def run_under_interpreter(module: str) -> None:
    """``module``'s check_under_interpreter() in a subprocess: TRITON_INTERPRET must be set before triton is
    first imported."""
    root = Path(__file__).resolve().parents[1]
    code = f"from {module} import check_under_interpreter; check_under_interpreter()"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def read_loaded_scalars() -> None:
    """Let the interpreter use a value loaded from memory as a Python int (a loop bound, a branch's test)."""
    import triton.runtime.interpreter as interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
