"""Timing GPU work the way decode steps run it: captured in a CUDA graph, replayed, timed with CUDA events."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_seconds_per_call(calls: list[Callable[[], object]], replays: int = 5) -> float:
    """Seconds per call of ``calls`` captured in one CUDA graph and replayed ``replays`` times.

    The first two run eagerly first: Triton compiles, and the allocator warms, outside the capture.
    Callers cycle ``calls`` over copies of their data larger than the L2 when HBM traffic should count.
    """
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / 1e3 / (replays * len(calls))
