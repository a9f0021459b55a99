"""Gemma 2 and Gemma 3, text only (``Gemma2ForCausalLM``; ``Gemma3ForCausalLM``: the 1B model, the larger
ones ship as multimodal checkpoints).

What differs from Llama, as transformers' modeling_gemma2.py and modeling_gemma3.py have it:
- norms scale by ``1 + weight`` (``GemmaRMSNorm``), and each block is wrapped in two: the attention and
  MLP outputs are normalised before the residual add (post_attention / post_feedforward), the MLP input
  by pre_feedforward_layernorm;
- the embedding is scaled by sqrt(hidden_size), rounded to the weights' dtype;
- the attention scale is query_pre_attn_scalar**-0.5; Gemma 2 soft-caps the scores by tanh
  (``attn_logit_softcapping``), Gemma 3 gives q and k a per-head GemmaRMSNorm before RoPE instead;
- layers alternate between a sliding window and global attention (``layer_types``: every other one in
  Gemma 2, five of six in Gemma 3, whose sliding layers have a RoPE base of their own,
  ``sliding_rope_theta``, and no scaling);
- the MLP gate is tanh-approximated GELU; the logits may be soft-capped by tanh too.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda_engine.layers.attention import AttentionMetadata
from pagoda_engine.layers.embedding import VocabParallelEmbedding
from pagoda_engine.layers.norm import GemmaRMSNorm
from pagoda_engine.layers.rotary import RotaryEmbedding
from pagoda_engine.model_config import ModelConfig
from pagoda_engine.models.llama import (
    AttentionOptions,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    add_and_norm,
    run_layers,
)


def attention_options(config: ModelConfig) -> AttentionOptions:
    """Llama's attention block with Gemma 3's per-head norms (Gemma 2 has none); the scale and Gemma 2's
    score soft-cap come from the config."""
    return AttentionOptions(qkv_bias=config.attention_bias, o_bias=config.attention_bias,
                            qk_norm=config.architecture == "Gemma3ForCausalLM", norm=GemmaRMSNorm)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary_emb, attention_options(config), config.sliding_windows[layer])
        self.mlp = LlamaMLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As LlamaDecoderLayer: this layer's (normalised) MLP output and the residual stream before it."""
        hidden_states, residual = add_and_norm(self.input_layernorm, hidden_states, residual)
        attended = self.post_attention_layernorm(self.self_attn(positions, hidden_states, meta))
        hidden_states, residual = self.pre_feedforward_layernorm(attended, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # sqrt(hidden_size) rounded to the weights' dtype, as transformers has it; a Python float, so the
        # forward makes no tensor of it.
        scale = torch.tensor(config.hidden_size**0.5, device="cpu")
        self.embed_scale = scale.to(self.embed_tokens.weight.dtype).item()
        # One cos/sin cache per kind of layer, shared by the layers of that kind: Gemma 2 has one kind, Gemma 3's
        # sliding layers a base of their own and no scaling.
        global_rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling)
        local_rope = global_rope if config.sliding_rope_theta is None else RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.sliding_rope_theta, None)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, global_rope if config.sliding_windows[layer] is None else local_rope, layer)
            for layer in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return run_layers(self.layers, self.norm, self.embed_tokens(input_ids) * self.embed_scale, positions, meta)


class GemmaForCausalLM(LlamaForCausalLM):
    def build_model(self, config: ModelConfig) -> nn.Module:
        return GemmaModel(config)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in the model's dtype, soft-capped when the config says so."""
        logits = super().compute_logits(hidden_states)
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap
