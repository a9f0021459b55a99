"""Which Triton kernels compile inside a block of code: the check that warm-up left nothing to compile.

The engine compiles its kernels before serving (the profiling pass, one cached step, the CUDA-graph
captures). A kernel variant that warm-up misses compiles in the middle of a request instead, which on a
machine with a cold Triton cache stalls every sequence of that step for up to a second. Variants come
from constexprs and from Triton specialising integer arguments (== 1, divisible by 16), so an argument
that follows the batch, such as a split count or a block-table stride, must not be specialised on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def triton_compiles() -> Iterator[list[str]]:
    """Yield a list that fills with the name of each kernel Triton compiles (or loads from its disk cache)
    in the block; empty when Triton is not installed."""
    compiled: list[str] = []
    try:
        from triton import knobs
    except ImportError:
        yield compiled
        return
    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda *, fn, **_: compiled.append(fn.name)
    try:
        yield compiled
    finally:
        knobs.runtime.jit_post_compile_hook = previous
