"""Several worker processes serving one port (``--workers N``), like vLLM's ``--api-server-count``.

One asyncio process spends most of its CPU in grpcio's per-message work, one message in from the engine and
one out to the client per token, and saturates below what an engine streams. Each worker runs ``serve()``
with its own engine pool, health and reflection, and binds the same host:port with SO_REUSEPORT, so the
kernel spreads client connections over the workers.

The supervisor only starts the workers, forwards SIGTERM/SIGINT to them once (they drain as a single
process does) and fails fast: when a worker exits unexpectedly it stops the others and exits 1, for compose
or Kubernetes to restart the whole set. Each worker holds the read end of a pipe from the supervisor and
shuts down when it closes, so no worker outlives a killed supervisor. With metrics on, the supervisor also
serves /metrics, summed over the files the workers write (pagoda_tokenizer.metrics says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from pagoda_tokenizer.config import TokenizerConfig
from pagoda_tokenizer.metrics import WorkerMetrics
from pagoda_tokenizer.server import listen_address, metrics_url, serve

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def supervise(config: TokenizerConfig) -> int:
    """Run config.workers workers on config.host:config.port until they stop; returns the exit code."""
    return _Supervisor(config).run()


class _Supervisor:
    def __init__(self, config: TokenizerConfig):
        self._config = config
        self._workers: list[BaseProcess] = []
        # The supervisor's ends of the workers' pipes, never written: they close when it dies, however.
        self._lifelines: list[Connection] = []
        self._stopping = False
        self._failed = False
        self._metrics: WorkerMetrics | None = None

    def run(self) -> int:
        if not self._port_is_free():
            return 1
        if self._config.metrics_port:
            try:  # before the workers start: they inherit the metrics directory it names in the environment
                self._metrics = WorkerMetrics(self._config.host, self._config.metrics_port)
            except OSError as error:
                logger.error("cannot listen on %s (metrics): %s", metrics_url(self._config), error)
                return 1
        try:
            return self._supervise()
        finally:
            if self._metrics is not None:
                self._metrics.close()

    def _supervise(self) -> int:
        self._start_workers()
        # Installed only now: a signal before this kills the supervisor, and its closed pipes stop the workers.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        running = {process.sentinel: process for process in self._workers}
        while running:
            for sentinel in wait(list(running)):
                self._reap(running.pop(sentinel))
        return 1 if self._failed else 0

    def _port_is_free(self) -> bool:
        """Whether nothing listens on host:port yet. The workers bind it with SO_REUSEPORT, which would also
        let them join another service already there and silently share its connections."""
        host, port = self._config.host, self._config.port
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.bind((host, port))
        except OSError as error:
            logger.error("cannot listen on %s: %s", listen_address(host, port), error)
            return False
        return True

    def _start_workers(self) -> None:
        context = multiprocessing.get_context("spawn")
        for index in range(self._config.workers):
            worker_end, supervisor_end = context.Pipe(duplex=False)
            process = context.Process(target=run_worker, args=(self._config, index, worker_end),
                                      name=f"worker {index}")
            process.start()
            worker_end.close()
            self._workers.append(process)
            self._lifelines.append(supervisor_end)
            logger.info("worker %d started (pid %d)", index, process.pid)
        logger.info("%d workers serve %s:%d", self._config.workers, self._config.host, self._config.port)
        if self._metrics is not None:
            logger.info("metrics of every worker on %s", metrics_url(self._config))

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self._stopping:  # forwarded once: a second Ctrl-C does not cut the drain short
            logger.info("%s: stopping the workers", signal.Signals(signum).name)
            self._stop()

    def _reap(self, process: BaseProcess) -> None:
        process.join()
        if self._metrics is not None:
            self._metrics.process_dead(process.pid)
        if not self._stopping:
            logger.error("%s (pid %d) exited with code %s; stopping the others", process.name, process.pid,
                         process.exitcode)
            self._failed = True
            self._stop()
        elif process.exitcode not in (0, -signal.SIGTERM):  # -SIGTERM: still starting, so not yet draining
            logger.error("%s (pid %d) exited with code %s", process.name, process.pid, process.exitcode)
            self._failed = True

    def _stop(self) -> None:
        self._stopping = True
        for process in self._workers:
            if process.exitcode is None:
                process.terminate()  # SIGTERM: the worker drains for shutdown_grace_s


def run_worker(config: TokenizerConfig, index: int, supervisor: Connection) -> None:
    """A worker process's main: serve() until SIGTERM from the supervisor, or until the supervisor is gone."""
    # The supervisor owns shutdown: a Ctrl-C sent to the whole process group reaches it, and it forwards one
    # SIGTERM, rather than every process starting its own drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    threading.Thread(target=_stop_with, args=(supervisor,), name="pagoda-supervisor-watch", daemon=True).start()
    sys.exit(asyncio.run(serve(config, worker=index)))


def _stop_with(supervisor: Connection) -> None:
    """Block until the supervisor's end of the pipe closes (it never writes), then shut this worker down."""
    with contextlib.suppress(EOFError, OSError):
        supervisor.recv()
    logger.warning("the supervisor is gone; shutting down")
    os.kill(os.getpid(), signal.SIGTERM)
