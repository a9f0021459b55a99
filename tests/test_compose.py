"""compose.yaml kept honest: every service started exactly as declared, as local processes on loopback.

Docker cannot run on the build machines, so this test does what ``docker compose -f compose.yaml -f
compose.cpu.yaml up`` would do, with the CPU variant merged in: services start in dependency order, each
waiting for its ``depends_on`` conditions (a one-shot step's success, another service's health check), with
the declared command, environment and health check, and stop on SIGTERM within their stop grace period.
Three things a container provides are translated, and nothing else:

- the network: every declared container port becomes a free loopback port (the same one for every
  service, so ``engine:50051`` in the tokenizer's environment reaches the engine's ``PAGODA_PORT``), and
  service host names and 0.0.0.0 become 127.0.0.1;
- the volumes: a mount path (``/models``) becomes a local directory, which holds the converted SmolLM2;
- the image: programs come from this virtualenv (its bin/ leads PATH), as they are on the image's PATH.

Interpolated variables (``${NAME:-default}``) take their defaults, and the environment the processes inherit
has no PAGODA_* variables, so only what compose.yaml declares configures the services. Then the Python and
TypeScript clients stream a chat through the published port.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pagoda_client import Client
from pagoda_client.demo import free_port
from pagoda_engine.config import EngineConfig
from pagoda_tokenizer.config import TokenizerConfig

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = (ROOT / "compose.yaml", ROOT / "compose.cpu.yaml")
TYPESCRIPT_DIR = ROOT / "clients" / "typescript"
VENV_BIN = Path(sys.executable).parent
# The keys this test emulates or that only matter inside Docker (build, image, deploy, restart). A new key
# fails the test until the emulation learns it, so the test cannot silently drift from the file.
KNOWN_KEYS = {"build", "image", "command", "environment", "expose", "ports", "volumes", "depends_on", "deploy",
              "healthcheck", "stop_grace_period", "restart"}
QUESTION = "What is the capital of France?"


# ---- reading compose files ----

class _Reset:
    """Compose's ``!reset`` tag: the override file removes the key."""


RESET = _Reset()


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_compose(*paths: Path) -> dict[str, Any]:
    """The files merged the way ``docker compose -f a -f b`` merges them, variables at their defaults."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = _merge(merged, yaml.load(path.read_text(), Loader=_ComposeLoader))
    return _interpolate(merged)


def _merge(base: Any, override: Any) -> Any:
    # Mappings merge key by key (environment, deploy, ...); anything else is replaced, as compose does for the
    # single-valued keys used here.
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    merged = dict(base)
    for key, value in override.items():
        if value is RESET:
            merged.pop(key, None)
        else:
            merged[key] = _merge(base.get(key), value)
    return merged


def _interpolate(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item) for item in value]
    if isinstance(value, str):
        value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
        assert "$" not in value, f"only ${{NAME:-default}} interpolation is emulated: {value!r}"
    return value


def seconds(duration: str) -> float:
    """A compose duration such as "2s", "1m30s" or "500ms"."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unreadable duration {duration!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(number) * scale[unit] for number, unit in parts)


def container_ports(service: dict[str, Any]) -> set[int]:
    published = (str(port).split(":")[-1] for port in service.get("ports", []))
    return {int(port) for port in [*published, *map(str, service.get("expose", []))]}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount path -> volume name (or host path) of the service's ``source:target[:mode]`` volumes."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])}


def dependency_order(services: dict[str, Any]) -> list[str]:
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle {path + (name,)}"
        if name not in order:
            for dependency in services[name].get("depends_on", {}):
                visit(dependency, path + (name,))
            order.append(name)

    for name in services:
        visit(name, ())
    return order


# ---- the local stand-in for docker ----

class LocalNetwork:
    """Where compose's network and volumes land on this machine (see the module docstring)."""

    def __init__(self, services: dict[str, Any], volumes: dict[str, Path]):
        self.ports = {port: free_port() for service in services.values() for port in sorted(container_ports(service))}
        self._hosts = re.compile(rf"\b({'|'.join(map(re.escape, services))}|0\.0\.0\.0)(?=:\d|$)")
        self._mounts = {target: volumes.get(source, Path(source)) for service in services.values()
                        for target, source in mounts(service).items()}

    def translate(self, text: str) -> str:
        text = self._hosts.sub("127.0.0.1", text)
        for port, local in self.ports.items():
            text = re.sub(rf"(?<![\w.]){port}(?!\d)", str(local), text)
        for target, local_dir in self._mounts.items():
            text = re.sub(rf"(?<![\w./-]){re.escape(target)}(?![\w.-])", str(local_dir), text)
        return text


