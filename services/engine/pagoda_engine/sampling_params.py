"""Per-request sampling parameters, validated once when a request is built."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# The most entries a request's list fields may hold: the sampler's metadata lists them anew every step
# (stop ids while min_tokens holds), so their count bounds the host work a request adds to each step.
MAX_ENTRIES = {"stop_token_ids": 1024, "logit_bias": 1024, "allowed_token_ids": 1024}
# OpenAI's range: -100 bans a token and +100 forces it in practice, and float32 logits stay finite.
MAX_ABS_LOGIT_BIAS = 100.0
# The sampler works in float32: a larger temperature or penalty becomes inf there, and -inf / inf is NaN.
FLOAT32_MAX = 3.4028234663852886e38


def _finite32(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


class InvalidRequestError(ValueError):
    """A request the user can fix: the message says what is wrong (gRPC INVALID_ARGUMENT)."""


def check_entries(counts: Mapping[str, int]) -> None:
    """Raise InvalidRequestError for the first field of ``counts`` (field name -> entries) past MAX_ENTRIES.

    ``SamplingParams.validate`` calls it, and the server too, on the wire message before converting it.
    """
    for name, count in counts.items():
        if count > MAX_ENTRIES[name]:
            raise InvalidRequestError(f"at most {MAX_ENTRIES[name]} {name} entries are accepted, got {count}")


# Longest regex or JSON schema text, and most choices, a request may bring: compiling is the host's work.
MAX_GRAMMAR_CHARS = 65536
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain a sample's text to a regular language (vLLM's structured outputs): set exactly one field.

    ``regex``: the whole output fully matches it (Python ``re`` syntax, the subset structured_output/regex.py
    names). ``json_schema``: a JSON Schema, as JSON text or a dict; the output is an instance of it
    (structured_output/json_schema.py says which keywords are honoured). ``choice``: exactly one of these
    strings. ``json_object``: any JSON object. Frozen and hashable: compiled grammars are cached by it.
    """

    regex: str | None = None
    json_schema: str | None = None
    choice: tuple[str, ...] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, dict):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if self.choice is not None and not isinstance(self.choice, tuple):
            object.__setattr__(self, "choice", tuple(self.choice))

    def validate(self) -> None:
        kinds = [name for name, value in (("regex", self.regex), ("json_schema", self.json_schema),
                                          ("choice", self.choice)) if value is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise InvalidRequestError("structured output needs exactly one of regex, json_schema, choice and "
                                      f"json_object, got {kinds or 'none'}")
        text = self.regex if self.regex is not None else self.json_schema
        if text is not None and len(text) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(f"structured output: at most {MAX_GRAMMAR_CHARS} characters of "
                                      f"{kinds[0]} are accepted, got {len(text)}")
        if self.choice is not None and not 1 <= len(self.choice) <= MAX_CHOICES:
            raise InvalidRequestError(f"structured output: choice needs 1 to {MAX_CHOICES} strings, "
                                      f"got {len(self.choice)}")


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Defaults follow vLLM: ``temperature=0`` means greedy; ``top_k`` of 0 or -1, ``top_p`` of 1 and
    ``min_p`` of 0 switch those filters off; penalties of 1 (repetition) and 0 (presence, frequency)
    are neutral, and so are an empty ``logit_bias`` and ``allowed_token_ids``.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    # HF-style: logits of tokens seen in the prompt or output are divided (if > 0) or multiplied by it.
    repetition_penalty: float = 1.0
    # OpenAI-style, over output tokens only: logit -= presence * (count > 0) + frequency * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: the engine draws one from its own seeded generator, so runs stay reproducible.
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Number of most likely tokens whose logprobs are returned besides the chosen one (None: no logprobs).
    logprobs: int | None = None
    # The same for every prompt token after the first, given the tokens before it (vLLM's prompt_logprobs).
    prompt_logprobs: int | None = None
    n: int = 1
    # Token id -> added to its logit after the penalties (OpenAI's logit_bias); empty: none.
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Not empty: only these ids may be drawn (vLLM's allowed_token_ids); EOS and stop ids are not implied.
    allowed_token_ids: list[int] = field(default_factory=list)
    # Not None: every sample's text is constrained to this language (the sampler masks other tokens).
    structured_output: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy, as in vLLM: dividing by them would overflow float32 logits."""
        return self.temperature < 1e-5

    @functools.cached_property
    def logit_bias_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """logit_bias as (token ids, biases) arrays, built once: the sampler lists them every step."""
        ids = np.fromiter(self.logit_bias.keys(), dtype=np.int64, count=len(self.logit_bias))
        return ids, np.fromiter(self.logit_bias.values(), dtype=np.float64, count=len(self.logit_bias))

    @functools.cached_property
    def allowed_token_array(self) -> np.ndarray:
        """allowed_token_ids as an int64 array, built once for the same reason."""
        return np.asarray(self.allowed_token_ids, dtype=np.int64)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def reads_drawn_tokens(self) -> bool:
        """Whether a draw depends on the tokens drawn so far (penalties count them, a grammar walks them),
        so that it must wait for the previous draw to reach the host."""
        return self.has_penalties or self.structured_output is not None

    def validate(self, max_logprobs: int = 20, max_n: int = 16) -> None:
        """Raise InvalidRequestError naming the first field out of range."""
        check_entries({name: len(getattr(self, name)) for name in MAX_ENTRIES})
        # `not <=` is also true of NaN.
        biased, bias = next(((t, b) for t, b in self.logit_bias.items() if not abs(b) <= MAX_ABS_LOGIT_BIAS),
                            (None, None))
        checks = [
            (_finite32(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite float32 >= 0, got {self.temperature}"),
            (self.top_k >= -1,
             f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}"),
            (math.isfinite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (math.isfinite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (_finite32(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be a finite float32 > 0, got {self.repetition_penalty}"),
            (math.isfinite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (math.isfinite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"),
            (self.logprobs is None or 0 <= self.logprobs <= max_logprobs,
             f"logprobs must be in [0, {max_logprobs}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= max_logprobs,
             f"prompt_logprobs must be in [0, {max_logprobs}], got {self.prompt_logprobs}"),
            (1 <= self.n <= max_n, f"n must be in [1, {max_n}], got {self.n}"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be in [0, 2^63), got {self.seed}"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0"),
            (all(t >= 0 for t in self.logit_bias), "logit_bias token ids must be >= 0"),
            (biased is None, f"logit_bias values must be in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}], "
                             f"got {bias} for token {biased}"),
            (all(t >= 0 for t in self.allowed_token_ids), "allowed_token_ids must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)
        if self.structured_output is not None:
            self.structured_output.validate()
