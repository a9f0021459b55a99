"""Build a model on its device and fill it: from a safetensors checkpoint, or with dummy weights.

Checkpoint names are Hugging Face's; ours differ only where we fuse projections, and
``PACKED_MODULES`` is the one place that says how. A checkpoint that stores a fusion itself (Phi-3's
``qkv_proj`` and ``gate_up_proj``) has our names; its tensor is cut into the pieces, so that each goes
through the same per-piece loading (and tensor-parallel slicing) as separate tensors would. A MoE
checkpoint stores each expert's projections apart (``experts.3.gate_proj.weight``; Mixtral's ``w1``,
``w3``, ``w2``): ``EXPERT_PROJECTIONS`` says which stacked parameter and piece each fills; GraniteMoE's
stores every expert in one tensor, cut into the same pieces.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pagoda_engine.layers.linear import copy_weight
from pagoda_engine.layers.norm import RMSNorm
from pagoda_engine.model_config import ModelConfig
from pagoda_engine.models.registry import get_model_class

logger = logging.getLogger(__name__)

# Checkpoint module name -> (our fused module, which piece of it).
PACKED_MODULES: dict[str, tuple[str, str | int]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

# An expert's projection -> (our stacked parameter, the piece); Mixtral's names are w1 (gate), w3 (up), w2 (down).
EXPERT_PROJECTIONS: dict[str, tuple[str, str]] = {
    "gate_proj": ("gate_up_proj", "gate"), "w1": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"), "w3": ("gate_up_proj", "up"),
    "down_proj": ("down_proj", "down"), "w2": ("down_proj", "down"),
}
EXPERT_TENSOR = re.compile(r"(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>\w+)\.weight")
# Checkpoint module names that are ours under another name (Mixtral's MoE block is every other model's mlp).
RENAMED_MODULES = {"block_sparse_moe": "mlp"}
# Whole tensors named otherwise: GraniteMoE's router and its stacked experts (every expert in one tensor).
RENAMED_TENSORS = {"mlp.router.layer.weight": "mlp.gate.weight", "mlp.input_linear.weight": "mlp.experts.gate_up_proj",
                   "mlp.output_linear.weight": "mlp.experts.down_proj"}

DUMMY_STD = 0.02

# Multimodal checkpoints we read the language model of: its tensors' prefixes (older and newer transformers
# name them differently) -> ours. Every other tensor (the vision tower, the projector) is not read.
TEXT_PART_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "Gemma3ForConditionalGeneration": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                                       ("model.language_model.", "model."), ("lm_head.", "lm_head.")),
}


def load_model(
    model_config: ModelConfig,
    model_dir: str | Path | None,
    load_format: str = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> nn.Module:
    """The model for ``model_config`` on ``device`` in ``dtype`` (default: the checkpoint's), ready to run.

    ``load_format``: ``auto``/``safetensors`` read ``model_dir``; ``dummy`` fills random weights from
    ``seed`` (``model_dir`` unused).
    """
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format must be auto, safetensors or dummy, got {load_format!r}")
    if load_format != "dummy" and model_dir is None:
        raise ValueError("load_format 'auto' needs a model directory")
    prefixes = TEXT_PART_PREFIXES.get(model_config.checkpoint_architecture, ())
    if load_format != "dummy" and model_config.tie_word_embeddings and _head_differs_from_embedding(
            Path(model_dir), prefixes):
        # A fine-tune that untied its head but not its config: transformers keeps the two apart, and so do we.
        logger.warning("%s: lm_head.weight differs from the embedding, so they are not tied (as transformers)",
                       model_dir)
        model_config = replace(model_config, tie_word_embeddings=False)
    device = torch.device(device)
    model_cls = get_model_class(model_config.architecture)
    # Built in place: parameters are allocated on the device in the target dtype, never copied from the CPU.
    with torch.device(device), _default_dtype(dtype or model_config.torch_dtype):
        model = model_cls(model_config)
    model.requires_grad_(False)
    if load_format == "dummy":
        fill_dummy_weights(model, seed)
    else:
        load_weights(model, Path(model_dir), model_config.tie_word_embeddings, prefixes)
    return model.eval()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The shards listed by ``model.safetensors.index.json``, else ``model.safetensors``, else every
    ``*.safetensors`` file (as transformers looks for them: a stray file beside model.safetensors is not read)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {model_dir}")
    return files


def map_checkpoint_name(name: str) -> tuple[str, str | int | tuple[int, str] | None]:
    """Checkpoint tensor name -> (our parameter name, shard id within it or None)."""
    parts = [RENAMED_MODULES.get(part, part) for part in name.split(".")]
    renamed = ".".join(parts)
    for theirs, ours in RENAMED_TENSORS.items():
        if renamed.endswith(f".{theirs}"):
            return renamed[: -len(theirs)] + ours, None
    expert = EXPERT_TENSOR.fullmatch(renamed)
    if expert and expert["projection"] in EXPERT_PROJECTIONS:
        param, piece = EXPERT_PROJECTIONS[expert["projection"]]
        return f"{expert['experts']}.{param}", (int(expert["expert"]), piece)
    for i, part in enumerate(parts):
        if part in PACKED_MODULES:
            parts[i], shard_id = PACKED_MODULES[part]
            return ".".join(parts), shard_id
    return renamed, None


def checkpoint_name(param_name: str, shard_id: str | int | None) -> str:
    """The inverse of ``map_checkpoint_name``, for error messages."""
    if shard_id is None:
        return param_name
    if isinstance(shard_id, tuple):  # (expert, piece) of a stacked expert parameter
        return f"{param_name.rpartition('.')[0]}.{shard_id[0]}.{shard_id[1]}_proj.weight"
    parts = param_name.split(".")
    for theirs, (ours, shard) in PACKED_MODULES.items():
        if shard == shard_id and ours in parts:
            parts[parts.index(ours)] = theirs
    return ".".join(parts)


def text_part_name(name: str, prefixes: tuple[tuple[str, str], ...]) -> str | None:
    """A checkpoint tensor's name in the language model: as it is without ``prefixes`` (a text-only
    checkpoint), renamed by the first that matches, or None when none does (a vision tensor)."""
    if not prefixes:
        return name
    for theirs, ours in prefixes:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return None


def _head_differs_from_embedding(model_dir: Path, prefixes: tuple[tuple[str, str], ...] = ()) -> bool:
    """Whether the checkpoint holds an LM head of its own, not a copy of the embedding."""
    tensors = {}
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                ours = text_part_name(name, prefixes)
                if ours in ("lm_head.weight", "model.embed_tokens.weight"):
                    tensors[ours] = f.get_tensor(name)
    head, embedding = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    return head is not None and embedding is not None and not torch.equal(head, embedding)


def _skipped(name: str, tied: bool) -> bool:
    # Rotary buffers are recomputed from the config; a tied LM head is the embedding.
    return "rotary_emb" in name.split(".") or (tied and name == "lm_head.weight")


@torch.no_grad()
def load_weights(model: nn.Module, model_dir: Path, tied: bool, prefixes: tuple[tuple[str, str], ...] = ()) -> None:
    """Copy every checkpoint tensor into its parameter (each layer's weight_loader takes this rank's piece);
    with ``prefixes``, only the language model's tensors of a multimodal checkpoint (``text_part_name``).

    Raises ValueError naming the tensor when one is unexpected, misshapen or missing.
    """
    params = dict(model.named_parameters())
    loaded: dict[str, set] = defaultdict(set)
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                ours = text_part_name(name, prefixes)
                if ours is None or _skipped(ours, tied):
                    continue
                param_name, named_shard = map_checkpoint_name(ours)
                if param_name not in params:
                    raise ValueError(f"unexpected tensor {name!r} in {path}: the model has no such parameter")
                for shard_id, tensor in _pieces(model, param_name, named_shard, f.get_tensor(name), name, path):
                    if shard_id in loaded[param_name]:
                        raise ValueError(f"tensor {name!r} appears twice in the checkpoint, again in {path}")
                    _load_one(params[param_name], tensor, shard_id, name, path)
                    loaded[param_name].add(shard_id)
    missing = [
        checkpoint_name(name, shard_id)
        for name in params
        for shard_id in _shard_ids(model, name)
        if shard_id not in loaded[name]
    ]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(f"checkpoint in {model_dir} lacks tensor(s): {shown}")


def _load_one(param: nn.Parameter, tensor: torch.Tensor, shard_id: str | int | None, name: str, path: Path) -> None:
    weight_loader = getattr(param, "weight_loader", None)
    try:
        if weight_loader is None:
            copy_weight(param.data, tensor)
        elif shard_id is None:
            weight_loader(param, tensor)
        else:
            weight_loader(param, tensor, shard_id)
    except ValueError as err:
        raise ValueError(f"cannot load tensor {name!r} from {path}: {err}") from err


def _pieces(model: nn.Module, param_name: str, shard_id: str | int | None, tensor: torch.Tensor, name: str,
            path: Path) -> list[tuple[str | int | None, torch.Tensor]]:
    """(shard id, tensor) pairs to load: the tensor itself, or a fused tensor's pieces along its rows."""
    shard_ids = _shard_ids(model, param_name)
    if shard_id is not None or shard_ids == (None,):
        return [(shard_id, tensor)]
    owner = _owner(model, param_name)
    if hasattr(owner, "stacked_pieces"):  # every expert in one tensor (GraniteMoE, transformers' own layout)
        try:
            return owner.stacked_pieces(model.get_parameter(param_name), tensor)
        except ValueError as err:
            raise ValueError(f"cannot load tensor {name!r} from {path}: {err}") from err
    sizes = owner.shard_sizes
    if tensor.shape[0] != sum(sizes):
        raise ValueError(f"cannot load tensor {name!r} from {path}: {tensor.shape[0]} rows, expected "
                         f"{' + '.join(map(str, sizes))} ({', '.join(map(str, shard_ids))})")
    return list(zip(shard_ids, tensor.split(sizes), strict=True))


def _shard_ids(model: nn.Module, param_name: str) -> tuple:
    """The checkpoint pieces that fill a parameter: several for fused projections and stacked experts (which
    name theirs on the parameter), else one (None)."""
    param_ids = getattr(model.get_parameter(param_name), "shard_ids", None)
    return param_ids or getattr(_owner(model, param_name), "shard_ids", (None,))


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int) -> None:
    """Deterministic small random weights (norms that change nothing), generated on the parameters' device."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        owner = _owner(model, name)
        if isinstance(owner, RMSNorm):
            param.fill_(1.0 - owner.weight_offset)
        else:
            param.normal_(0.0, DUMMY_STD, generator=generator)
