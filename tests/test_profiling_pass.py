"""The memory-profiling pass's attention (no cache yet) where FlashAttention cannot stand in: the torch
reference over a few query rows at a time gives what it gives over the whole prompt. Runs on the CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagoda_engine.layers.attention.metadata import AttentionMetadata  # noqa: E402
from pagoda_engine.layers.attention.torch_backend import causal_attention  # noqa: E402
from pagoda_engine.layers.attention.triton_backend import PROFILE_QUERY_ROWS, attend_without_cache  # noqa: E402


@pytest.mark.parametrize(("window", "cap"), [(None, 2.0), (37, None), (37, 2.0)])
def test_chunked_rows_match_the_whole_prompt(window, cap):
    lengths = [PROFILE_QUERY_ROWS * 2 + 7, 5]
    starts = [0, lengths[0], sum(lengths)]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lengths), 4, 16, generator=generator)
    k, v = (torch.randn(sum(lengths), 2, 16, generator=generator) for _ in range(2))
    meta = AttentionMetadata(
        slot_mapping=torch.full((sum(lengths),), -1), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lengths, dtype=torch.int32), block_tables=torch.zeros(2, 1, dtype=torch.int32),
        num_decodes=0, max_query_len=max(lengths), max_seq_len=max(lengths), query_start_loc_host=starts,
        seq_lens_host=lengths,
    )
    out = attend_without_cache(q, k, v, meta, 0.25, torch.full_like(q, float("nan")), window, cap)
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        whole = causal_attention(q[start:end], k[start:end], v[start:end], 0.25, window, cap)
        torch.testing.assert_close(out[start:end], whole, atol=1e-6, rtol=1e-5)
