"""Scheduler: which sequences run this step, and how many of their tokens.

Continuous batching in the style of vLLM v1: each step has a token budget; running sequences are
served first (a decode costs one token, an unfinished prefill its next chunk), then waiting ones are
admitted while the budget, ``max_num_seqs`` and the free KV blocks allow. When a running sequence
cannot get a block, the newest running sequence is preempted: its blocks are freed and it returns to
the front of the waiting queue, to be recomputed as a prefill (the prefix cache usually makes that cheap).
A sequence whose token from the step in flight is still pending waits a step instead: that token may
end it (EOS), and the step may end others and free their blocks, so a preemption now could be for
nothing. Once its token is known, it preempts if it still must.

The engine schedules step N+1 while step N still runs on the device, so ``schedule`` accounts for a
step as soon as it is scheduled: it advances ``num_computed_tokens``, publishes the blocks whose
tokens are known, and marks each sequence that samples as holding a pending token. ``update`` later
turns the pending tokens into real ones and applies stop conditions. This is safe because the device
runs steps in order: a block published, freed or reused now is only read or written by later steps.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pagoda_engine.block_manager import BlockManager
from pagoda_engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprobs


@dataclass
class ScheduledBatch:
    """One step's work. Decodes (one token) come first, then prefill chunks, as attention expects."""

    seqs: list[Sequence]
    num_tokens: list[int]  # tokens each sequence computes this step
    samples: list[bool]  # whether the step reaches the sequence's end, so it samples a token
    num_decodes: int
    preempted: list[Sequence] = field(default_factory=list)
    # Whether a sequence asking for prompt logprobs is unfinished, so that the step may score prompt
    # positions: without one, the runner does not look for any.
    may_score_prompts: bool = False

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Tokens the waiting sequences would compute before any prefix-cache hit (a router's hint).
        self.waiting_tokens = 0
        # Sequences preempted so far (a full KV cache shows here before it shows in latency).
        self.num_preemptions = 0
        # Prefix-cache statistics, in prompt tokens at first admission: looked up, and found cached.
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        # Unfinished sequences asking for prompt logprobs (ScheduledBatch.may_score_prompts).
        self.num_scoring = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.waiting_tokens += seq.num_tokens
        self.num_scoring += seq.prompt_logprobs is not None

    def add_scoring(self, seq: Sequence, prompt_logprobs: list[TokenLogprobs]) -> None:
        """Have ``seq`` score the prompt from where ``prompt_logprobs`` ends (an aborted sibling's)."""
        seq.prompt_logprobs = prompt_logprobs
        self.num_scoring += 1

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        short_of_blocks = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.reaches_length_limit(self.max_model_len):  # its pending token is its last
                i += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, num_new):
                if seq.num_pending_tokens:  # it waits for its token (module docstring)
                    short_of_blocks = True
                    i += 1
                    continue
                if not self._preempt_until_allocated(seq, num_new, preempted):
                    continue  # it was the newest, so itself preempted
            scheduled.append((seq, num_new))
            budget -= num_new
            i += 1
        if not preempted and not short_of_blocks:
            budget = self._admit_waiting(budget, scheduled)
        # Decodes first: a stable sort keeps arrival order within each group.
        scheduled.sort(key=lambda item: item[1] != 1)
        samples = [self._account(seq, n) for seq, n in scheduled]
        return ScheduledBatch(
            seqs=[seq for seq, _ in scheduled],
            num_tokens=[n for _, n in scheduled],
            samples=samples,
            num_decodes=sum(1 for _, n in scheduled if n == 1),
            preempted=preempted,
            may_score_prompts=self.num_scoring > 0,
        )

    def update(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Apply a finished step's tokens; ``sampled`` maps seq_id to the token it drew.

        Returns the sequences that finished (their blocks are already freed). Sequences aborted since
        the step was scheduled are skipped; a sequence preempted since still keeps its token.
        """
        finished = []
        for seq in batch.seqs:
            token = sampled.get(seq.seq_id)
            if token is None or seq.is_finished:
                continue
            seq.append_token(token)
            self.block_manager.cache_computed_blocks(seq)
            reason = seq.check_stop(self.max_model_len)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def abort(self, seqs: list[Sequence]) -> None:
        """Remove sequences wherever they are and free their blocks at once."""
        for seq in seqs:
            if not seq.is_finished:
                self._finish(seq, FinishReason.ABORT)

    def unschedule(self, batch: ScheduledBatch) -> None:
        """Undo ``schedule`` for a step whose launch raised (Ctrl-C, out of memory): the blocks it was to
        compute leave the prefix cache, and its sequences are preempted, to be recomputed."""
        for seq, num_new, samples in zip(batch.seqs, batch.num_tokens, batch.samples, strict=True):
            seq.num_pending_tokens -= samples
            self.block_manager.unpublish(seq, (seq.num_computed_tokens - num_new) // self.block_manager.block_size)
            self.running.remove(seq)
            self._preempt(seq)

    def _account(self, seq: Sequence, num_new: int) -> bool:
        """Count a scheduled step as done (see the module docstring); returns whether ``seq`` samples."""
        first_query = seq.num_computed_tokens
        seq.num_computed_tokens += num_new
        self.block_manager.cache_computed_blocks(seq)  # before the release: released blocks are published
        self.block_manager.release_outside_window(seq, first_query)
        if seq.num_computed_tokens < seq.num_tokens:  # a prefill chunk short of the prompt's end
            return False
        seq.num_pending_tokens += 1
        return True

    def _preempt_until_allocated(self, seq: Sequence, num_new: int, preempted: list[Sequence]) -> bool:
        """Preempt the newest running sequences until ``seq`` gets its blocks; False when ``seq`` itself was."""
        while True:
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
            if self.block_manager.allocate(seq, num_new):
                return True

    def _admit_waiting(self, budget: int, scheduled: list[tuple[Sequence, int]]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens or (seq.wait_for is not None and not self._prompt_cached_by(seq.wait_for)):
                break  # preempted while its last step runs, or an n > 1 sample before the prompt is cached
            # Cached positions get no logits: a prompt still to be scored (prompt_logprobs) is computed whole,
            # as vLLM v1 does. Its blocks still join the cache.
            lookup = not seq.needs_prompt_logprobs
            cached = self.block_manager.find_cached_prefix(seq) if lookup else []
            num_cached = len(cached) * self.block_manager.block_size
            num_new = seq.num_tokens - num_cached
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.block_manager.allocate(seq, num_new, cached):
                break
            if seq.num_preemptions == 0 and lookup:  # a re-admission finds its own recomputed blocks: not a hit
                seq.num_cached_tokens = num_cached
                self.prefix_query_tokens += seq.num_tokens
                self.prefix_hit_tokens += num_cached
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.waiting_tokens -= seq.num_tokens
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        return budget

    def _prompt_cached_by(self, first: Sequence) -> bool:
        return first.is_finished or first.num_computed_tokens >= first.num_prompt_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.waiting_tokens += seq.num_tokens

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:  # preempted while its last step ran, or aborted before it started
            self.waiting.remove(seq)
            self.waiting_tokens -= seq.num_tokens
        self.block_manager.free(seq)
        self.num_scoring -= seq.prompt_logprobs is not None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.monotonic()
