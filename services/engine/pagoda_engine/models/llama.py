"""The Llama decoder (SmolLM2 and SmolLM3's NoPE layers, Llama 3, Mistral with its sliding window, Phi-3,
Granite's scalars), shared by Qwen2 and Qwen3, and with experts for an MLP by Mixtral, GraniteMoE, Qwen2-MoE
and Qwen3-MoE.

The three families differ only in the attention block: which projections carry a bias, and whether
q and k get a per-head RMSNorm before RoPE. ``LlamaForCausalLM.attention_options`` is that
difference; the Qwen classes override it and nothing else. Where ``ModelConfig.moe`` says so, a layer's
MLP is a mixture of experts (layers/moe.py) instead.

Parameter names follow Hugging Face's, except that q/k/v and gate/up are fused (``qkv_proj``,
``gate_up_proj``); models/loader.py maps checkpoint names onto ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pagoda_engine.layers.activation import GeluTanhAndMul, SiluAndMul
from pagoda_engine.layers.attention import Attention, AttentionMetadata
from pagoda_engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda_engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagoda_engine.layers.moe import SparseMoeBlock
from pagoda_engine.layers.norm import RMSNorm
from pagoda_engine.layers.rotary import RotaryEmbedding
from pagoda_engine.model_config import ModelConfig


@dataclass(frozen=True)
class AttentionOptions:
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    # The per-head q/k norm's kind (Gemma 3's scales by 1 + weight).
    norm: type[RMSNorm] = RMSNorm


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, options: AttentionOptions,
                 sliding_window: int | None):
        super().__init__()
        head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=options.qkv_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=options.o_bias)
        self.rotary_emb = rotary_emb  # None: no position encoding in this layer (SmolLM3's NoPE layers)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        # Granite's multiplier, Gemma's query_pre_attn_scalar**-0.5, else head_dim**-0.5; Gemma 2 caps scores.
        scale = config.attention_multiplier or (config.query_pre_attn_scalar or head_dim) ** -0.5
        self.attn = Attention(self.num_heads, head_dim, self.num_kv_heads, scale, sliding_window,
                              config.attn_logit_softcapping)
        if options.qk_norm:
            self.q_norm = options.norm(head_dim, config.rms_norm_eps)
            self.k_norm = options.norm(head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        norms = None if self.q_norm is None else (self.q_norm, self.k_norm)
        if self.rotary_emb is not None:  # rope_layers are SmolLM3's only, which has no q/k norms
            q, k = self.rotary_emb(positions, q, k, norms)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, config.hidden_size)
        self.act_fn = GeluTanhAndMul() if config.hidden_act == "gelu_pytorch_tanh" else SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


def build_mlp(config: ModelConfig, layer: int) -> nn.Module:
    """The layer's MLP: routed experts (with Qwen2-MoE's shared expert) where the config has them, else dense."""
    moe = config.moe
    if moe is None or not moe.sparse_layers[layer]:
        return LlamaMLP(config)
    shared = LlamaMLP(config, moe.shared_expert_intermediate_size) if moe.shared_expert_intermediate_size else None
    return SparseMoeBlock(config.hidden_size, moe, shared)


# Builds a layer's attention block from (config, the shared rotary embedding, the layer's index): OLMoE's
# differs from Llama's in its q/k norms alone.
AttentionFactory = Callable[[ModelConfig, RotaryEmbedding, int], nn.Module]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, options: AttentionOptions, layer: int,
                 attention: AttentionFactory | None = None):
        super().__init__()
        self.self_attn = (attention(config, rotary_emb, layer) if attention is not None
                          else LlamaAttention(config, rotary_emb, options, config.sliding_windows[layer]))
        self.mlp = build_mlp(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Granite scales each block's output before the residual add; 1 elsewhere, and skipped.
        self.residual_multiplier = config.residual_multiplier

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns this layer's output and the residual stream before it; their sum is the true output.

        Carrying the two apart lets the next norm do the residual add in the same pass.
        """
        hidden_states, residual = add_and_norm(self.input_layernorm, hidden_states, residual)
        hidden_states = self._scaled(self.self_attn(positions, hidden_states, meta))
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self._scaled(self.mlp(hidden_states)), residual

    def _scaled(self, block_output: torch.Tensor) -> torch.Tensor:
        return block_output if self.residual_multiplier == 1.0 else block_output * self.residual_multiplier


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, options: AttentionOptions, attention: AttentionFactory | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # One cos/sin cache shared by every layer.
        rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                     config.rope_scaling)
        rope_layers = config.rope_layers or (True,) * config.num_hidden_layers
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary_emb if rope_layers[layer] else None, options, layer, attention)
            for layer in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embedding_multiplier = config.embedding_multiplier  # Granite's; 1 elsewhere

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        embedded = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            embedded = embedded * self.embedding_multiplier
        return run_layers(self.layers, self.norm, embedded, positions, meta)


def add_and_norm(norm: nn.Module, hidden_states: torch.Tensor,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input norm with the previous layer's residual add folded in: (normed, the new residual)."""
    if residual is None:  # the first layer: its input is the embedding, the residual stream as it starts
        return norm(hidden_states), hidden_states
    return norm(hidden_states, residual)


def run_layers(layers: nn.ModuleList, norm: nn.Module, hidden_states: torch.Tensor, positions: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
    """The decoder layers, their residual stream carried apart, then the final norm with the last add."""
    residual = None
    for layer in layers:
        hidden_states, residual = layer(positions, hidden_states, residual, meta)
    hidden_states, _ = norm(hidden_states, residual)
    return hidden_states


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = self.build_model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def build_model(self, config: ModelConfig) -> nn.Module:
        """The decoder under the LM head (Gemma's differs in its blocks)."""
        return LlamaModel(config, self.attention_options(config))

    @staticmethod
    def attention_options(config: ModelConfig) -> AttentionOptions:
        return AttentionOptions(qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Flat batch: ``input_ids``, ``positions`` [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in the model's dtype, the full vocabulary on every rank."""
        logits = self.lm_head(hidden_states)
        return logits if self.config.logits_scaling == 1.0 else logits / self.config.logits_scaling
