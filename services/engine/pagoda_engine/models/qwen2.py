"""Qwen2 / Qwen2.5: the Llama decoder with a bias on q, k and v (not on o)."""

from __future__ import annotations

from pagoda_engine.model_config import ModelConfig
from pagoda_engine.models.llama import AttentionOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config: ModelConfig) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True, o_bias=False, qk_norm=False)
