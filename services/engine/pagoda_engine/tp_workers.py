"""Tensor-parallel workers: rank 0's handle on ranks 1..N-1, and the loop each of those processes runs.

Rank 0 (the engine process) schedules and samples. Every other rank is a process spawned here that
holds its shard of the model and of the KV cache and repeats rank 0's forward pass, step by step:
rank 0 writes each worker the step's ``StepShape`` (a few int64s) on its pipe, then broadcasts the
flat input array that ``ModelRunner.prepare_inputs`` built; each side makes the same tensors of it and
runs the same forward, meeting in the layers' all-reduces.

The header goes over a pipe rather than through a broadcast because a worker may wait hours for the
next step while the engine idles, longer than any collective timeout; a pipe can wait forever and
reads EOF the moment rank 0 dies. The other way round, rank 0 watches every worker process and turns
an exit into ``WorkerDiedError`` rather than a wait in a collective that will never complete.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagoda_engine.config import EngineConfig
from pagoda_engine.model_config import ModelConfig
from pagoda_engine.model_runner import ModelRunner, StepShape, inputs_from_flat, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Process-group start-up and every collective. Ranks only meet in a collective when rank 0 has sent a
# step, so the wait is one rank's lag (a kernel compiling, a slow disk), never an idle engine.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
# How long a worker asked to stop may take before it is killed; and how long after a failed collective
# rank 0 waits to see whether a worker's exit caused it.
STOP_GRACE_S = 10.0
EXIT_GRACE_S = 5.0

# Messages on a worker's pipe besides step headers: start-up milestones, and the empty stop message.
_STARTED, _LOADED, _STOP = b"started", b"loaded", b""


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process exited: the engine cannot run another step."""


