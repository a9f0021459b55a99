"""Vocabulary-parallel token embedding and LM head.

Each rank holds ``ceil(vocab / tp_size)`` consecutive rows of the ``[vocab, hidden]`` matrix; the
last rank's tail past the real vocabulary is zero padding, so any vocabulary size works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda_engine.distributed import all_gather, all_reduce, tp_rank, tp_size
from pagoda_engine.layers.linear import copy_weight, linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.tp_size = tp_size()
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        # Clamped: with more ranks than rows to spare, the last ranks hold padding only.
        self.vocab_start = min(tp_rank() * self.rows_per_rank, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.num_embeddings:
            raise ValueError(f"shape {tuple(loaded.shape)} should have {self.num_embeddings} rows (the vocabulary)")
        rows = self.vocab_end - self.vocab_start
        copy_weight(param.data[:rows], loaded[self.vocab_start : self.vocab_end])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids outside this rank's rows look up row 0 and are zeroed; the all-reduce fills them in.
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * mine, self.weight) * mine.unsqueeze(-1)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states to logits over the whole vocabulary; every rank gets the full logits."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden_states, self.weight)
        if self.tp_size == 1:
            return logits
        return all_gather(logits, dim=-1)[..., : self.num_embeddings]
