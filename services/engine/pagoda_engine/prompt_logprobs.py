"""Prompt logprobs (vLLM's ``prompt_logprobs``): how likely the model found each prompt token, given the ones before.

The logits at prompt position ``p`` predict the token at ``p + 1``, so a prompt of ``P`` tokens has ``P - 1``
entries, for positions ``1 .. P - 1``; the last position's logits predict the first output token, which the
sampler draws as usual. A prefill chunk ``[s, e)`` scores the positions it computes below ``P - 1``: its last
position predicts the first token of the next chunk, which the host knows (prompt tokens always are).

Normally the LM head runs only on a sequence's last position. For a sequence asking for prompt logprobs it
also runs on those rows, in slices of at most ``rows_per_slice(vocab)`` rows, each reduced at once to the
prompt token's logprob and the top alternatives: a 16k-token chunk never holds [16k, vocab] float32 logits
(10 GB for Qwen's 152k vocabulary). Positions whose logits are already on the host are not scored again
(a recompute after preemption). Tensor-parallel workers run the same slices, rank 0's (the LM head gathers
the vocabulary across ranks), and drop the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pagoda_engine.layers.sampler import token_logprobs
from pagoda_engine.sequence import Sequence, TokenLogprobs

# Float32 logits of one slice: with the model-dtype logits and the log-softmax beside them, a slice holds
# about 2.5 times this (640 MB at 152k vocabulary, 441 rows).
SLICE_BYTES = 256 * 2**20


def rows_per_slice(vocab_size: int) -> int:
    return max(1, SLICE_BYTES // (4 * vocab_size))


@dataclass(frozen=True)
class PromptLogprobsPlan:
    """Which rows of a step's flat batch are scored, and for which sequences (in batch order)."""

    seqs: list[Sequence]
    firsts: list[int]  # each sequence's first scored position: its index in Sequence.prompt_logprobs
    counts: list[int]
    rows: np.ndarray  # [N] int64: rows of the step's hidden states
    token_ids: np.ndarray  # [N] int64: the prompt token each row predicts
    num_top: int  # the largest prompt_logprobs among the sequences

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @classmethod
    def build(cls, seqs: list[Sequence], starts: np.ndarray, ends: np.ndarray,
              query_start_loc: np.ndarray) -> PromptLogprobsPlan:
        """The plan of a step computing positions ``starts[i] .. ends[i] - 1`` of ``seqs[i]``."""
        scored, firsts, counts, rows, token_ids = [], [], [], [], []
        for i, seq in enumerate(seqs):
            if seq.prompt_logprobs is None:
                continue
            # Past what the host has (a recompute scores nothing twice), short of the last prompt position.
            first = max(int(starts[i]), len(seq.prompt_logprobs))
            last = min(int(ends[i]), seq.num_prompt_tokens - 1)
            if first < last:
                scored.append(seq)
                firsts.append(first)
                counts.append(last - first)
                rows.append(np.arange(first, last) - starts[i] + query_start_loc[i])
                token_ids.append(np.asarray(seq.token_ids[first + 1 : last + 1], dtype=np.int64))
        if not scored:
            return NO_PROMPT_LOGPROBS
        return cls(scored, firsts, counts, np.concatenate(rows), np.concatenate(token_ids),
                   max(seq.params.prompt_logprobs for seq in scored))

    def entries(self, out: PromptLogprobsOutput) -> list[tuple[Sequence, int, list[TokenLogprobs]]]:
        """Per planned sequence: (sequence, first position, its entries), from ``out`` in host memory."""
        chosen, top_ids, top_logprobs = out.logprobs.tolist(), out.top_ids.tolist(), out.top_logprobs.tolist()
        result, row = [], 0
        for seq, first, count in zip(self.seqs, self.firsts, self.counts, strict=True):
            k = seq.params.prompt_logprobs
            entries = [(chosen[r], list(zip(top_ids[r][:k], top_logprobs[r][:k], strict=True)))
                       for r in range(row, row + count)]
            result.append((seq, first, entries))
            row += count
        return result


# The plan of a step that scores no prompt position: most steps, which do not look for any while no
# sequence asks for prompt logprobs (ScheduledBatch.may_score_prompts).
NO_PROMPT_LOGPROBS = PromptLogprobsPlan([], [], [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0)


@dataclass
class PromptLogprobsOutput:
    """One step's scored rows, in plan order; raw-distribution logprobs, as the sampler's."""

    logprobs: torch.Tensor  # [N] float32, of the prompt token
    top_ids: torch.Tensor  # [N, K] int64, K = the plan's num_top, most likely first
    top_logprobs: torch.Tensor  # [N, K] float32


def compute_prompt_logprobs(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor,
                            num_top: int, slice_rows: int) -> PromptLogprobsOutput:
    """The LM head on ``hidden[rows]``, ``slice_rows`` rows at a time, each slice reduced to the logprob of
    its ``token_ids`` and the ``num_top`` most likely tokens. No host sync."""
    n = rows.shape[0]
    out = PromptLogprobsOutput(
        logprobs=torch.empty(n, dtype=torch.float32, device=hidden.device),
        top_ids=torch.empty((n, num_top), dtype=torch.int64, device=hidden.device),
        top_logprobs=torch.empty((n, num_top), dtype=torch.float32, device=hidden.device),
    )
    for lo in range(0, n, slice_rows):
        hi = min(lo + slice_rows, n)
        logits = model.compute_logits(hidden[rows[lo:hi]])
        out.logprobs[lo:hi], out.top_logprobs[lo:hi], out.top_ids[lo:hi] = token_logprobs(
            logits, token_ids[lo:hi], num_top)
    return out
