"""From a request's StructuredOutput to a TokenGrammar over the model's vocabulary, with caches on the way.

Compiling is the slow part (30-110 ms for a JSON schema's DFA, up to 0.4 s before the caps refuse one), so
each process keeps the DFAs it compiled by spec, and the engine its TokenGrammars (whose per-state masks
are cached too).
The gRPC service compiles a request's DFA off its event loop and sends it with the request, so that the
engine core, which runs every stream's steps, only builds the token masks.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from pathlib import Path

from pagoda_engine.sampling_params import InvalidRequestError, StructuredOutput
from pagoda_engine.structured_output.dfa import Dfa
from pagoda_engine.structured_output.grammar import TokenGrammar, lru_get
from pagoda_engine.structured_output.json_schema import choice_regex, json_object_regex, schema_to_regex
from pagoda_engine.structured_output.regex import compile_regex
from pagoda_engine.structured_output.vocabulary import TokenVocabulary

logger = logging.getLogger(__name__)

# Grammars kept by the engine: each holds its DFA and up to 1,024 cached masks.
_MAX_GRAMMARS = 16


def to_regex(spec: StructuredOutput) -> str:
    if spec.regex is not None:
        return spec.regex
    if spec.json_schema is not None:
        return schema_to_regex(spec.json_schema)
    if spec.choice is not None:
        return choice_regex(list(spec.choice))
    return json_object_regex()


@functools.lru_cache(maxsize=64)
def compile_dfa(spec: StructuredOutput) -> Dfa:
    """The spec's DFA; raises InvalidRequestError for a spec that cannot be compiled."""
    return compile_regex(to_regex(spec))


class GrammarCompiler:
    """TokenGrammars over one model's vocabulary, read from its tokenizer.json on first use."""

    def __init__(self, model_dir: Path | str, vocab_size: int, eos_token_ids: frozenset[int]):
        self._model_dir = model_dir
        self._vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self._grammars: OrderedDict[StructuredOutput, TokenGrammar] = OrderedDict()

    @functools.cached_property
    def vocabulary(self) -> TokenVocabulary:
        return TokenVocabulary.from_model_dir(self._model_dir, self._vocab_size, self._eos_token_ids)

    def preload(self) -> None:
        """Read the vocabulary now (a quarter of a second for 49K tokens), if the model has a tokenizer.json:
        a server does this before it serves, rather than on its first structured request."""
        if not (Path(self._model_dir) / "tokenizer.json").is_file():
            return
        try:
            self.vocabulary  # noqa: B018 - the cached property's first read builds it
        except InvalidRequestError as error:  # each structured request will be refused with it
            logger.warning("structured output is unavailable: %s", error)

    def grammar(self, spec: StructuredOutput, dfa: Dfa | None = None) -> TokenGrammar:
        """The spec's grammar; ``dfa``, when given, is the spec's already compiled DFA."""
        return lru_get(self._grammars, spec, lambda: TokenGrammar(dfa or compile_dfa(spec), self.vocabulary),
                       _MAX_GRAMMARS)
