"""OLMo 2 (``Olmo2ForCausalLM``) and OLMoE (``OlmoeForCausalLM``), as transformers' modeling_olmo2.py and
modeling_olmoe.py have them.

What OLMo 2 changes from Llama: the norms come after each block (post_attention / post_feedforward, added
to the residual; no norm before), each rounds once after its weight (``OneRoundingRMSNorm``), and q and k
are RMS-normalised over their whole projection (every head together) before RoPE. Under tensor
parallelism a rank holds some of those heads, so the norm sums its squares over the ranks
(``ShardedQKNorm``). OLMoE keeps Llama's blocks and norms (rounded as Llama's), normalises q and k over
their whole projection as OLMo 2 does, may clip q, k and v (``clip_qkv``), and routes to experts.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda_engine.distributed import all_reduce, tp_rank
from pagoda_engine.layers.attention import AttentionMetadata
from pagoda_engine.layers.embedding import VocabParallelEmbedding
from pagoda_engine.layers.linear import copy_weight, rank_slice
from pagoda_engine.layers.norm import RMSNorm
from pagoda_engine.layers.rotary import RotaryEmbedding
from pagoda_engine.model_config import ModelConfig
from pagoda_engine.models.llama import (
    AttentionOptions,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    run_layers,
)


class OneRoundingRMSNorm(RMSNorm):
    """OLMo 2's RMSNorm: ``weight * x / rms(x)`` in float32, rounded once (Llama's rounds before the weight).
    The torch code on every device."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_torch(x, residual)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class ShardedQKNorm(RMSNorm):
    """OneRoundingRMSNorm over a projection whose heads are split across the ranks: this rank's slice of the
    weight, the mean square summed over every rank's heads."""

    def __init__(self, full_size: int, local_size: int, index: int, eps: float, round_once: bool = True):
        super().__init__(local_size, eps)
        self.full_size, self.local_size, self.index = full_size, local_size, index
        self.round_once = round_once  # False: round before the weight, as Llama's RMSNorm (OLMoE's)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        copy_weight(param.data, rank_slice(loaded, 0, self.full_size, self.index, self.local_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean_square = all_reduce(xf.pow(2).sum(-1, keepdim=True)) / self.full_size
        normed = xf * torch.rsqrt(mean_square + self.eps)
        if self.round_once:
            return (self.weight.float() * normed).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class Olmo2Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, round_once: bool = True):
        options = AttentionOptions(qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=False)
        super().__init__(config, rotary_emb, options, None)
        if self.qkv_proj.kv_replicas > 1:
            raise ValueError("OLMo's k norm spans every KV head: tensor parallelism needs at least as many KV "
                             f"heads ({config.num_key_value_heads}) as ranks")
        head_dim, eps = config.head_dim, config.rms_norm_eps
        self.q_norm = ShardedQKNorm(config.num_attention_heads * head_dim, self.qkv_proj.q_size, tp_rank(), eps,
                                    round_once)
        self.k_norm = ShardedQKNorm(config.num_key_value_heads * head_dim, self.qkv_proj.kv_size, tp_rank(), eps,
                                    round_once)
        self.clip_qkv = config.clip_qkv

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:  # after the norms, as transformers clips
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = Olmo2Attention(config, rotary_emb)
        self.mlp = LlamaMLP(config)
        self.post_attention_layernorm = OneRoundingRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = OneRoundingRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As LlamaDecoderLayer: this layer's (normalised) MLP output and the residual stream before it."""
        if residual is not None:  # the previous layer's add, which no norm of ours folds in
            hidden_states = hidden_states + residual
        residual = hidden_states + self.post_attention_layernorm(self.self_attn(positions, hidden_states, meta))
        return self.post_feedforward_layernorm(self.mlp(residual)), residual


class Olmo2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                     config.rope_scaling)
        self.layers = nn.ModuleList(Olmo2DecoderLayer(config, rotary_emb) for _ in range(config.num_hidden_layers))
        self.norm = OneRoundingRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return run_layers(self.layers, self.norm, self.embed_tokens(input_ids), positions, meta)


class Olmo2ForCausalLM(LlamaForCausalLM):
    def build_model(self, config: ModelConfig) -> nn.Module:
        return Olmo2Model(config)


class OlmoeForCausalLM(LlamaForCausalLM):
    def build_model(self, config: ModelConfig) -> nn.Module:
        def attention(config: ModelConfig, rotary_emb: RotaryEmbedding, layer: int) -> nn.Module:
            return Olmo2Attention(config, rotary_emb, round_once=False)

        return LlamaModel(config, self.attention_options(config), attention)
