"""SampleStream: one sample ("choice") of a request, from the engine's token messages to text messages.

Tokens go through the incremental detokenizer, their text through the stop-string matcher. With stop
strings, tokens are fed one at a time, so that the token completing a match is known: the sample's
output ends with it. After a match the sample is aborted on the engine (that sample alone), which may
still send a few tokens for it meanwhile; they are dropped, and the sample's last message goes out with the
engine's final message, which carries the usage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagoda.v1 import engine_pb2, tokenizer_pb2
from pagoda_tokenizer.detokenizer import IncrementalDetokenizer
from pagoda_tokenizer.stop_strings import StopStringMatcher
from pagoda_tokenizer.tokenizer import TextTokenizer

# Prompt tokens decoded ahead of the output, so the first output token's leading space survives (as vLLM).
CONTEXT_TOKENS = 5


@dataclass(frozen=True)
class TextOptions:
    """The text-level parts of a Generate or Chat request."""

    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


class SampleStream:
    def __init__(self, tokenizer: TextTokenizer, request_id: str, index: int, prompt_ids: Sequence[int],
                 options: TextOptions, min_tokens: int = 0):
        self._tokenizer = tokenizer
        self._request_id = request_id
        self._index = index
        self._include_stop = options.include_stop_str_in_output
        self._detokenizer = IncrementalDetokenizer(
            tokenizer.backend, options.skip_special_tokens, prompt_ids[-CONTEXT_TOKENS:]
        )
        self._stops = StopStringMatcher(options.stop, options.include_stop_str_in_output)
        self._num_tokens = 0
        # As in vLLM, no stop string may end within the first min_tokens tokens.
        self._min_tokens = min_tokens
        # The stop string that ended the output; the engine may not know yet.
        self.stop_string: str | None = None
        # The sample's last message has been produced.
        self.finished = False

    @property
    def output_done(self) -> bool:
        """No more output will be sent: finished, or stopped by a stop string."""
        return self.finished or self.stop_string is not None

    def on_engine_message(self, message: engine_pb2.GenerateResponse) -> tokenizer_pb2.TextGenerateResponse | None:
        """The text-level message for one engine message of this sample, or None when there is nothing to send."""
        final = message.finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED
        if self.stop_string is not None:
            return self._last_message(tokenizer_pb2.TextGenerateResponse(), message) if final else None
        token_ids = list(message.token_ids)
        text, used = self._text_of(self._text_tokens(message, token_ids))
        if self.stop_string is None:
            used = len(token_ids)  # a stop token left out of the text is still part of the output
        self._num_tokens += used
        if final and self.stop_string is None:
            text += self._flush()
        out = tokenizer_pb2.TextGenerateResponse(
            request_id=self._request_id, index=self._index, text=text, token_ids=token_ids[:used],
            logprobs=self._named_logprobs(message.logprobs[:used]),
            prompt_logprobs=self._named_logprobs(message.prompt_logprobs),  # up to the first token (engine.proto)
        )
        return self._last_message(out, message) if final else out

    def _text_tokens(self, message: engine_pb2.GenerateResponse, token_ids: list[int]) -> list[int]:
        """The tokens whose text belongs in the output: all but an EOS or stop token, unless it is kept."""
        if message.HasField("stop_token_id") and not self._include_stop:
            return token_ids[:-1]
        return token_ids

    def _text_of(self, token_ids: list[int]) -> tuple[str, int]:
        """Text for the tokens, and how many tokens it used (fewer when a stop string matched)."""
        if not self._stops.active:
            return self._detokenizer.add(token_ids), len(token_ids)
        pieces = []
        for used, token_id in enumerate(token_ids, start=1):
            can_stop = self._num_tokens + used > self._min_tokens
            text, self.stop_string = self._stops.push(self._detokenizer.add([token_id]), can_stop)
            pieces.append(text)
            if self.stop_string is not None:
                return "".join(pieces), used
        return "".join(pieces), len(token_ids)

    def _flush(self) -> str:
        """Everything held back, at the end of the sample: incomplete characters, then possible stop strings."""
        text, self.stop_string = self._stops.push(self._detokenizer.flush(), self._num_tokens > self._min_tokens)
        return text if self.stop_string is not None else text + self._stops.flush()

    def _last_message(self, out: tokenizer_pb2.TextGenerateResponse,
                      final: engine_pb2.GenerateResponse) -> tokenizer_pb2.TextGenerateResponse:
        out.request_id, out.index = self._request_id, self._index
        if self.stop_string is not None:
            out.finish_reason = engine_pb2.FINISH_REASON_STOP
            out.stop_string = self.stop_string
        else:
            out.finish_reason = final.finish_reason
            if final.HasField("stop_token_id"):
                out.stop_token_id = final.stop_token_id
        out.usage.CopyFrom(final.usage)
        out.usage.completion_tokens = self._num_tokens
        self.finished = True
        return out

    def _named_logprobs(self, logprobs: Sequence[engine_pb2.TokenLogprobs]) -> list[engine_pb2.TokenLogprobs]:
        """The engine's logprobs with each token's text filled in."""
        named = []
        for entry in logprobs:
            copy = engine_pb2.TokenLogprobs()
            copy.CopyFrom(entry)
            for logprob in (copy.sampled, *copy.top):
                logprob.token = self._tokenizer.token_text(logprob.token_id)
            named.append(copy)
        return named
