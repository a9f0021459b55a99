"""Small tokenizers trained on the spot, for tests that cannot wait for (or must not depend on) a real model:
a byte-level BPE (GPT-2/Llama-3/SmolLM2 style) and a SentencePiece-style BPE with byte fallback (Llama-2 style).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Text that splits characters across tokens every way a small vocabulary can.
HARD_TEXTS = [
    "Hello, world!",
    "你好，世界！こんにちは世界。안녕하세요",
    "👍🏽 👨‍👩‍👧‍👦 🇯🇵🇫🇷 ❤️ 🙂",
    "café naïve résumé e\u0301 Ωμέγα",
    "   spaces\t\ttabs\n\n\nnewlines  \r\n ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ ۝ مرحبا שלום",
    "def f(x):\n    return x * 2\n",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]
CORPUS = HARD_TEXTS * 20 + ["The quick brown fox jumps over the lazy dog."] * 20
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@cache
def byte_level_tokenizer_json(vocab_size: int = 400) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=CHATML_SPECIALS, show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer.to_str()


def byte_level_tokenizer(vocab_size: int = 400) -> Tokenizer:
    return Tokenizer.from_str(byte_level_tokenizer_json(vocab_size))


@cache
def sentencepiece_tokenizer_json() -> str:
    """BPE over "▁"-marked words with <0xNN> byte-fallback tokens, decoded like Llama 2 (the leading space of
    a text is stripped)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}
    return json.dumps(spec)


def sentencepiece_tokenizer() -> Tokenizer:
    return Tokenizer.from_str(sentencepiece_tokenizer_json())


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the printable characters byte-level BPE stores them as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def byte_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`: every multi-byte character split byte by byte."""
    table = _bytes_to_unicode()
    return [tokenizer.token_to_id(table[b]) for b in text.encode()]


def sentencepiece_byte_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """SentencePiece byte-fallback tokens for `text`, one per UTF-8 byte."""
    return [tokenizer.token_to_id(f"<0x{b:02X}>") for b in text.encode()]


def write_tokenizer_dir(path: Path, tokenizer_json: str, chat_template: str | list | None = CHATML_TEMPLATE,
                        **config: object) -> Path:
    """tokenizer.json and tokenizer_config.json (ChatML special tokens and template by default)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    settings = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", **config}
    if chat_template is not None:
        settings["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return path
