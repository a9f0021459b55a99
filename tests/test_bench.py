"""The benchmarks run end to end on the CPU (tiny models, a handful of requests): their numbers mean
nothing here, but their plumbing (launching services, the text front, the JSON they write) is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tiny_model

BENCH = Path(__file__).parent.parent / "bench"
pytestmark = pytest.mark.timeout(300)


def run_bench(script: str, *args: str) -> None:
    root = BENCH.parent
    path = os.pathsep.join(str(root / p) for p in ("services/engine", "services/tokenizer", "clients/python"))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(BENCH / script), *args], check=True, env=env, timeout=280,
                   stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Qwen3 with a vocabulary that takes the workload's ids (< 10,001) and SmolLM2's (< 49,152)."""
    return make_tiny_model(tmp_path_factory.mktemp("bench-model"), "Qwen3ForCausalLM", vocab_size=49152,
                           head_dim=32, num_attention_heads=2, num_key_value_heads=1)


def test_serving_benchmark_through_the_engine_and_the_tokenizer_front(tmp_path, model, smollm2_dir):
    out = tmp_path / "serving.json"
    run_bench("serving.py", "--clients", "2", "--num-seqs", "6", "--min-len", "8", "--max-input-len", "24",
              "--max-output-len", "12", "--out", str(out), "--launch", "--front", str(smollm2_dir),
              "--front-workers", "2",
              "--", "--model", str(model), "--device", "cpu", "--num-kv-blocks", "256", "--max-model-len", "512")
    result = json.loads(out.read_text())
    front = result["front"]
    for run in (result, front):
        assert run["completed"] == 6 and not run["errors"] and run["prompt_tokens"] > 0
    # ignore_eos and the same max_tokens: both targets generate exactly the workload's tokens.
    assert front["output_tokens"] == result["output_tokens"] > 6
    assert front["front_cpu_seconds"] > 0 and front["throughput_vs_engine"] > 0
    assert result["engine_server_cpu_seconds"] > 0 and front["engine_server_cpu_seconds"] > 0


def test_offline_and_step_profile_benchmarks(tmp_path, model):
    sizes = ["--load-format", "auto", "--num-seqs", "4", "--min-len", "8", "--max-input-len", "16",
             "--max-output-len", "8"]
    run_bench("offline.py", "--model", str(model), *sizes, "--max-model-len", "512", "--latency-tokens", "8", "--out",
              str(tmp_path / "offline.json"))
    offline = json.loads((tmp_path / "offline.json").read_text())
    assert offline["throughput"]["seconds"] > 0 and offline["decode_latency"]["ms_per_token"] > 0
    run_bench("step_profile.py", "--model", str(model), *sizes, "--max-model-len", "512", "--out",
              str(tmp_path / "steps.json"))
    profile = json.loads((tmp_path / "steps.json").read_text())
    steps = profile["steps"]
    # Four prompts of 8..16 tokens fit one prefill step; every later step is a pure decode.
    assert steps["prefill"]["steps"] >= 1 and steps["decode"]["steps"] >= 7
    # The same decode steps, by batch size rounded up to a power of two: four sequences, then fewer.
    by_batch = profile["decode_by_batch"]
    assert sum(s["steps"] for s in by_batch.values()) == steps["decode"]["steps"] and "4" in by_batch
    assert set(by_batch) <= {"1", "2", "4"}
    assert all(steps["decode"][phase] > 0 for phase in ("schedule", "prepare", "forward", "wait", "step"))


def test_structured_output_benchmark(tmp_path, model, smollm2_dir):
    out = tmp_path / "structured.json"
    run_bench("structured.py", "--model", str(model), "--tokenizer", str(smollm2_dir), "--load-format", "auto",
              "--device", "cpu", "--num-seqs", "2", "--prompt-len", "8", "--max-tokens", "12", "--out", str(out))
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"free text", "regex", "regex (warm)", "json_schema", "json_schema (warm)", "json_object",
                         "json_object (warm)"}
    assert 0 < runs["free text"]["output_tokens"] <= 24 and all(r["output_tokens_per_s"] > 0 for r in runs.values())
