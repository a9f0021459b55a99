"""Qwen3: the Llama decoder with a per-head RMSNorm on q and k before RoPE, and an explicit head_dim."""

from __future__ import annotations

from pagoda_engine.model_config import ModelConfig
from pagoda_engine.models.llama import AttentionOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config: ModelConfig) -> AttentionOptions:
        return AttentionOptions(qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True)
