"""Architecture name (``architectures[0]`` in config.json) -> model class."""

from __future__ import annotations

from torch import nn

from pagoda_engine.model_config import TEXT_PARTS
from pagoda_engine.models.gemma import GemmaForCausalLM
from pagoda_engine.models.llama import LlamaForCausalLM
from pagoda_engine.models.olmo2 import Olmo2ForCausalLM, OlmoeForCausalLM
from pagoda_engine.models.qwen2 import Qwen2ForCausalLM
from pagoda_engine.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    # Mistral's checkpoints have Llama's layout and names.
    "MistralForCausalLM": LlamaForCausalLM,
    # Phi-3 and Phi-4 too; their checkpoints store qkv_proj and gate_up_proj fused (the loader cuts them).
    "Phi3ForCausalLM": LlamaForCausalLM,
    # Granite (3.x dense): Llama with multipliers on the embedding, the blocks and the logits (ModelConfig).
    "GraniteForCausalLM": LlamaForCausalLM,
    # SmolLM3: Llama whose every fourth layer has no RoPE (ModelConfig.rope_layers).
    "SmolLM3ForCausalLM": LlamaForCausalLM,
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    # Mixtures of experts: the same decoders with ModelConfig.moe's experts for an MLP (layers/moe.py).
    "MixtralForCausalLM": LlamaForCausalLM,
    "GraniteMoeForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3ForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    """``architecture`` is ModelConfig's: a multimodal checkpoint's text part is named as its text-only model."""
    if architecture not in MODELS:
        supported = [*MODELS, *(f"{name} (its text model)" for name in TEXT_PARTS)]
        raise ValueError(f"architecture {architecture!r} is not supported (supported: {', '.join(supported)})")
    return MODELS[architecture]
