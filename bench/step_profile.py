"""Where a step's time goes: host phases and device time per step, on the offline benchmark's workload.

The engine launches step N+1 before it finishes step N (see LLMEngine.step), so one call of ``step``
holds: schedule (Scheduler.schedule), prepare (ModelRunner.prepare_inputs: host arrays, one H2D copy),
forward (launching the model, a graph replay for pure decodes, and the logits), sample (building the
sampler's inputs and launching it, with the copy of the tokens), wait (ModelRunner.finish: waiting
for the previous step's tokens), update (Scheduler.update). CUDA events around the launches give each
step's device time (forward, sample) and the device's period from one step's start to the next:
period - (forward + sample) is time the device sat idle. No extra synchronisation: events are read
once a later step has waited past them.

``--trace N`` also records N decode steps with torch.profiler and prints the kernels by device time.
``--trace-prefill N`` records the first N steps of a fresh workload (its prefill chunks) and prints the
calls by host time, where a wait for the device (a synchronising copy, allocation or free) shows up.
Decode steps are also summed per batch size, rounded up to a power of two (the buckets the decode
kernel's split count follows), to show which batch sizes the run's time goes to.
``--skinny-max-rows M`` lets linear layers of up to M rows take the skinny-GEMM kernel (the engine's
default is kernels.skinny_gemm.MAX_ROWS), to compare both in one call.

    python bench/step_profile.py --out bench/results/step_profile.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from offline import workload  # bench/offline.py, beside this script

from pagoda_engine import LLM

HOST_PHASES = ["schedule", "prepare", "forward", "sample", "wait", "update"]


class StepProfiler:
    def __init__(self, llm: LLM):
        self.engine, self.runner = llm.engine, llm.engine.runner
        self.cuda = torch.cuda.is_available()
        self.host: dict[str, float] = {}
        self.events: list[torch.cuda.Event] = []
        self.kind: str | None = None
        self.batch_size = 0
        # Launches whose events are not read yet: (kind, batch size, host row, [before forward, after forward,
        # after sampler]).
        self.pending: list[tuple[str, int, dict[str, float], list]] = []
        self.rows: dict[str, list[dict[str, float]]] = defaultdict(list)
        self.decode_rows: dict[int, list[dict[str, float]]] = defaultdict(list)  # by batch size bucket
        self._time(self.engine.scheduler, "schedule", "schedule", after=self._note_kind)
        self._time(self.runner, "prepare_inputs", "prepare")
        self._time(self.runner, "forward", "forward", events=True)
        self._time(self.runner, "sampler", "sample", events=True, before=False)
        self._time(self.runner, "finish", "wait")
        self._time(self.engine.scheduler, "update", "update")
        self._wrap_step()

    def _note_kind(self, batch) -> None:
        self.kind = "decode" if batch.num_decodes == len(batch) else "prefill"
        self.batch_size = len(batch)

    def _time(self, obj, name: str, phase: str, events: bool = False, before: bool = True, after=None) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            if events and before:
                self._record()
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.host[phase] = self.host.get(phase, 0.0) + time.perf_counter() - start
            if events:
                self._record()
            if after is not None:
                after(out)
            return out

        setattr(obj, name, timed)

    def _record(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def _wrap_step(self) -> None:
        inner = self.engine.step

        def step():
            self.host, self.events, self.kind = {}, [], None
            start = time.perf_counter()
            outputs = inner()
            row = {k: 1000 * v for k, v in self.host.items()}
            row["step"] = 1000 * (time.perf_counter() - start)
            self._read_finished_launches()
            if self.kind is not None:
                self.pending.append((self.kind, self.batch_size, row, self.events))
            return outputs

        self.engine.step = step

    def _read_finished_launches(self) -> None:
        """Launches before the newest have been waited for: their events can be read."""
        while len(self.pending) > 1 or (self.pending and not self.engine.has_unfinished_requests()):
            kind, batch_size, row, events = self.pending.pop(0)
            if len(events) == 3:
                events[2].synchronize()
                row["gpu forward"] = events[0].elapsed_time(events[1])
                row["gpu sample"] = events[1].elapsed_time(events[2])
                if self.pending and len(self.pending[0][3]) == 3:
                    row["gpu period"] = events[0].elapsed_time(self.pending[0][3][0])
            self.rows[kind].append(row)
            if kind == "decode":
                self.decode_rows[1 << (batch_size - 1).bit_length()].append(row)

    def summary(self) -> dict:
        return {kind: _means(rows) for kind, rows in self.rows.items()}

    def decode_by_batch(self) -> dict[int, dict]:
        """Decode steps per batch size bucket (up to 1, 2, 4, ... sequences), largest first."""
        return {bucket: _means(self.decode_rows[bucket]) for bucket in sorted(self.decode_rows, reverse=True)}


def _means(rows: list[dict[str, float]]) -> dict:
    keys = sorted({k for r in rows for k in r})
    means = {k: round(sum(r.get(k, 0.0) for r in rows if k in r) / sum(k in r for r in rows), 3) for k in keys}
    return {"steps": len(rows), **means, "total s": round(sum(r["step"] for r in rows) / 1000, 3)}


def trace_steps(llm: LLM, num_steps: int, num_seqs: int, prefill: bool = False) -> str:
    """torch.profiler over ``num_steps`` steps of ``num_seqs`` sequences: pure-decode steps, kernels by device
    time; or with ``prefill`` the first steps (the prompts' chunks), calls by host time."""
    from torch.profiler import ProfilerActivity, profile

    prompts, params = workload(num_seqs, 100, 1024, 1024)
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"trace-{i}", prompt, p)
    while not prefill and (engine.scheduler.waiting or engine.scheduler.running[-1].num_output_tokens < 2):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    return prof.key_averages().table(sort_by="cpu_time_total" if prefill else "cuda_time_total", row_limit=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).parent / "configs" / "qwen3-0.6b"))
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8")
    parser.add_argument("--trace", type=int, default=0, help="also profile this many decode steps' kernels")
    parser.add_argument("--trace-prefill", type=int, default=0, help="also profile this many prefill steps' calls")
    parser.add_argument("--skinny-max-rows", type=int, default=None, help="override skinny_gemm.MAX_ROWS")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_profile.json"))
    args = parser.parse_args()
    if args.skinny_max_rows is not None:
        from pagoda_engine.kernels import skinny_gemm

        skinny_gemm.MAX_ROWS = args.skinny_max_rows
    llm = LLM(args.model, load_format=args.load_format, max_model_len=args.max_model_len,
              max_num_batched_tokens=16384, kv_cache_dtype=args.kv_cache_dtype)
    prompts, params = workload(args.num_seqs, args.min_len, args.max_input_len, args.max_output_len)
    llm.generate([[1, 2, 3]], params[0])
    profiler = StepProfiler(llm)
    start = time.perf_counter()
    llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    summary = {"seconds": round(elapsed, 3), "steps": profiler.summary()}
    columns = HOST_PHASES + ["step", "gpu forward", "gpu sample", "gpu period"]
    print(f"{args.num_seqs} sequences in {elapsed:.2f} s; mean ms per step (host phases, then device times)")
    print(f"| {'kind':<9} | {'steps':>5} | " + " | ".join(f"{c:>11}" for c in columns) + f" | {'total s':>7} |")
    summary["decode_by_batch"] = profiler.decode_by_batch()
    rows = list(summary["steps"].items())
    rows += [(f"dec <={bucket}", s) for bucket, s in summary["decode_by_batch"].items()]
    for kind, s in rows:
        print(f"| {kind:<9} | {s['steps']:>5} | " + " | ".join(f"{s.get(c, 0.0):>11.3f}" for c in columns)
              + f" | {s['total s']:>7.2f} |")
    for key, steps, prefill in (("trace", args.trace, False), ("trace_prefill", args.trace_prefill, True)):
        if steps and torch.cuda.is_available():
            summary[key] = trace_steps(llm, steps, args.num_seqs, prefill)
            print(summary[key])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
