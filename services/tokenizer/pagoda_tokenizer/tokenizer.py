"""TextTokenizer: a model directory's tokenizer.json and tokenizer_config.json, read the way Hugging Face
transformers (v5) reads them: tokenizer.json's post-processor decides which special tokens (BOS, EOS) encoding
adds, and transformers ignores tokenizer_config's add_bos_token/add_eos_token when tokenizer.json exists, so we
do too; tokenizer_config names the special tokens and holds the chat template."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

# The special tokens transformers passes to chat templates by name (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict, chat_template: str | None = None):
        self.backend = tokenizer
        # Named special tokens as text, e.g. {"bos_token": "<s>", "eos_token": "</s>"}.
        self.special_tokens = {
            name: text for name in NAMED_SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None
        }
        self.chat_template = chat_template
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> TextTokenizer:
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found: the tokenizer service needs a tokenizer.json")
        # Older checkpoints name their special tokens in special_tokens_map.json only.
        legacy = _read_json(model_dir / "special_tokens_map.json")
        config = {**legacy, **_read_json(model_dir / "tokenizer_config.json")}
        return cls(Tokenizer.from_file(str(tokenizer_file)), config, _chat_template_source(model_dir, config))

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works and encode does not: the service tokenizes in a
        # thread, and a long prompt must not stop the event loop's thread.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def tokens(self, token_ids: list[int]) -> list[str]:
        """Vocabulary entries, as stored (byte-level pieces such as "Ġworld")."""
        return [self.backend.id_to_token(i) or "" for i in token_ids]

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own, special tokens included (U+FFFD for part of a character)."""
        return self.backend.decode([token_id], skip_special_tokens=False)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_source(model_dir: Path, config: dict) -> str | None:
    """The chat template: chat_template.jinja (newer transformers save it apart) or tokenizer_config's entry,
    which may be a list of named templates, of which "default" is the one used."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None
