"""The decode kernel's split plans: host arithmetic, so these run on the CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagoda_engine.cuda_graph import batch_size_ladder  # noqa: E402
from pagoda_engine.kernels.decode_attention import (  # noqa: E402
    INVARIANT_SPLITS,
    MAX_SPLITS,
    THROUGHPUT_MIN_TOKENS,
    choose_num_splits,
    plan_splits,
    target_programs_per_sm,
)


def test_split_counts_fill_the_gpu_and_the_invariant_plan_ignores_the_batch():
    assert choose_num_splits(1, 8, 132) > 16  # one long sequence spreads over many SMs
    assert choose_num_splits(256, 8, 132) == 1  # big batches fill the GPU on their own
    assert choose_num_splits(1, 1, 132) == MAX_SPLITS
    plan = plan_splits(1, 8, 100, 132, batch_invariant=False)
    # Lengths do not enter the count: a short context gets few pieces from the smallest piece size.
    assert plan.divisor == plan.num_splits and plan.min_tokens == THROUGHPUT_MIN_TOKENS
    # The invariant plan ignores the batch; its grid only bounds the pieces of the longest context.
    plan = plan_splits(256, 8, 8192, 132, batch_invariant=True)
    assert plan == plan_splits(1, 8, 8192, 132, batch_invariant=True)
    assert plan.num_splits == 8192 // 256 and plan.reduce_width == INVARIANT_SPLITS
    assert plan_splits(4, 8, 100, 132, batch_invariant=True).num_splits == 1


def test_an_fp8_cache_cuts_big_batches_in_two():
    """One-warp fp8 programs aim at twice the programs per SM: 256 ragged contexts spread over 2 pieces."""
    fp8, bf16 = target_programs_per_sm(torch.float8_e4m3fn), target_programs_per_sm(torch.bfloat16)
    assert fp8 == 2 * bf16
    assert choose_num_splits(256, 8, 132, fp8) == 2 and choose_num_splits(256, 8, 132, bf16) == 1
    for batch in (1, 7, 64, 200):
        assert choose_num_splits(batch, 8, 132, fp8) >= choose_num_splits(batch, 8, 132, bf16)
    assert plan_splits(256, 8, 4096, 132, False, programs_per_sm=fp8).num_splits == 2


def test_throughput_plan_is_the_same_for_a_batch_and_its_cuda_graph_size():
    """A decode batch replays the smallest captured size holding it: its plan must not change on the way."""
    for max_batch in (256, 200, 48, 1):
        ladder = batch_size_ladder(max_batch)
        for batch in range(1, max_batch + 1):
            padded = next(size for size in ladder if size >= batch)
            for max_seq_len, bound in ((37, 4096), (3000, 32768)):  # eager passes its longest context
                eager = plan_splits(batch, 8, max_seq_len, 132, batch_invariant=False)
                assert eager == plan_splits(padded, 8, bound, 132, batch_invariant=False), (batch, padded)
