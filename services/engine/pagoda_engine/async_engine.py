"""AsyncEngine: the asyncio side of the engine core process (engine_core.py).

``start`` spawns the engine core and waits until its model is loaded. Requests and aborts go down the
pipe as commands, written by a sender thread; a reader thread takes each step's outputs off the pipe
and hands them, in one batch per step (``loop.call_soon_threadsafe``), to per-request asyncio queues.
A consumer slower than the engine finds several steps' tokens waiting and sends them as one message.
The event loop never waits on the engine: a long prompt's command can fill the pipe while the core is
busy with a step, and only the sender thread waits for it.
"""

from __future__ import annotations

import asyncio
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

logger = logging.getLogger(__name__)

# How long ``stop`` waits for the engine core to exit before killing it.
_STOP_GRACE_S = 30.0


class QueueFullError(RuntimeError):
    """Too many requests are waiting (gRPC RESOURCE_EXHAUSTED)."""


class EngineDeadError(RuntimeError):
    """The engine core failed or exited; no request can be served (gRPC UNAVAILABLE / INTERNAL)."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, max_waiting_requests: int = 1024):
        self.config = config
        self.max_waiting_requests = max_waiting_requests
        self._streams: dict[str, asyncio.Queue] = {}
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
        if not self._streams:  # the core may have idled for long: its next step is due from now
            self._last_progress = self._loop.time()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._send(Add(request_id, prompt_token_ids, params))
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
                yield batch
        finally:
            del self._streams[request_id]
            if unfinished and self._error is None:
                self._send(Abort(request_id))

    def abort(self, request_id: str) -> bool:
        """Abort a request by id (the Abort RPC); False when no such request is active."""
        if request_id not in self._streams:
            return False
        self._send(Abort(request_id))
        return True

    def _admit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if self._error is not None or self._reader is None:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if self.load.waiting >= self.max_waiting_requests:
            raise QueueFullError(f"{self.load.waiting} requests are already waiting; try again later")
        self.limits.check(prompt_token_ids, params)

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
        """Declare the engine stuck when it has requests but reports no step for ``timeout`` seconds."""
        while self._error is None:
            await asyncio.sleep(min(1.0, timeout / 4))
            stalled = self._loop.time() - self._last_progress
            if self._streams and stalled > timeout and self._error is None:
                reason = f"the engine finished no step in {stalled:.1f} s while serving {len(self._streams)} requests"
                logger.error("%s: stopping it", reason)
                self._error = EngineDeadError(reason)
                self._process.kill()  # a stuck core may hold the GPU; nothing it does now would be delivered
                self._fail_all(self._error)

    def _deliver(self, outputs: Outputs) -> None:
        """Hand each output (or a (request id, error) pair) to its request's stream."""
        self._last_progress = self._loop.time()
        self.load = outputs.load
        for out in outputs.items:
            request_id, item = out if isinstance(out, tuple) else (out.request_id, out)
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(item)

    def _fail_all(self, error: BaseException) -> None:
        self.failed.set()
        for stream in self._streams.values():
            stream.put_nowait(error)