@dataclasses.dataclass
class LocalService:
    name: str
    spec: dict[str, Any]
    network: LocalNetwork
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self._argv(self.spec["command"]), env=self._env(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_completed(self, timeout: float = 600) -> None:
        """``condition: service_completed_successfully``."""
        code = self.process.wait(timeout)
        assert code == 0, f"{self.name} exited with {code}:\n{self.log_text()}"

    def wait_healthy(self) -> None:
        """``condition: service_healthy``: probe as compose does. Failures during start_period do not count
        (probes come every start_interval then); after it, ``retries`` failures in a row mark it unhealthy."""
        check = self.spec["healthcheck"]
        assert check["test"][0] == "CMD", "the health check must be exec form: [CMD, program, args...]"
        argv, started, failures = self._argv(check["test"][1:]), time.monotonic(), 0
        while True:
            assert self.process.poll() is None, f"{self.name} exited with {self.process.returncode}:\n{self.log_text()}"
            starting = time.monotonic() - started < seconds(check["start_period"])
            if self._probe(argv, seconds(check["timeout"])):
                return
            failures += 0 if starting else 1
            assert failures < check["retries"], f"{self.name} unhealthy:\n{self.log_text()}"
            time.sleep(seconds(check["start_interval" if starting else "interval"]))

    def stop(self) -> int:
        """``docker compose stop``: SIGTERM, then SIGKILL after stop_grace_period (10 s unless declared)."""
        if self.process is None:  # never started: an earlier service failed
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(seconds(self.spec.get("stop_grace_period", "10s")))
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def _argv(self, command: Any) -> list[str]:
        assert isinstance(command, list), f"{self.name}: use exec-form lists for commands, not shell strings"
        return [self.network.translate(str(arg)) for arg in command]

    def _env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PAGODA_")}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        declared = self.spec.get("environment", {})
        assert isinstance(declared, dict), f"{self.name}: declare environment as a mapping"
        env.update({key: self.network.translate(str(value)) for key, value in declared.items()})
        return env

    def _probe(self, argv: list[str], timeout: float) -> bool:
        try:
            return subprocess.run(argv, env=self._env(), capture_output=True, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False


class LocalCompose:
    """``docker compose up`` of the merged files, as local processes."""

    def __init__(self, compose: dict[str, Any], volumes: dict[str, Path], log_dir: Path):
        self.specs = compose["services"]
        self.network = LocalNetwork(self.specs, volumes)
        self.services = {name: LocalService(name, self.specs[name], self.network, log_dir / f"{name}.log")
                         for name in dependency_order(self.specs)}

    def up(self) -> None:
        for service in self.services.values():
            for dependency, rule in service.spec.get("depends_on", {}).items():
                waits = {"service_completed_successfully": "wait_completed", "service_healthy": "wait_healthy"}
                getattr(self.services[dependency], waits[rule["condition"]])()
            service.start()
        for service in self.services.values():
            if "healthcheck" in service.spec:
                service.wait_healthy()

    def down(self) -> dict[str, int]:
        """Stop in reverse dependency order; returns each service's exit code."""
        return {name: self.services[name].stop() for name in reversed(self.services)}

    def published(self, service: str) -> str:
        """The loopback address of a service's (first) published port."""
        port = int(str(self.specs[service]["ports"][0]).split(":")[-1])
        return f"127.0.0.1:{self.network.ports[port]}"


# ---- the files, read ----

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(*COMPOSE_FILES)


def test_services_use_only_what_this_test_emulates(compose):
    assert set(compose["services"]) == {"model", "engine", "tokenizer"}
    for name, spec in compose["services"].items():
        assert set(spec) <= KNOWN_KEYS, f"{name}: teach tests/test_compose.py about {set(spec) - KNOWN_KEYS}"
    assert dependency_order(compose["services"]) == ["model", "engine", "tokenizer"]


def test_gpu_engine_and_its_cpu_variant():
    gpu = load_compose(COMPOSE_FILES[0])["services"]["engine"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert gpu["environment"]["PAGODA_DEVICE"] == "cuda"
    cpu = load_compose(*COMPOSE_FILES)["services"]["engine"]
    assert "deploy" not in cpu and cpu["environment"]["PAGODA_DEVICE"] == "cpu"


def test_every_pagoda_variable_is_a_config_field(compose):
    """A misspelt variable would be ignored by the service; here it fails."""
    fields = {"engine": EngineConfig, "tokenizer": TokenizerConfig}
    for name, config in fields.items():
        known = {"PAGODA_" + field.name.upper() for field in dataclasses.fields(config)}
        declared = set(compose["services"][name]["environment"])
        assert declared <= known, f"{name}: {declared - known} are not fields of {config.__name__}"


def test_readme_configuration_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    for config in (EngineConfig, TokenizerConfig):
        missing = [f.name for f in dataclasses.fields(config) if f"| `PAGODA_{f.name.upper()}` |" not in readme]
        assert not missing, f"README.md, Configuration: add {config.__name__} fields {missing}"


def test_services_depend_on_the_model_step_and_the_engine_health(compose):
    services = compose["services"]
    assert services["engine"]["depends_on"] == {"model": {"condition": "service_completed_successfully"}}
    assert services["tokenizer"]["depends_on"] == {"engine": {"condition": "service_healthy"}}
    assert "ports" not in services["engine"], "the engine is internal; the tokenizer service is the front door"
    for name in ("model", "engine", "tokenizer"):
        assert "/models" in mounts(services[name])


@pytest.mark.parametrize("dockerfile, base, extra", [
    ("services/engine/Dockerfile", r"pytorch/pytorch:[\w.]+-cuda[\w.-]+-runtime", ".[engine,convert]"),
    ("services/tokenizer/Dockerfile", r"python:3\.12-slim", ".[tokenizer]"),
])
def test_dockerfiles(dockerfile, base, extra):
    text = (ROOT / dockerfile).read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert re.search(rf"^(ARG BASE_IMAGE=|FROM ){base}$", text, re.M), f"{dockerfile}: base image"
    assert [arg for op, arg in instructions if op == "USER"] == ["pagoda"], "run as the non-root user"
    # compose's `command` must be the whole argv, as this test runs it.
    assert "ENTRYPOINT" not in {op for op, _ in instructions}
    assert f'"{extra}"' in text
    if "tokenizer" in dockerfile:
        assert not re.search(r"pip install .*(torch|engine)", text), "no torch in the tokenizer image"


def test_dockerignore_keeps_local_state_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"**/.venv", ".git", "**/node_modules", "tests"} <= ignored


# ---- the stack, running ----

@pytest.fixture(scope="module")
def stack(compose, smollm2_dir, tmp_path_factory) -> Iterator[LocalCompose]:
    # The `models` volume: a directory holding the converted model under the name compose.yaml expects, so
    # the model step finds it there (a fresh volume would be filled by pagoda-fetch-model, as .ci/run does).
    volume = tmp_path_factory.mktemp("models-volume")
    (volume / "SmolLM2-135M-Instruct").symlink_to(smollm2_dir.resolve(), target_is_directory=True)
    local = LocalCompose(compose, {"models": volume}, tmp_path_factory.mktemp("compose-logs"))
    try:
        local.up()
        yield local
    finally:
        local.down()


@pytest.fixture(scope="module")
def python_answer(stack) -> str:
    with Client(stack.published("tokenizer")) as client:
        return client.chat([{"role": "user", "content": QUESTION}], temperature=0.0, max_tokens=128).read()


def test_python_client_streams_a_chat(stack, python_answer):
    assert "Paris" in python_answer
    with Client(stack.published("tokenizer")) as client:
        info = client.model_info()
    assert info.model.device == "cpu" and info.model.model_name == "SmolLM2-135M-Instruct"
    assert info.num_healthy_engines == 1


@pytest.mark.parametrize("service", ["engine", "tokenizer"])
def test_services_serve_metrics_on_their_declared_ports(stack, python_answer, service):
    declared = int(stack.specs[service]["environment"]["PAGODA_METRICS_PORT"])
    assert declared in container_ports(stack.specs[service]), "expose the metrics port, as Prometheus scrapes it"
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.network.ports[declared]}/metrics", timeout=10) as response:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(response.read().decode()) for s in family.samples}
    assert samples[(f"pagoda_{service}_generation_tokens_total", ())] > 0  # the chat's answer
    if service == "tokenizer":  # the supervisor's sum over the workers, one of which took the chat
        assert samples[("pagoda_tokenizer_requests_received_total", (("method", "Chat"),))] >= 1


@pytest.fixture(scope="session")
def typescript_build() -> Path:
    """clients/typescript installed (npm ci, from the lock) and compiled."""
    npm = shutil.which("npm")
    if npm is None:
        if os.environ.get("CI"):
            pytest.fail("npm is needed for the TypeScript client's test")
        pytest.skip("npm is not installed")
    if not (TYPESCRIPT_DIR / "node_modules").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=TYPESCRIPT_DIR, check=True, timeout=240)
    subprocess.run([npm, "run", "build"], cwd=TYPESCRIPT_DIR, check=True, timeout=120)
    return TYPESCRIPT_DIR / "dist"


def test_typescript_client_tests_pass(stack, typescript_build):
    env = {**os.environ, "PAGODA_TARGET": stack.published("tokenizer")}
    result = subprocess.run(["node", "--test", str(typescript_build / "test")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^# pass [1-9]", result.stdout, re.M) and re.search(r"^# skipped 0$", result.stdout, re.M)


def test_typescript_example_streams_the_same_greedy_chat(stack, typescript_build, python_answer):
    env = {**os.environ, "PAGODA_TARGET": stack.published("tokenizer")}
    result = subprocess.run(["node", str(typescript_build / "examples" / "chat.js"), QUESTION], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == python_answer + "\n"


def test_services_stop_cleanly_within_their_grace_period(stack):
    """Last: ``docker compose down``. Exit code 0 means each drained instead of being killed."""
    assert stack.down() == {"tokenizer": 0, "engine": 0, "model": 0}
