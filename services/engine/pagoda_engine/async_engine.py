"""AsyncEngine: an LLMEngine stepping in its own thread, fed and drained from an asyncio loop.

The event loop never waits on the GPU. Requests and aborts travel to the engine thread through one
queue and are applied between steps; each step's outputs travel back in one batch per step
(``loop.call_soon_threadsafe``) and are fanned out to per-request asyncio queues. A consumer slower
than the engine finds several steps' tokens waiting and sends them as one message.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pagoda_engine.engine import EngineLoad, LLMEngine, SequenceOutput
from pagoda_engine.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting (gRPC RESOURCE_EXHAUSTED)."""


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can be served (gRPC UNAVAILABLE / INTERNAL)."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class _Wake:
    """Step now: the engine may have broken outside a step (a tensor-parallel worker exited)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 1024):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # Set on the loop once the engine thread has failed: the service stops serving.
        self.failed = asyncio.Event()
        # Refreshed by the engine thread after every step, read by the loop (GetLoad, metrics).
        self.load: EngineLoad = engine.get_load()

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine.call_on_failure(lambda: self._commands.put(_Wake()))
        self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._commands.put(_Stop())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[list[SequenceOutput]]:
        """Yield lists of outputs (each list: whatever arrived since the last yield) until every sample ends.

        Raises InvalidRequestError, QueueFullError or EngineDeadError before the first yield. Closing
        the iterator early (client cancel, deadline) aborts the request and frees its blocks.
        """
        self._admit(request_id, prompt_token_ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(_Add(request_id, prompt_token_ids, params))
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
            if unfinished:
                self._commands.put(_Abort(request_id))

    def abort(self, request_id: str) -> bool:
        """Abort a request by id (the Abort RPC); False when no such request is active."""
        if request_id not in self._streams:
            return False
        self._commands.put(_Abort(request_id))
        return True

    def _admit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if self._error is not None or self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if self.load.waiting >= self.max_waiting_requests:
            raise QueueFullError(f"{self.load.waiting} requests are already waiting; try again later")
        self.engine.validate(request_id, prompt_token_ids, params)

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            while True:
                # Block for commands only when there is nothing to step.
                idle = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block=idle):
                    return
                outputs = self.engine.step()
                self.load = self.engine.get_load()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as error:  # noqa: BLE001 - reported to every waiting stream
            logger.exception("engine thread failed")
            self._error = error
            self._loop.call_soon_threadsafe(self._fail_all, error)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; False when asked to stop."""
        updates: list[SequenceOutput | tuple[str, InvalidRequestError]] = []
        running = True
        try:
            command = self._commands.get(block=block)
            while True:
                if isinstance(command, _Stop):
                    for request_id in list(self.engine.requests):
                        updates += self.engine.abort_request(request_id)
                    running = False
                    break
                if isinstance(command, _Add):
                    try:
                        self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
                    except InvalidRequestError as error:  # raced with another request since _admit
                        updates.append((command.request_id, error))
                elif isinstance(command, _Abort):
                    updates += self.engine.abort_request(command.request_id)
                # A _Wake needs nothing applied: the step that follows finds what broke.
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        if updates:
            self._loop.call_soon_threadsafe(self._deliver, updates)
        return running

    def _deliver(self, outputs: list) -> None:
        """Hand each output (or a (request id, error) pair) to its request's stream."""
        for out in outputs:
            request_id, item = out if isinstance(out, tuple) else (out.request_id, out)
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(item)

    def _fail_all(self, error: BaseException) -> None:
        self.failed.set()
        for stream in self._streams.values():
            stream.put_nowait(error)
