"""IncrementalDetokenizer: token ids in, as they are generated; text out, never half a character.

Decoding each new token on its own is wrong twice over: byte-level BPE splits a character's UTF-8 bytes
across tokens, and SentencePiece-style decoders drop the leading space of whatever they decode first. So,
as vLLM does, we decode a short window of tokens twice, without and with the new ones, and emit the
difference:

    ids:   ... | prefix_offset ... read_offset | new tokens
                 `------ prefix_text ------'
                 `---------------- text ---------------'      delta = text[len(prefix_text):]

The window starts at a token whose text was already emitted, so decoder quirks at the window's start
(a stripped leading space) hit prefix_text and text alike and cancel out. When text ends in U+FFFD, the
last character is still incomplete: nothing is emitted and the window grows until it completes. For valid
UTF-8 output, the deltas concatenated equal one decode of all the tokens (after `context_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, context_ids: Sequence[int] = ()):
        """`context_ids`: the last few prompt tokens, so that the first generated token keeps the leading space
        a SentencePiece decoder would strip at the start of a text (vLLM uses 5)."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(context_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text they complete (possibly empty)."""
        self._ids.extend(token_ids)
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Return whatever is held back, incomplete characters as U+FFFD: the sequence has ended."""
        text = self._decode(self._ids[self._prefix_offset :])
        return self._advance(text) if len(text) > len(self._prefix_text) else ""

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        # Tokens before the new window are never decoded again: drop them so memory stays bounded.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
