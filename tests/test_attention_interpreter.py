"""The Triton attention kernels on the CPU, under the Triton interpreter, against the torch reference.

triton 3.6's interpreter cannot loop ``range`` to a bound loaded from memory (its ``__index__`` reads a
one-element array as a scalar and fails), which the attention kernels do; the check patches that one
method for its own run. It covers what the CPU path cannot: the kernels' arithmetic, plain, with sliding
windows (whose prefill once left NaN in rows whose window starts past a tile's first keys) and with the
score soft-cap.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import read_loaded_scalars, run_under_interpreter

pytest.importorskip("triton")


def check_under_interpreter() -> None:
    """Windowed and soft-capped prefill (fresh and after a prefix, tiles past the window's edge) and decode
    (both split policies) in fp32; run by the test below with TRITON_INTERPRET=1."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    read_loaded_scalars()
    import torch

    from tests.test_triton_attention import make_batch, reference, run_backend

    batch = make_batch([(0, 70), (20, 50)], num_decodes=0, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32)
    for window, cap in ((None, None), (1, None), (5, None), (33, None), (None, 2.0), (5, 2.0)):
        ref, _, _ = reference(batch, window, cap)
        torch.testing.assert_close(run_backend(batch, False, window, cap), ref, atol=1e-5, rtol=1e-5)
    lengths = [1, 5, 63, 64, 65, 300]
    batch = make_batch([(n - 1, 1) for n in lengths], num_decodes=len(lengths), num_heads=4, num_kv_heads=2,
                       head_dim=64, block_size=16, dtype=torch.float32)
    for window, cap in ((None, None), (64, None), (None, 2.0)):
        ref, _, _ = reference(batch, window, cap)
        for batch_invariant in (False, True):
            torch.testing.assert_close(run_backend(batch, batch_invariant, window, cap), ref, atol=1e-5, rtol=1e-5)


def test_windowed_and_capped_attention_kernels_under_the_triton_interpreter():
    run_under_interpreter("tests.test_attention_interpreter")
