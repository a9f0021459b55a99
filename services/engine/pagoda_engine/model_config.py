"""ModelConfig: the architecture facts the engine needs, read from a Hugging Face ``config.json``.

Read with plain ``json`` (transformers is not an engine dependency). Both config layouts are
accepted: transformers 4 (``rope_theta`` and ``rope_scaling`` at the top, ``torch_dtype``) and
transformers 5 (``rope_parameters`` holding theta and scaling, ``dtype``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Keys each RoPE scaling type needs besides ``rope_type``; the rotary layer implements exactly these.
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
# Keys a type may also have (transformers' defaults when absent).
ROPE_SCALING_OPTIONAL_KEYS = {
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}

GRANITE, GRANITE_MOE = "GraniteForCausalLM", "GraniteMoeForCausalLM"
QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
GEMMA2, GEMMA3 = "Gemma2ForCausalLM", "Gemma3ForCausalLM"
GEMMA = (GEMMA2, GEMMA3)
# Multimodal architectures whose language model we serve alone -> its text-only architecture.
TEXT_PARTS = {"Gemma3ForConditionalGeneration": GEMMA3}
# transformers writes only what differs from a config class's defaults: where those differ from the ones
# this module falls back on (Llama's), the class's, for what we read.
_GEMMA_COMMON = {
    "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096, "bos_token_id": 2,
    "eos_token_id": 1,
}
SMOLLM3 = "SmolLM3ForCausalLM"
MIXTRAL, QWEN2_MOE, QWEN3_MOE = "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"
OLMOE = "OlmoeForCausalLM"
ARCHITECTURE_DEFAULTS = {
    GEMMA2: {**_GEMMA_COMMON, "vocab_size": 256_000, "max_position_embeddings": 8192, "rope_theta": 10_000.0,
             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    GEMMA3: {**_GEMMA_COMMON, "vocab_size": 262_208, "max_position_embeddings": 131_072, "rope_theta": 1_000_000.0,
             "rope_local_base_freq": 10_000.0},
    SMOLLM3: {"tie_word_embeddings": True, "rope_theta": 2_000_000.0, "max_position_embeddings": 32768},
    "Olmo2ForCausalLM": {"rms_norm_eps": 1e-5},
    MIXTRAL: {"num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0,
              "max_position_embeddings": 131_072},
    QWEN2_MOE: {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                "shared_expert_intermediate_size": 5632, "max_position_embeddings": 32768},
    QWEN3_MOE: {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                "max_position_embeddings": 32768},
    GRANITE_MOE: {"num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 2048},
    OLMOE: {"num_experts": 64, "num_experts_per_tok": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts MLP: its experts' shape, how tokens are routed, and which layers have one."""

    num_experts: int
    top_k: int  # experts per token
    intermediate_size: int  # each expert's
    # Whether the top-k routing probabilities are rescaled to sum to 1 (Mixtral always; Qwen's norm_topk_prob).
    renormalize: bool
    # Per layer: routed experts, or the dense MLP of ModelConfig.intermediate_size (Qwen's mlp_only_layers).
    sparse_layers: tuple[bool, ...]
    # Qwen2-MoE: an expert of this size every token goes through, its output gated by a sigmoid (0: none).
    shared_expert_intermediate_size: int = 0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE; else {"rope_type": "linear" | "llama3", plus that type's keys}.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    # Per layer: how many positions back a query sees (itself included), or None for the whole context.
    sliding_windows: tuple[int | None, ...]
    tie_word_embeddings: bool
    # Bias on q/k/v/o projections (Llama's ``attention_bias``); Qwen2 adds q/k/v bias regardless.
    attention_bias: bool
    # The checkpoint's dtype; float32 when config.json names none (as transformers assumes).
    torch_dtype: torch.dtype
    bos_token_id: int | None
    # generation_config.json's eos ids when it names any, else config.json's (as transformers stops).
    eos_token_ids: tuple[int, ...]
    # The MLP's gate activation: "silu", or "gelu_pytorch_tanh" (Gemma).
    hidden_act: str = "silu"
    # Gemma: Gemma 3's RoPE base for its sliding layers (plain RoPE there), the attention scale's
    # query_pre_attn_scalar**-0.5 (None: head_dim**-0.5), and tanh's caps on the attention scores (Gemma 2)
    # and on the logits (None: none).
    sliding_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Granite's scalars: the embedding and each block's output are multiplied, the logits divided, and the
    # attention scale is given (None: head_dim**-0.5, as everywhere else).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    attention_multiplier: float | None = None
    # What config.json names when it differs from ``architecture``: a multimodal checkpoint whose language
    # model this is (Gemma3ForConditionalGeneration: its text_config, and its language_model.* tensors).
    checkpoint_architecture: str | None = None
    # Per layer: whether q and k are rotated (SmolLM3 leaves every fourth layer without position encoding).
    # None: every layer.
    rope_layers: tuple[bool, ...] | None = None
    moe: MoEConfig | None = None
    # OLMoE: q, k and v clipped to [-clip_qkv, clip_qkv] after the q/k norms (None: not clipped).
    clip_qkv: float | None = None

    @property
    def uniform_sliding_window(self) -> int | None:
        """The window when every layer slides by the same one (then the cache may drop what lies behind it)."""
        windows = set(self.sliding_windows)
        return windows.pop() if len(windows) == 1 else None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (and ``generation_config.json`` when present) from a model directory."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        generation_file = path / "generation_config.json"
        generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None
        return cls.from_dict(json.loads(config_file.read_text()), generation)

    @classmethod
    def from_dict(cls, config: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
        """Build from the parsed ``config.json`` (and optionally ``generation_config.json``)."""
        checkpoint_architecture = None
        if _architecture(config) in TEXT_PARTS:
            checkpoint_architecture, config = _architecture(config), _text_part(config)
        config = {**ARCHITECTURE_DEFAULTS.get(_architecture(config), {}), **config}
        _check_supported(config)
        generation_config = generation_config or {}
        heads = _required(config, "num_attention_heads")
        hidden = _required(config, "hidden_size")
        theta, scaling = _rope(config)
        return cls(
            architecture=_architecture(config),
            hidden_size=hidden,
            intermediate_size=_required(config, "intermediate_size"),
            num_hidden_layers=_required(config, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            vocab_size=_required(config, "vocab_size"),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_required(config, "max_position_embeddings"),
            sliding_windows=_sliding_windows(config),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=config.get("attention_bias", False),
            torch_dtype=_dtype(config.get("dtype") or config.get("torch_dtype") or "float32"),
            bos_token_id=_first_id(config.get("bos_token_id"), generation_config.get("bos_token_id")),
            # transformers stops on generation_config.json's eos ids when it names any, else on config.json's.
            eos_token_ids=_unique_ids(generation_config.get("eos_token_id", config.get("eos_token_id"))),
            hidden_act=_activation(config),
            sliding_rope_theta=_sliding_rope_theta(config),
            query_pre_attn_scalar=config.get("query_pre_attn_scalar"),
            attn_logit_softcapping=config.get("attn_logit_softcapping") if _architecture(config) in GEMMA else None,
            final_logit_softcapping=config.get("final_logit_softcapping") if _architecture(config) in GEMMA else None,
            **_granite_scalars(config),
            checkpoint_architecture=checkpoint_architecture,
            rope_layers=_rope_layers(config),
            moe=_moe(config),
            clip_qkv=config.get("clip_qkv") if _architecture(config) == OLMOE else None,
        )


def _required(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"config.json lacks {key!r}")
    return config[key]


def _architecture(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    if len(architectures) != 1:
        raise ValueError(f"config.json must name exactly one architecture, got {architectures!r}")
    return architectures[0]


def _rope_layers(config: dict[str, Any]) -> tuple[bool, ...] | None:
    """SmolLM3's no_rope_layers (1: rotate), or its rule: no RoPE in every no_rope_layer_interval-th layer."""
    if _architecture(config) != SMOLLM3:
        return None
    flags = config.get("no_rope_layers")
    if flags is None:
        interval = config.get("no_rope_layer_interval", 4)
        flags = [(layer + 1) % interval != 0 for layer in range(_required(config, "num_hidden_layers"))]
    return tuple(bool(flag) for flag in flags)


def _moe(config: dict[str, Any]) -> MoEConfig | None:
    """Mixtral's, GraniteMoE's and OLMoE's experts in every layer (intermediate_size wide); Qwen's in every
    decoder_sparse_step-th but its mlp_only_layers."""
    architecture = _architecture(config)
    if architecture not in (MIXTRAL, GRANITE_MOE, QWEN2_MOE, QWEN3_MOE, OLMOE):
        return None
    num_layers = _required(config, "num_hidden_layers")
    # transformers 5 writes Qwen's num_experts as num_local_experts, Mixtral's name.
    num_experts = config.get("num_local_experts") or config.get("num_experts")
    top_k = _required(config, "num_experts_per_tok")
    if not num_experts:  # Qwen's: every layer dense
        return None
    if not 0 < top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok {top_k} must be between 1 and the number of experts ({num_experts})")
    if architecture in (MIXTRAL, GRANITE_MOE, OLMOE):
        # GraniteMoE takes the softmax of the top-k logits: the top-k probabilities, renormalised.
        renormalize = architecture != OLMOE or config.get("norm_topk_prob", False)
        return MoEConfig(num_experts, top_k, _required(config, "intermediate_size"), renormalize,
                         (True,) * num_layers)
    step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or ())
    sparse = tuple(layer not in dense and (layer + 1) % step == 0 for layer in range(num_layers))
    shared = config.get("shared_expert_intermediate_size", 0) if architecture == QWEN2_MOE else 0
    return MoEConfig(num_experts, top_k, _required(config, "moe_intermediate_size"),
                     config.get("norm_topk_prob", False), sparse, shared)


def _text_part(config: dict[str, Any]) -> dict[str, Any]:
    """A multimodal config's language model as a config of its own: its text_config, under the text-only
    architecture, with what the outer config says of the whole (dtype, tied embeddings) where it says nothing."""
    keys = ("dtype", "torch_dtype", "bos_token_id", "eos_token_id")
    outer = {key: config[key] for key in keys if key in config}
    # transformers ties the head as the outer config says (Gemma3Config: True by default), and its
    # Gemma3ForConditionalGeneration does not cap its logits, whatever text_config says (Google's: null).
    return {**outer, **(config.get("text_config") or {}), "architectures": [TEXT_PARTS[_architecture(config)]],
            "tie_word_embeddings": config.get("tie_word_embeddings", True), "final_logit_softcapping": None}


def _granite_scalars(config: dict[str, Any]) -> dict[str, float]:
    if _architecture(config) not in (GRANITE, GRANITE_MOE):
        return {}
    return {"embedding_multiplier": float(config.get("embedding_multiplier", 1.0)),
            "residual_multiplier": float(config.get("residual_multiplier", 1.0)),
            "logits_scaling": float(config.get("logits_scaling", 1.0)),
            "attention_multiplier": float(config.get("attention_multiplier", 1.0))}


def _activation(config: dict[str, Any]) -> str:
    if _architecture(config) in GEMMA:
        return config.get("hidden_activation") or "gelu_pytorch_tanh"
    return config.get("hidden_act", "silu")


def _check_supported(config: dict[str, Any]) -> None:
    """Refuse what our layers would silently get wrong."""
    act, expected = _activation(config), "gelu_pytorch_tanh" if _architecture(config) in GEMMA else "silu"
    if act != expected:
        raise ValueError(f"hidden_act {act!r} is not supported (only {expected})")
    if config.get("use_bidirectional_attention"):  # EmbeddingGemma's
        raise ValueError("use_bidirectional_attention is not supported")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias is not supported")
    if _architecture(config) == QWEN2_MOE and not config.get("qkv_bias", True):
        raise ValueError("qkv_bias false is not supported for Qwen2-MoE (its q/k/v carry a bias)")
    rope_parameters = config.get("rope_parameters") or {}
    partial = config.get("partial_rotary_factor", rope_parameters.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported (RoPE over the whole head only)")


def _sliding_rope_theta(config: dict[str, Any]) -> float | None:
    """Gemma 3's sliding layers: rope_parameters["sliding_attention"] (transformers 5), else rope_local_base_freq."""
    if _architecture(config) != GEMMA3:
        return None
    params = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
    return float(params.get("rope_theta", config.get("rope_local_base_freq", 10000.0)))


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:  # per layer type (Gemma 3 in transformers 5): the full layers' here
        params = params["full_attention"]
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or params
    # Old configs say "type", newer ones "rope_type".
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if _architecture(config) == "Phi3ForCausalLM" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi-3's old names for it, as transformers reads them
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_SCALING_KEYS)})")
    if rope_type == "default":
        return theta, None
    if rope_type == "yarn":  # transformers' default: the context it was trained at is the one it has
        scaling = {"original_max_position_embeddings": config.get("max_position_embeddings"), **scaling}
    missing = [key for key in ROPE_SCALING_KEYS[rope_type] if scaling.get(key) is None]
    if missing:
        raise ValueError(f"rope scaling {rope_type!r} lacks {', '.join(missing)}")
    keys = ROPE_SCALING_KEYS[rope_type] + ROPE_SCALING_OPTIONAL_KEYS.get(rope_type, ())
    return theta, {"rope_type": rope_type, **{key: scaling[key] for key in keys if key in scaling}}


def _sliding_windows(config: dict[str, Any]) -> tuple[int | None, ...]:
    """Each layer's window, by transformers' rule for the architecture: ``layer_types`` when the config
    lists them; else Mistral slides every layer (4096 tokens unless the config says otherwise, None: off),
    Mixtral every layer when it names a window; Phi-3 too; Qwen2, Qwen2-MoE and Qwen3 only with
    use_sliding_window, in the layers from max_window_layers (28) on, Qwen3-MoE then in every layer;
    Llama never.
    """
    architecture = _architecture(config)
    num_layers = _required(config, "num_hidden_layers")
    qwen_slides = architecture in (*QWEN, QWEN2_MOE, QWEN3_MOE) and config.get("use_sliding_window", False)
    window = config.get("sliding_window", 4096) if architecture == "MistralForCausalLM" or qwen_slides else None
    if architecture in ("Phi3ForCausalLM", MIXTRAL):  # every layer, when the config names one (Phi-3-mini-4k: 2047)
        window = config.get("sliding_window")
    if architecture in GEMMA:
        window = config.get("sliding_window", 4096)
    if architecture == SMOLLM3 and config.get("use_sliding_window", False):
        window = config.get("sliding_window")
    if not window:
        return (None,) * num_layers
    # transformers reads layer_types for these only; Mistral and Phi-3 slide every layer whatever it says.
    layer_types = config.get("layer_types") if architecture in (*GEMMA, *QWEN, QWEN2_MOE, SMOLLM3) else None
    if layer_types is None and architecture == SMOLLM3:  # its layers without RoPE slide
        layer_types = ["full_attention" if rotated else "sliding_attention" for rotated in _rope_layers(config)]
    if layer_types is None and architecture in GEMMA:  # older configs: every pattern-th layer is global
        pattern = config.get("sliding_window_pattern", 6 if architecture == GEMMA3 else 2)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if layer_types is not None:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    first = config.get("max_window_layers", 28) if qwen_slides and architecture != QWEN3_MOE else 0
    return tuple(window if layer >= first else None for layer in range(num_layers))


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"checkpoint dtype {name!r} is not supported (supported: {', '.join(_DTYPES)})")
    return _DTYPES[name]


def _as_list(ids: int | list[int] | None) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def _first_id(*candidates: int | list[int] | None) -> int | None:
    ids = [i for c in candidates for i in _as_list(c)]
    return ids[0] if ids else None


def _unique_ids(*candidates: int | list[int] | None) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for c in candidates for i in _as_list(c)))
