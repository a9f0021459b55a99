"""AsyncEngine: the asyncio side of the engine core process (engine_core.py).

``start`` spawns the engine core and waits until its model is loaded. Requests and aborts go down the
pipe as commands, written by a sender thread; a reader thread takes each step's outputs off the pipe
and hands them, in one batch per step (``loop.call_soon_threadsafe``), to per-request asyncio queues.
A consumer slower than the engine finds several steps' tokens waiting and sends them as one message.
The event loop never waits on the engine: a long prompt's command can fill the pipe while the core is
busy with a step, and only the sender thread waits for it.

Each admission gets a key of its own (``request_id#counter``), which its commands and outputs carry: a
request id may be reused the moment its stream ends, while the old request's last output (its abort)
is still on its way back, and that output must not reach the new stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
from collections.abc import AsyncIterator

from pagoda.v1 import engine_pb2
from pagoda_engine.config import EngineConfig
from pagoda_engine.engine import EngineLoad, RequestLimits, SequenceOutput
from pagoda_engine.engine_core import Abort, Add, Failed, Outputs, Ready, Stop, run_engine_core
from pagoda_engine.sampling_params import InvalidRequestError, SamplingParams
from pagoda_engine.structured_output.compiler import compile_dfa

logger = logging.getLogger(__name__)

# How long ``stop`` waits for the engine core to exit before killing it.
_STOP_GRACE_S = 30.0


class QueueFullError(RuntimeError):
    """Too many requests are waiting (gRPC RESOURCE_EXHAUSTED)."""


class EngineDeadError(RuntimeError):
    """The engine core failed or exited; no request can be served (gRPC UNAVAILABLE)."""


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        # Streams by admission key, and the key of each request id with an open stream.
        self._streams: dict[str, asyncio.Queue] = {}
        self._keys: dict[str, str] = {}
        self._admissions = itertools.count()
        # By admission key, the samples sent to the engine core that it has not finished: its work. This
        # outlives a stream (a cancelled request's abort is still to come back) and can end before it (the
        # core has finished, and the stream waits on a client that stopped reading).
        self._unfinished: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn = None
        self._reader: threading.Thread | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # for the sender thread; None stops it
        # Loop time of the engine core's latest step report (or of the first request after an idle spell).
        self._last_progress = 0.0
        self._watchdog: asyncio.Task | None = None
        self._error: BaseException | None = None
        # Set on the loop once the engine core has failed or exited: the service stops serving.
        self.failed = asyncio.Event()
        # Known once started: the served model, what a request must fit, and the load after the latest step.
        self.model_info: engine_pb2.ModelInfo | None = None
        self.limits: RequestLimits | None = None
        self.load: EngineLoad | None = None

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    async def start(self) -> None:
        """Spawn the engine core and wait until its model is loaded; RuntimeError if it cannot start."""
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=run_engine_core, args=(self.config, child_conn),
                                        name="pagoda-engine-core")
        self._process.start()
        child_conn.close()
        ready = await asyncio.to_thread(self._receive)
        if not isinstance(ready, Ready):
            await asyncio.to_thread(self._process.join)
            raise RuntimeError(ready.message if isinstance(ready, Failed) else "the engine core exited while loading")
        self.model_info = engine_pb2.ModelInfo.FromString(ready.model_info)
        self.limits, self.load = ready.limits, ready.load
        self._reader = threading.Thread(target=self._read, name="pagoda-engine-reader", daemon=True)
        self._reader.start()
        threading.Thread(target=self._write, name="pagoda-engine-sender", daemon=True).start()
        if self.config.engine_step_timeout_s > 0:
            self._watchdog = asyncio.create_task(self._watch_progress(self.config.engine_step_timeout_s))

    def kill(self) -> None:
        """Kill the engine core at once (a stop while it loads); ``start`` then fails, and the reader ends."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()

    async def stop(self) -> None:
        """Abort what is left, stop the engine core and wait for it (killed after a grace period)."""
        if self._process is None:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._error is None:
            self._send(Stop())
        # The reader sees the pipe close when the core exits; only then is the process joined here.
        await asyncio.to_thread(self._reader.join, _STOP_GRACE_S)
        await asyncio.to_thread(self._process.join, 0 if self._reader.is_alive() else _STOP_GRACE_S)
        if self._process.exitcode is None:
            logger.warning("the engine core did not stop within %.0f s; killing it", _STOP_GRACE_S)
            self._process.kill()
            await asyncio.to_thread(self._reader.join)
        self._commands.put(None)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[list[SequenceOutput]]:
        """Yield lists of outputs (each list: whatever arrived since the last yield) until every sample ends.

        Raises InvalidRequestError, QueueFullError or EngineDeadError before the first yield. Closing
        the iterator early (client cancel, deadline) aborts the request and frees its blocks.
        """
        self._admit(request_id, prompt_token_ids, params)
        # Compiled here, off the event loop, so that the engine core's steps never wait on it.
        spec = params.structured_output
        dfa = None if spec is None else await asyncio.to_thread(compile_dfa, spec)
        if request_id in self._keys:  # taken while this request's grammar compiled
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not self._unfinished:  # the core may have idled for long: its next step is due from now
            self._last_progress = self._loop.time()
        key = f"{request_id}#{next(self._admissions)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[key], self._keys[request_id], self._unfinished[key] = stream, key, params.n
        self._send(Add(key, prompt_token_ids, params, dfa))
        unfinished = params.n
        try:
            while unfinished:
                batch = [await stream.get()]
                while not stream.empty():
                    batch.append(stream.get_nowait())
                error = next((item for item in batch if isinstance(item, BaseException)), None)
                if isinstance(error, InvalidRequestError):
                    raise error
                if error is not None:
                    raise EngineDeadError("the engine stopped while serving this request") from error
                unfinished -= sum(1 for out in batch if out.finish_reason is not None)
                if not unfinished:  # the id is free once the caller has the last outputs, not after
                    self._forget(request_id, key)
                yield batch
        finally:
            self._forget(request_id, key)
            if unfinished and self._error is None:
                self._send(Abort(key))

    def _forget(self, request_id: str, key: str) -> None:
        self._streams.pop(key, None)
        if self._keys.get(request_id) == key:  # not a later admission under the same id
            del self._keys[request_id]

    def abort(self, request_id: str, indices: tuple[int, ...] = ()) -> bool:
        """Abort a request's samples (``indices``; empty: all) by id, for the Abort RPC; False when no such
        request is active."""
        key = self._keys.get(request_id)
        if key is None:
            return False
        self._send(Abort(key, indices))
        return True

    def _admit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if self._error is not None or self._reader is None:
            raise EngineDeadError("the engine is not running")
        if request_id in self._keys:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.limits.check(prompt_token_ids, params)
        cap = self.config.max_waiting_requests  # >= max_n (EngineConfig): every valid request can wait
        waiting = self._num_waiting()
        if waiting + params.n > cap:
            raise QueueFullError(f"{waiting} sequences are already waiting and this request adds {params.n}, "
                                 f"past the {cap} that may wait; try again later")

    def _num_waiting(self) -> int:
        """Sequences in the core's queue or on their way to it, including those admitted since its last report.

        A sequence the core has not finished is running, as that report says, or waiting: the report's own
        waiting count leaves out the requests admitted since, and a burst of them would all be let in.
        """
        return sum(self._unfinished.values()) - self.load.running

    def _send(self, command) -> None:
        self._commands.put(command)

    def _receive(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            return None

    # ---- the sender and reader threads ----

    def _write(self) -> None:
        while (command := self._commands.get()) is not None:
            try:
                self._conn.send(command)
            except OSError as error:  # the engine core is gone; the reader reports it
                logger.debug("engine core pipe closed: %s", error)
                return

    def _read(self) -> None:
        while True:
            message = self._receive()
            if isinstance(message, Outputs):
                self._loop.call_soon_threadsafe(self._deliver, message)
                continue
            if message is None and self._exit_code() == 0:  # after Stop
                return
            if self._error is not None:  # the watchdog killed it, and has told the streams
                return
            reason = message.message if isinstance(message, Failed) else "the engine core exited"
            logger.error("engine core failed: %s", reason)
            self._error = EngineDeadError(reason)
            self._loop.call_soon_threadsafe(self._fail_all, self._error)
            return

    def _exit_code(self) -> int | None:
        self._process.join(_STOP_GRACE_S)
        return self._process.exitcode

    async def _watch_progress(self, timeout: float) -> None:
        """Declare the engine stuck when it has unfinished work but reports no step for ``timeout`` seconds.

        Its work, not the open streams: a stream stays open while it waits on a client that stopped reading,
        and meanwhile the core, done with its request, idles without a report.
        """
        while self._error is None:
            await asyncio.sleep(min(1.0, timeout / 4))
            stalled = self._loop.time() - self._last_progress
            if self._unfinished and stalled > timeout and self._error is None:
                reason = (f"the engine finished no step in {stalled:.1f} s with {len(self._unfinished)} "
                          "requests unfinished")
                logger.error("%s: stopping it", reason)
                self._error = EngineDeadError(reason)
                self._process.kill()  # a stuck core may hold the GPU; nothing it does now would be delivered
                self._fail_all(self._error)

    def _deliver(self, outputs: Outputs) -> None:
        """Hand each output (or a (key, error) pair) to its admission's stream, if it is still open."""
        self._last_progress = self._loop.time()
        self.load = outputs.load
        for out in outputs.items:
            key, item = out if isinstance(out, tuple) else (out.request_id, out)
            self._count_finished(key, item)
            stream = self._streams.get(key)
            if stream is not None:
                stream.put_nowait(item)

    def _count_finished(self, key: str, item: SequenceOutput | InvalidRequestError) -> None:
        if isinstance(item, InvalidRequestError):  # the core refused the Add: none of it runs
            del self._unfinished[key]
        elif item.finish_reason is not None:
            self._unfinished[key] -= 1
            if not self._unfinished[key]:
                del self._unfinished[key]

    def _fail_all(self, error: BaseException) -> None:
        self.failed.set()
        for stream in self._streams.values():
            stream.put_nowait(error)
