"""The engine core: an LLMEngine stepping in a process of its own, driven over a pipe.

The gRPC service runs in another process (AsyncEngine is its end of the pipe), so the Python work of
writing hundreds of streams never competes with the engine's own host work for one GIL, as it did
when the engine was a thread beside the server (vLLM's EngineCore and SGLang's scheduler process are
split off for the same reason).

The pipe carries commands one way (``Add``, ``Abort``, ``Stop``) and, the other way, a ``Ready`` once
the model is loaded, then one ``Outputs`` per step (what it produced, and the load after it), and a
``Failed`` if the engine breaks. Commands are applied between steps; with nothing to step the core
blocks on the pipe.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from pagoda.v1 import engine_pb2
from pagoda_engine.config import EngineConfig
from pagoda_engine.engine import EngineLoad, LLMEngine, RequestLimits, SequenceOutput
from pagoda_engine.sampling_params import InvalidRequestError, SamplingParams
from pagoda_engine.structured_output.dfa import Dfa

logger = logging.getLogger(__name__)

# While idle the core wakes this often to notice a broken engine (a tensor-parallel worker that exited).
_IDLE_POLL_S = 0.2


@dataclass
class Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # The request's structured output, compiled by the server (None: none, or let the engine compile it).
    dfa: Dfa | None = None


@dataclass
class Abort:
    request_id: str
    indices: tuple[int, ...] = ()  # the samples to stop; empty: all of them


@dataclass
class Stop:
    pass


@dataclass
class Ready:
    model_info: bytes  # a serialised engine_pb2.ModelInfo
    limits: RequestLimits
    load: EngineLoad


@dataclass
class Outputs:
    # A SequenceOutput, or (request id, InvalidRequestError) for an Add that raced another request.
    items: list[SequenceOutput | tuple[str, InvalidRequestError]]
    load: EngineLoad


@dataclass
class Failed:
    message: str


def run_engine_core(config: EngineConfig, conn: Connection) -> None:
    """The child process's main: load the engine, then serve commands until ``Stop`` or a failure."""
    # The server owns shutdown (it drains, then sends Stop): a Ctrl-C or SIGTERM sent to the whole process
    # group must not kill the engine under the requests being drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(config)
    except Exception as error:  # noqa: BLE001 - the parent reports it and exits
        logger.exception("could not start the engine")
        conn.send(Failed(f"{type(error).__name__}: {error}"))
        return
    broken = threading.Event()
    engine.call_on_failure(broken.set)
    try:
        engine.grammars.preload()  # the first structured request must not stall every stream's steps
        conn.send(Ready(model_info(engine).SerializeToString(), engine.limits, engine.get_load()))
        _serve(engine, conn, broken)
    except Exception as error:  # noqa: BLE001 - reported to every waiting stream by the parent
        logger.exception("the engine failed")
        conn.send(Failed(f"{type(error).__name__}: {error}"))
    finally:
        engine.close()


def _serve(engine: LLMEngine, conn: Connection, broken: threading.Event) -> None:
    while True:
        # Block for commands only when there is nothing to step.
        idle = not engine.has_unfinished_requests() and not broken.is_set()
        if idle and not conn.poll(_IDLE_POLL_S):
            continue
        items, running = _apply_commands(engine, conn)
        if not running:
            with contextlib.suppress(OSError):  # the pipe is closed when the server was killed
                conn.send(Outputs(items, engine.get_load()))
            return
        items += engine.step()  # raises if the engine broke
        # Every step that ran is reported, outputs or not (a prefill chunk has none): the server's
        # watchdog counts these messages as progress.
        conn.send(Outputs(items, engine.get_load()))


def _apply_commands(engine: LLMEngine, conn: Connection) -> tuple[list, bool]:
    """Apply every command waiting on the pipe; the outputs they caused, and False after ``Stop``."""
    items: list[SequenceOutput | tuple[str, InvalidRequestError]] = []
    while conn.poll():
        try:
            command = conn.recv()
        except EOFError:  # the server is gone (killed): nobody will read what this engine makes
            command = Stop()
        if isinstance(command, Stop):
            for request_id in list(engine.requests):
                items += engine.abort_request(request_id)
            return items, False
        if isinstance(command, Add):
            try:
                engine.add_request(command.request_id, command.prompt_token_ids, command.params, dfa=command.dfa)
            except InvalidRequestError as error:  # raced with another request, or no vocabulary to mask with
                items.append((command.request_id, error))
        elif isinstance(command, Abort):
            items += engine.abort_request(command.request_id, command.indices)
    return items, True


def model_info(engine: LLMEngine) -> engine_pb2.ModelInfo:
    """What the engine serves, with its settled limits (engine.resolve_limits), not the flags as given."""
    config, model = engine.config, engine.model_config
    num_blocks = engine.block_manager.num_blocks
    return engine_pb2.ModelInfo(
        model_name=Path(config.model).name,
        model_path="dummy" if config.load_format == "dummy" else str(Path(config.model).resolve()),
        architecture=model.architecture,
        max_model_len=engine.max_model_len,
        vocab_size=model.vocab_size,
        eos_token_ids=model.eos_token_ids,
        bos_token_id=model.bos_token_id,
        block_size=config.block_size,
        num_kv_blocks=num_blocks,
        kv_capacity_tokens=num_blocks * config.block_size,
        dtype=str(engine.dtype).removeprefix("torch."),
        device=_device_name(engine.device),
        tensor_parallel_size=config.tensor_parallel_size,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_logprobs=engine.limits.max_logprobs,
        max_n=config.max_n,
        prefix_caching_enabled=config.enable_prefix_caching,
        version=_version(),
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _version() -> str:
    try:
        return importlib.metadata.version("pagoda")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree through PYTHONPATH
        return "unknown"