class RanksOutOfStepError(RuntimeError):
    """Rank 0 stopped part-way through a step (Ctrl-C, say) while the workers ran it: their collectives
    would pair with the next step's, so the engine cannot run another."""


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def share_cpu_threads(world_size: int) -> int:
    """Give this CPU rank its share of the cores; returns the thread count it had.

    Every rank taking every core oversubscribes them, and each collective then waits on a descheduled
    rank: on two cores, two ranks step several times faster with a thread each than with two.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // world_size))
    return threads


class TPWorkers:
    """Ranks 1..N-1, spawned and joined to the process group with rank 0 (the calling process).

    The process group is the default one, so the model built after this is sharded; ``close`` leaves it.
    """

    def __init__(self, config: EngineConfig, device: torch.device):
        world_size = config.tensor_parallel_size
        self.backend = backend_for(device)
        # Called from the watcher thread when a worker exits on its own (the service turns NOT_SERVING).
        self.on_exit: Callable[[], None] | None = None
        self._closing = False
        self._cpu_threads = share_cpu_threads(world_size) if device.type == "cpu" else None
        # Set by the watcher thread, the one thread that reaps workers, when one exits on its own.
        self._exited = threading.Event()
        self._exit_message: str | None = None
        self._out_of_step = False
        # Port 0: the OS picks a free one, so two engines on one host never collide.
        self._store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                                    wait_for_workers=False)
        context = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[mp.Process] = []
        for rank in range(1, world_size):
            parent, child = context.Pipe()
            proc = context.Process(target=worker_main, args=(rank, config, self._store.port, child),
                                   name=f"pagoda-tp-rank{rank}", daemon=True)
            proc.start()
            child.close()  # the worker now holds the only write end: its exit reads as EOF here
            self._conns.append(parent)
            self._procs.append(proc)
        threading.Thread(target=self._watch, name="pagoda-tp-watch", daemon=True).start()
        try:
            # Each worker says it started just before it joins, so one that failed before (at import, on
            # its GPU) is seen at once rather than after the process group's timeout.
            self._expect(_STARTED)
            dist.init_process_group(self.backend, store=self._store, rank=0, world_size=world_size,
                                    timeout=COLLECTIVE_TIMEOUT)
        except BaseException:
            self.close()
            raise
        logger.info("tensor parallel: %d ranks (%s), rendezvous on port %d", world_size, self.backend,
                    self._store.port)

    def wait_loaded(self) -> None:
        """Block until every worker has loaded its shard (a worker that exits instead is an error)."""
        self._expect(_LOADED)

    def lockstep(self, shape: StepShape, flat: torch.Tensor, forward: Callable[[], T]) -> T:
        """Send the workers the step, then run rank 0's ``forward()`` of it.

        Whatever stops rank 0 part-way leaves the workers inside the step's collectives, where the next
        step's would meet them: from then on ``check`` raises RanksOutOfStepError.
        """
        try:
            header = np.array(shape, dtype=np.int64).tobytes()
            for conn in self._conns:
                conn.send_bytes(header)
            dist.broadcast(flat, src=0)
            return forward()
        except BaseException:
            self._out_of_step = True
            raise

    def run(self, step: Callable[[], T]) -> T:
        """``step()``, with the error a dead worker causes in it turned into WorkerDiedError naming the worker."""
        try:
            result = step()
        except (RuntimeError, OSError) as error:  # a broken pipe or a failed collective
            self._raise_if_died(error)
            raise
        # After an aborted NCCL group a step can complete with garbage: never hand it out.
        self.check()
        return result

    def check(self) -> None:
        """Raise WorkerDiedError if a worker has exited, RanksOutOfStepError if a step was cut short."""
        if self._exit_message is not None:
            raise WorkerDiedError(self._exit_message)
        if self._out_of_step:
            raise RanksOutOfStepError("a tensor-parallel step was interrupted on rank 0 part-way, so the ranks "
                                      "are out of step: close this engine and build a new one")

    def close(self) -> None:
        """Stop the workers (killed after a grace period) and leave the process group. Idempotent."""
        if self._closing:
            return
        self._closing = True
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(_STOP)
        for proc in self._procs:
            proc.join(STOP_GRACE_S)
            if proc.is_alive():
                logger.warning("tensor-parallel worker %s did not stop; killing it", proc.name)
                proc.kill()
                proc.join()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._cpu_threads is not None:
            torch.set_num_threads(self._cpu_threads)

    # ---- internals ----

    def _raise_if_died(self, error: BaseException) -> None:
        """Raise WorkerDiedError from ``error`` if a worker has exited, or does within EXIT_GRACE_S."""
        if self._exited.wait(EXIT_GRACE_S):
            raise WorkerDiedError(self._exit_message) from error

    def _expect(self, message: bytes) -> None:
        """Wait for ``message`` from every worker; a worker that exits first reads as EOF and is an error."""
        pending = set(self._conns)
        while pending:
            for conn in wait(list(pending)):
                pending.discard(conn)
                try:
                    got = conn.recv_bytes()
                except EOFError as error:
                    self._raise_if_died(error)
                    raise
                if got != message:
                    raise RuntimeError(f"tensor-parallel worker sent {got!r}, expected {message!r}")

    def _watch(self) -> None:
        ready = wait([proc.sentinel for proc in self._procs])
        if self._closing:
            return
        rank, proc = next((rank, proc) for rank, proc in enumerate(self._procs, start=1) if proc.sentinel in ready)
        proc.join()
        self._exit_message = (f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code "
                              f"{proc.exitcode}; the engine cannot continue")
        logger.error("%s", self._exit_message)
        self._exited.set()
        if self.backend == "nccl" and dist.is_initialized():
            # NCCL would wait for the dead rank forever; the abort makes rank 0's pending collectives end.
            dist.distributed_c10d._abort_process_group()
        if self.on_exit is not None:
            self.on_exit()


# ---- the worker process ----


def worker_main(rank: int, config: EngineConfig, store_port: int, conn: Connection) -> None:
    """One worker's life: join the group, load this rank's shard, then follow rank 0's steps until stopped."""
    world_size = config.tensor_parallel_size
    model_config = ModelConfig.from_dir(config.model)
    device = resolve_device(config.device, rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        share_cpu_threads(world_size)
    conn.send_bytes(_STARTED)
    store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        torch.manual_seed(config.seed)
        runner = ModelRunner(config, model_config, device, resolve_dtype(config.dtype, model_config))
        conn.send_bytes(_LOADED)
        runner.setup_cache()
        _follow_steps(runner, conn)
    finally:
        dist.destroy_process_group()


def _follow_steps(runner: ModelRunner, conn: Connection) -> None:
    while True:
        try:
            header = conn.recv_bytes()
        except EOFError:  # rank 0 is gone: nothing will ever be asked of this worker again
            return
        if header == _STOP:
            return
        shape = StepShape(*np.frombuffer(header, dtype=np.int64).tolist())
        flat = torch.empty(shape.flat_size, dtype=torch.int64, device=runner.device)
        dist.broadcast(flat, src=0)
        runner.forward(inputs_from_flat(shape, flat))
