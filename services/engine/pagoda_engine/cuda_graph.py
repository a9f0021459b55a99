"""CUDA graphs of the model's forward for pure-decode steps, at a ladder of batch sizes.

Decode steps are small and launch-bound; replaying a captured graph removes the per-kernel launch
cost. A batch of ``n`` sequences replays the smallest captured size ``>= n``: the padding rows write
no KV (slot -1) and attend to one cached token, and their outputs are dropped.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from pagoda_engine.layers.attention.metadata import AttentionMetadata, longest_first


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_batch: int, max_blocks: int, max_seq_len: int, device: torch.device):
        self.model = model
        self.sizes = batch_size_ladder(max_batch)
        self.max_seq_len = max_seq_len
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def _meta(self, batch_size: int) -> AttentionMetadata:
        """The static buffers as one step's metadata; built inside the capture, so that the graph re-sorts
        the decode order from each replay's lengths."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            num_decodes=batch_size,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            decode_order=longest_first(self.seq_lens[:batch_size]),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        # Largest first, so smaller graphs reuse the first one's memory pool.
        for size in reversed(self.sizes):
            inputs = (self.input_ids[:size], self.positions[:size])
            self.model(*inputs, self._meta(size))  # warm-up: lazy initialisation happens outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(*inputs, self._meta(size))
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = meta.slot_mapping
        self.slot_mapping[n:size] = -1
        self.seq_lens[:n] = meta.seq_lens
        self.seq_lens[n:size] = 1
        self.block_tables[:n, : meta.block_tables.shape[1]] = meta.block_tables
        self.graphs[size].replay()
        return self.outputs[size][:n]
