"""``python -m pagoda_client.demo`` (``make demo``): Pagoda end to end on one machine, no GPU needed.

Fetches and converts the default model (SmolLM2-135M-Instruct) unless ``--model`` names a directory,
starts an engine on the CPU and the tokenizer service in front of it on free loopback ports, streams
a chat answer through the Python client, and stops both services. Service logs go to a temporary
directory, printed when something fails.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pagoda_client.client import Client
from pagoda_client.errors import UnavailableError

DEFAULT_QUESTION = "Explain in two sentences why the sky is blue."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """One service as a child process, its output in a log file."""

    def __init__(self, name: str, args: Sequence[str], log: Path):
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; its log ({self.log}):\n"
                               f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the services drain on it), then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def local_services(model_dir: Path, log_dir: Path, engine_args: Sequence[str] = (),
                   timeout: float = 300.0) -> Iterator[str]:
    """Run an engine on the CPU and a tokenizer service for ``model_dir`` on loopback; yields the
    tokenizer service's address once it serves, and stops both on exit."""
    engine_port, tokenizer_port = free_port(), free_port()
    services = []
    try:
        services.append(ServiceProcess("engine", [
            "pagoda_engine", "--model", str(model_dir), "--device", "cpu", "--port", str(engine_port), *engine_args,
        ], log_dir / "engine.log"))
        services.append(ServiceProcess("tokenizer", [
            "pagoda_tokenizer", "--model", str(model_dir), "--engines", f"127.0.0.1:{engine_port}",
            "--host", "127.0.0.1", "--port", str(tokenizer_port),
        ], log_dir / "tokenizer.log"))
        target = f"127.0.0.1:{tokenizer_port}"
        _wait_serving(target, services, timeout)
        yield target
    finally:
        for service in reversed(services):  # the front door first, so nothing new reaches the engine
            service.stop()


def _wait_serving(target: str, services: list[ServiceProcess], timeout: float) -> None:
    """The tokenizer service reports SERVING only once its engine does, so one health check covers both."""
    deadline = time.monotonic() + timeout
    with Client(target) as client:
        while time.monotonic() < deadline:
            for service in services:
                service.check_alive()
            try:
                client.wait_until_serving(timeout=1.0)
                return
            except UnavailableError:
                continue
    logs = "\n".join(f"--- {s.name} ({s.log}):\n{s.log_tail()}" for s in services)
    raise TimeoutError(f"the services were not serving after {timeout:g} s\n{logs}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagoda_client.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION, help="what to ask (default: %(default)r)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a Hugging Face model directory (default: fetch and convert SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args(argv)

    model_dir = args.model or _fetch_default_model()
    _say(f"model: {model_dir}")
    _say("starting an engine (CPU) and the tokenizer service on loopback ...")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pagoda-demo-") as logs, local_services(model_dir, Path(logs)) as target:
        _say(f"serving on {target} after {time.monotonic() - started:.1f} s")
        _chat(target, args.question, args.max_tokens)
        _say("stopping the services ...")
    _say("done")
    return 0


def _fetch_default_model() -> Path:
    # Imported here: the converter needs the `convert` extra, which a client-only install lacks.
    from pagoda_client.fetch_model import fetch_model

    return fetch_model()


def _chat(target: str, question: str, max_tokens: int) -> None:
    print(f"> {question}", flush=True)
    started = time.monotonic()
    with Client(target) as client, client.chat([{"role": "user", "content": question}], max_tokens=max_tokens,
                                               temperature=0.0) as stream:
        for delta in stream:
            print(delta, end="", flush=True)
    print(flush=True)
    seconds = time.monotonic() - started
    _say(f"[{stream.usage.completion_tokens} tokens in {seconds:.1f} s, finish reason: {stream.finish_reason}]")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
