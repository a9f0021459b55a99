"""A Sequence: one sample of one request, as the scheduler, block manager and runner see it."""

from __future__ import annotations

import enum
import itertools
import time
from typing import TYPE_CHECKING

import numpy as np

from pagoda_engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda_engine.structured_output.grammar import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or the end of the structured output's grammar
    LENGTH = "length"  # max_tokens or the max model length
    ABORT = "abort"  # cancelled by the client or the server


_seq_ids = itertools.count()

# The logprobs of one position: (the token's logprob, [(token id, logprob) of the most likely, best first]).
TokenLogprobs = tuple[float, list[tuple[int, float]]]


class Sequence:
    """Token ids (prompt then output) and how far the KV cache has been computed.

    ``num_computed_tokens`` drives everything (as in vLLM v1): a step computes the next
    ``num_tokens - num_computed_tokens`` tokens or a chunk of them, so a fresh prompt, a chunked
    prefill, a decode and a request resumed after preemption are one code path.

    ``num_pending_tokens`` counts tokens drawn by steps still running on the device: the engine
    schedules step N+1 before step N's tokens reach the host, so a decode's input may be a token that
    is not in ``token_ids`` yet (between the two, step N's and step N+1's tokens are both pending).
    ``num_tokens`` counts them; ``token_ids`` (and ``num_output_tokens``) get each when its step finishes.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        stop_ids: frozenset[int],
        index: int = 0,
        arrival_time: float | None = None,
    ):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.seed = seed
        # EOS ids (unless ignore_eos) and the request's stop token ids.
        self.stop_ids = stop_ids
        self.token_ids: list[int] = list(prompt_token_ids)
        # token_ids again as int64, with room to grow (see token_array).
        self._token_buffer = np.array(self.token_ids, dtype=np.int64)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        # Sample 0 of a request asking for prompt_logprobs (the prompt is scored once, whatever n is): entry
        # j is prompt token j + 1's, filled as prefill chunks finish. None for every other sequence, until
        # sample 0 is aborted before its first token and hands the list on (LLMEngine.abort_request).
        self.prompt_logprobs: list[TokenLogprobs] | None = (
            [] if params.prompt_logprobs is not None and index == 0 else None)
        self.block_table: list[int] = []
        # Chained hashes of the leading full blocks of token_ids, extended as blocks fill.
        self.block_hashes: list[bytes] = []
        # Leading blocks already offered to the prefix cache (so each step publishes only new ones).
        self.num_published_blocks = 0
        # Leading blocks of block_table handed back because no later query's sliding window reaches them
        # (BlockManager.release_outside_window): their entries stay, as positions, but are no longer ours.
        self.num_released_blocks = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        # n > 1: later samples wait until the first has cached the prompt, then share its blocks.
        self.wait_for: Sequence | None = None
        # Structured output: where the sample's tokens so far leave its grammar (LLMEngine.add_request sets it).
        self.grammar: GrammarMatcher | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens in ``token_ids``: the ones reported so far (pending ones are not)."""
        return len(self.token_ids) - self.num_prompt_tokens

    def reaches_length_limit(self, max_model_len: int) -> bool:
        """Whether the tokens drawn so far, pending ones too, already end the sequence by length."""
        return self.num_tokens - self.num_prompt_tokens >= self.params.max_tokens or self.num_tokens >= max_model_len

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt positions are still to be scored, so that cached ones cannot be skipped."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    def add_prompt_logprobs(self, first: int, entries: list[TokenLogprobs]) -> None:
        """A finished step's entries for prompt positions ``first + 1`` on. A recompute after preemption may
        have scored some again while the first scoring was in flight: those are dropped."""
        known = len(self.prompt_logprobs)
        if first > known:
            raise RuntimeError(f"prompt logprobs from position {first + 1}, but only {known} are known")
        self.prompt_logprobs.extend(entries[known - first :])

    def append_token(self, token_id: int) -> None:
        """The step that sampled ``token_id`` has finished: the pending token becomes a real one."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.token_ids.append(token_id)
        n = len(self.token_ids)
        if n > len(self._token_buffer):
            grown = np.empty(2 * n, dtype=np.int64)
            grown[: n - 1] = self._token_buffer[: n - 1]
            self._token_buffer = grown
        self._token_buffer[n - 1] = token_id
        self.num_pending_tokens -= 1
        if self.grammar is not None:
            self.grammar.accept(token_id)

    @property
    def token_array(self) -> np.ndarray:
        """``token_ids`` as an int64 view, kept in step with it by ``append_token``: the sampler lists the
        tokens of every penalised row each step, and converting 256 rows of 1,500 Python ints took 23 ms."""
        return self._token_buffer[: len(self.token_ids)]

    @property
    def stop_token_id(self) -> int | None:
        """The EOS or stop token id that ended the sample, if one did (a grammar's end may need none)."""
        last = self.token_ids[-1]
        stopped = self.finish_reason is FinishReason.STOP and self.num_output_tokens > 0
        return last if stopped and last in self.stop_ids else None

    def check_stop(self, max_model_len: int) -> FinishReason | None:
        """Why the sequence ends after its newest token in ``token_ids``, if it does.

        Pending tokens do not count: the step drawing them started before this token was known.
        """
        if self.token_ids[-1] in self.stop_ids and self.num_output_tokens >= self.params.min_tokens:
            return FinishReason.STOP
        if self.grammar is not None and self.grammar.is_complete:  # whatever min_tokens says: nothing may follow
            return FinishReason.STOP
        if self.num_output_tokens >= self.params.max_tokens or len(self.token_ids) >= max_model_len:
            return FinishReason.LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )
