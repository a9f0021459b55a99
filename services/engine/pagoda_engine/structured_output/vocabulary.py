"""Each token id's bytes, read from a Hugging Face tokenizer.json, laid out to walk a DFA over them all at once.

A grammar constrains text, the sampler picks token ids: what joins them is the exact byte string every
token adds to the output. tokenizer.json stores tokens in one of two spellings:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2: a ``ByteLevel`` decoder) maps each byte to a printable
  character (GPT-2's ``bytes_to_unicode``); the inverse map gives the bytes back;
- SentencePiece style (Llama 2, Mistral, Gemma: ``Metaspace`` or ``Replace`` decoders) writes a space as
  "▁" and bytes without a piece of their own as ``<0xNN>`` byte-fallback tokens.

Special tokens (EOS, chat markers) add no text: they get no bytes here and are never allowed by a grammar,
but for EOS where the grammar may end. A SentencePiece decoder's ``Strip`` of the text's very first space
is not modelled: an output continues its prompt, so its first token's space is text like any other.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np

from pagoda_engine.sampling_params import InvalidRequestError

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character byte-level BPE stores for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _decoder_types(decoder: dict | None) -> set[str]:
    if decoder is None:
        return set()
    if decoder.get("type") == "Sequence":
        return {t for d in decoder.get("decoders", []) for t in _decoder_types(d)}
    return {decoder.get("type", "")}


def _byte_level_bytes(token: str) -> bytes | None:
    alphabet = _byte_level_alphabet()
    try:
        return bytes(alphabet[c] for c in token)
    except KeyError:  # not a byte-level spelling (an added token written as plain text)
        return token.encode()


def _sentencepiece_bytes(token: str) -> bytes:
    match = _BYTE_FALLBACK.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("▁", " ").encode()


def read_token_bytes(tokenizer_json: Path | str, vocab_size: int) -> list[bytes | None]:
    """The bytes of token ids 0..vocab_size-1 (None: a special token, or an id the tokenizer lacks)."""
    try:
        return _token_bytes(json.loads(Path(tokenizer_json).read_text(encoding="utf-8")), vocab_size)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise InvalidRequestError(f"structured output: cannot read the token bytes of {tokenizer_json}: "
                                  f"{type(error).__name__}: {error}") from None


def _token_bytes(spec: dict, vocab_size: int) -> list[bytes | None]:
    model = spec.get("model", {})
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [piece, score] pairs, by id
        pieces = {piece: i for i, (piece, _) in enumerate(vocab)}
    elif isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        pieces = vocab
    else:
        raise InvalidRequestError("structured output: tokenizer.json has no vocabulary")
    decoders = _decoder_types(spec.get("decoder"))
    if "ByteLevel" in decoders:
        spell = _byte_level_bytes
    elif decoders & {"Metaspace", "Replace", "ByteFallback"} or model.get("type") == "Unigram":
        spell = _sentencepiece_bytes
    else:
        raise InvalidRequestError(f"structured output: tokenizer.json's decoder {sorted(decoders)} is not "
                                  "byte-level or SentencePiece style, so token bytes are unknown")
    tokens: list[bytes | None] = [None] * vocab_size
    for piece, token_id in pieces.items():
        if token_id < vocab_size:
            tokens[token_id] = spell(piece)
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = None if added.get("special") else added["content"].encode()
    return tokens


class TokenVocabulary:
    """Token bytes as padded byte columns, longest tokens first, so that a DFA can step every token at once.

    Row ``r`` is token ``token_ids[r]``. Longest first, the rows with more than ``j`` bytes are the leading
    ones, so column ``j`` (``byte_columns[j]``) holds byte ``j`` of just those: step ``j`` of a walk touches
    no other, and the columns together hold each token's bytes once. Tokens without bytes (special ones)
    are left out.
    """

    def __init__(self, token_bytes: list[bytes | None], eos_token_ids: frozenset[int]):
        self.vocab_size = len(token_bytes)
        self.token_bytes = token_bytes
        self.eos_ids = frozenset(t for t in eos_token_ids if t < self.vocab_size)
        self.eos_token_ids = np.array(sorted(self.eos_ids), dtype=np.int64)
        ids = sorted((i for i, b in enumerate(token_bytes) if b), key=lambda i: -len(token_bytes[i]))
        self.token_ids = np.array(ids, dtype=np.int64)
        lengths = np.array([len(token_bytes[i]) for i in ids], dtype=np.int64)
        longest = int(lengths[0]) if ids else 0
        rows = np.zeros((len(ids), longest), dtype=np.uint8)
        for row, i in enumerate(ids):
            rows[row, : lengths[row]] = np.frombuffer(token_bytes[i], dtype=np.uint8)
        num_longer = len(ids) - np.cumsum(np.bincount(lengths, minlength=longest + 1))[:longest]
        self.byte_columns = [rows[:count, j].copy() for j, count in enumerate(num_longer)]

    @classmethod
    def from_model_dir(cls, model_dir: Path | str, vocab_size: int,
                       eos_token_ids: frozenset[int]) -> TokenVocabulary:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise InvalidRequestError(f"structured output needs the model's vocabulary, and {path} does not exist")
        return cls(read_token_bytes(path, vocab_size), eos_token_ids)
