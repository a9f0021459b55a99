"""What an attention backend needs to know about one step's flat batch of tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def longest_first(seq_lens: torch.Tensor) -> torch.Tensor:
    """The rows of a decode batch, longest context first: the order decode attention's grid visits them
    (kernels/decode_attention.py says why). A device sort: no host sync, and CUDA-graph capturable."""
    return torch.argsort(seq_lens, descending=True).to(torch.int32)


@dataclass
class AttentionMetadata:
    """One step's batch, flattened: every sequence contributes ``query_len >= 1`` consecutive tokens.

    Invariants the runner guarantees and backends rely on:
    - the first ``num_decodes`` sequences have exactly one query token each (decode), the rest are
      prefill chunks (a whole prompt, a chunk of one, or a resumed request's recompute);
    - a sequence's query tokens are its last ``query_len`` positions: query ``j`` of sequence ``i``
      sits at position ``seq_lens[i] - query_len_i + j`` and attends to positions ``<=`` its own;
    - ``slot_mapping[t]`` is where token ``t``'s K/V is written in the paged cache
      (``block_id * block_size + offset``), or ``-1`` for a padding token that writes nothing;
    - ``block_tables[i, b]`` is the cache block holding positions ``[b * block_size, (b+1) * block_size)``
      of sequence ``i``; entries past the sequence's last block are unspecified.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths (cu_seqlens_q)
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    # ``longest_first(seq_lens[:num_decodes])``, sorted once per step for every layer's decode kernel;
    # None in steps built by hand (warm-up, tests): the kernel then sorts per call.
    decode_order: torch.Tensor | None = None
    # Host copies for backends that loop in Python (the torch reference); None under CUDA graphs.
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
