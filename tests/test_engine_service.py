"""The engine's gRPC service end to end: `python -m pagoda_engine` in a subprocess on a loopback port,
driven through the generated stubs. One server serves most tests; the waiting cap, the step watchdog and
the start/drain lifecycle each get their own."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from pagoda.v1 import engine_pb2 as pb
from pagoda.v1 import engine_pb2_grpc
from pagoda_engine import SamplingParams
from pagoda_engine.__main__ import parse_config
from pagoda_engine.config import EngineConfig
from pagoda_engine.server import to_sampling_params
from tests.test_engine import make_llm, prompts_of

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Reconnect fast while the server process is still starting, instead of gRPC's 1 s first backoff.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
                   ("grpc.max_reconnect_backoff_ms", 50)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m pagoda_engine` process on free loopback ports, with stubs to reach it."""

    def __init__(self, model_dir: Path, *flags: str, start_new_session: bool = False):
        self.port, self.metrics_port = free_port(), free_port()
        command = [sys.executable, "-m", "pagoda_engine", "--model", str(model_dir), "--device", "cpu",
                   "--dtype", "float32", "--port", str(self.port), "--metrics-port", str(self.metrics_port), *flags]
        # One torch thread: the server shares two cores with this process, and tiny ops gain nothing from more.
        self.process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                        start_new_session=start_new_session)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)
        self.stub = engine_pb2_grpc.EngineStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def health_statuses_until_serving(self, timeout: float = 45) -> list[int]:
        """Watch health from the first moment the port answers; the statuses seen up to SERVING."""
        statuses = []
        watch = self.health.Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=timeout)
        for response in watch:
            statuses.append(response.status)
            if response.status == SERVING:
                watch.cancel()
                return statuses
        raise AssertionError(f"health never turned SERVING: {statuses}")

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def load(self) -> pb.Load:
        return self.stub.GetLoad(pb.GetLoadRequest(), timeout=5)

    def wait_idle(self, timeout: float = 10) -> None:
        """Every request gone and every KV block free again."""
        deadline = time.monotonic() + timeout
        while True:
            load = self.load()
            if load.num_running == load.num_waiting == load.kv_blocks_used == 0:
                return
            assert time.monotonic() < deadline, f"the engine did not go idle: {load}"
            time.sleep(0.01)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@dataclass
class Sample:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    # Per message of the sample, in order: how many prompt_logprobs entries it carried.
    prompt_logprobs_per_message: list[int] = field(default_factory=list)
    prompt_logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    stop_token_id: int | None = None
    usage: pb.Usage | None = None
    request_ids: set[str] = field(default_factory=set)


def collect(responses) -> dict[int, Sample]:
    """Fold a Generate stream into its samples, checking that nothing follows a sample's last message."""
    samples: dict[int, Sample] = {}
    for message in responses:
        sample = samples.setdefault(message.index, Sample())
        assert sample.finish_reason == pb.FINISH_REASON_UNSPECIFIED, "a message after the sample's last"
        sample.tokens += message.token_ids
        sample.logprobs += message.logprobs
        sample.prompt_logprobs_per_message.append(len(message.prompt_logprobs))
        sample.prompt_logprobs += message.prompt_logprobs
        sample.request_ids.add(message.request_id)
        if message.finish_reason:
            sample.finish_reason = message.finish_reason
            sample.stop_token_id = message.stop_token_id if message.HasField("stop_token_id") else None
            sample.usage = message.usage
        else:
            assert not message.HasField("usage")
    return samples


def request(prompt: list[int], request_id: str = "", **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                              sampling_params=pb.SamplingParams(**params))


def greedy(prompt: list[int], max_tokens: int, request_id: str = "", **params) -> pb.GenerateRequest:
    return request(prompt, request_id, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)


def assert_prompt_logprobs(prompt: list[int], got: list, expected: list) -> None:
    """The service's prompt logprobs (one per prompt token from the second on) against the offline API's."""
    for token, entry, (want_logprob, want_top) in zip(prompt[1:], got, expected, strict=True):
        assert entry.sampled.token_id == token and entry.sampled.logprob == pytest.approx(want_logprob, abs=1e-4)
        assert [t.logprob for t in entry.top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def server(model_dir):
    server = Server(model_dir, "--block-size", "4", "--num-kv-blocks", "256")
    server.health_statuses_until_serving()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def offline(model_dir):
    """The offline API on the same model and cache layout, for token-for-token comparisons."""
    return make_llm(model_dir)


# ---- in-process pieces ----


def test_unset_proto_params_take_the_documented_defaults():
    params = to_sampling_params(pb.SamplingParams(), prompt_len=10, max_model_len=512)
    assert params == SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_tokens=502, n=1,
                                    seed=None, logprobs=None, prompt_logprobs=None)
    explicit = to_sampling_params(pb.SamplingParams(temperature=0, seed=0, logprobs=0, max_tokens=3, n=2,
                                                    prompt_logprobs=0), 10, 512)
    assert (explicit.temperature, explicit.seed, explicit.logprobs, explicit.max_tokens, explicit.n) == (0, 0, 0, 3, 2)
    assert explicit.prompt_logprobs == 0


def test_logit_bias_and_allowed_token_ids_travel_as_given():
    wire = pb.SamplingParams(logit_bias={7: -100.0, 9: 0.5}, allowed_token_ids=[9, 7, 11])
    params = to_sampling_params(wire, prompt_len=10, max_model_len=512)
    assert params.logit_bias == {7: -100.0, 9: 0.5} and params.allowed_token_ids == [9, 7, 11]
    assert type(params.logit_bias) is dict and type(params.allowed_token_ids) is list  # plain: they are pickled


def test_flags_and_environment_map_onto_engine_config(capsys):
    env = {"PAGODA_MAX_NUM_SEQS": "7", "PAGODA_ENFORCE_EAGER": "yes", "PAGODA_MAX_MODEL_LEN": "none",
           "PAGODA_MODEL": "from-env", "PAGODA_PORT": "6000"}
    config = parse_config(["--no-enable-prefix-caching", "--port", "7000", "--drain-grace-seconds", "1.5"], env)
    assert (config.model, config.max_num_seqs, config.enforce_eager) == ("from-env", 7, True)
    assert config.max_model_len is None
    assert (config.enable_prefix_caching, config.port, config.drain_grace_seconds) == (False, 7000, 1.5)
    with pytest.raises(SystemExit):
        parse_config(["--model", "m"], {"PAGODA_MAX_NUM_SEQS": "many"})
    assert "PAGODA_MAX_NUM_SEQS='many'" in capsys.readouterr().err  # the variable, not the flag it feeds
    with pytest.raises(SystemExit):
        parse_config([], {})  # --model is required


def test_max_n_past_the_waiting_cap_is_refused_at_start():
    """n samples wait as n sequences: with max_n above the cap, such a request got "try again later"."""
    with pytest.raises(ValueError, match=r"max_n \(16\) must be <= max_waiting_requests \(8\)"):
        EngineConfig(model="m", max_waiting_requests=8)


# ---- the shared server ----


def test_health_reflection_and_model_info(server):
    assert server.health_status() == SERVING
    assert server.health_status("pagoda.v1.Engine") == SERVING
    services = ProtoReflectionDescriptorDatabase(server.channel).get_services()
    assert {"pagoda.v1.Engine", "grpc.health.v1.Health"} <= set(services)
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.architecture, info.vocab_size, list(info.eos_token_ids), info.bos_token_id) == (
        "LlamaForCausalLM", 256, [2], 1)
    assert (info.block_size, info.num_kv_blocks, info.kv_capacity_tokens) == (4, 256, 1024)
    assert (info.max_model_len, info.dtype, info.device, info.max_n, info.max_logprobs) == (512, "float32", "cpu",
                                                                                           16, 20)
    assert info.prefix_caching_enabled and info.version


def test_a_stream_equals_the_offline_api(server, offline):
    prompt = prompts_of([21], seed=1)[0]
    expected = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    samples = collect(server.stub.Generate(greedy(prompt, 24, request_id="parity")))
    sample = samples[0]
    assert list(samples) == [0] and sample.request_ids == {"parity"}
    assert sample.tokens == expected.outputs[0].token_ids
    assert sample.finish_reason == pb.FINISH_REASON_LENGTH and sample.stop_token_id is None
    assert (sample.usage.prompt_tokens, sample.usage.completion_tokens) == (21, 24)


def test_an_empty_request_id_is_assigned_and_echoed(server):
    sample = collect(server.stub.Generate(greedy([5, 6, 7], 3)))[0]
    (assigned,) = sample.request_ids
    assert assigned


def test_32_concurrent_streams_complete_and_load_returns_to_zero(server, offline):
    prompts = prompts_of([3 + 2 * i for i in range(32)], seed=2)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i % 5, ignore_eos=True) for i in range(32)]
    expected = [out.outputs[0].token_ids for out in offline.generate(prompts, params)]

    def run(i: int) -> list[int]:
        return collect(server.stub.Generate(greedy(prompts[i], params[i].max_tokens, request_id=f"c{i}")))[0].tokens

    with ThreadPoolExecutor(32) as pool:
        assert list(pool.map(run, range(32))) == expected
    server.wait_idle()


def test_client_cancel_frees_every_block(server):
    call = server.stub.Generate(greedy(prompts_of([40], seed=3)[0], 450))
    next(call), next(call)
    assert server.load().kv_blocks_used > 0
    call.cancel()
    server.wait_idle()


def test_deadline_expiry_frees_every_block(server):
    with pytest.raises(grpc.RpcError) as error:
        # 450 tokens take the tiny model well over a second on two cores: the deadline comes first.
        collect(server.stub.Generate(greedy(prompts_of([40], seed=4)[0], 450), timeout=0.15))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_idle()


def test_abort_ends_the_stream_and_frees_every_block(server):
    call = server.stub.Generate(greedy([9, 8, 7, 6], 450, request_id="to-abort"))
    first = next(call)
    assert server.stub.Abort(pb.AbortRequest(request_id="to-abort")).found
    sample = collect(call)[0]
    assert sample.finish_reason == pb.FINISH_REASON_ABORT
    assert sample.usage.completion_tokens >= len(first.token_ids) + len(sample.tokens)
    assert not server.stub.Abort(pb.AbortRequest(request_id="to-abort")).found
    server.wait_idle()


INVALID = {
    "temperature NaN": (request([5, 6], temperature=math.nan), "temperature"),
    "temperature < 0": (request([5, 6], temperature=-0.5), "temperature"),
    "top_p 0": (request([5, 6], top_p=0.0), "top_p"),
    "top_p > 1": (request([5, 6], top_p=1.5), "top_p"),
    "top_k < -1": (request([5, 6], top_k=-2), "top_k"),
    "min_p < 0": (request([5, 6], min_p=-0.1), "min_p"),
    "min_p > 1": (request([5, 6], min_p=1.5), "min_p"),
    "n above max_n": (request([5, 6], n=17), "n must"),
    "logprobs above the cap": (request([5, 6], logprobs=21), "logprobs"),
    "prompt_logprobs above the cap": (request([5, 6], prompt_logprobs=21), "prompt_logprobs must be in [0, 20]"),
    "max_tokens 0": (request([5, 6], max_tokens=0), "max_tokens"),
    "empty prompt": (request([]), "empty"),
    "id outside the vocabulary": (request([5, 256]), "vocabulary"),
    "prompt too long": (request([5] * 512), "max model length"),
    "prompt + max_tokens too long": (request([5] * 500, max_tokens=20), "max model length"),
    "logit_bias above 100": (request([5, 6], logit_bias={7: 100.5}), "logit_bias values must be in [-100, 100]"),
    "logit_bias NaN": (request([5, 6], logit_bias={7: math.nan}), "got nan for token 7"),
    "logit_bias inf": (request([5, 6], logit_bias={7: math.inf}), "got inf for token 7"),
    "logit_bias id outside the vocabulary": (request([5, 6], logit_bias={256: 1.0}), "logit_bias token id 256"),
    "logit_bias of 1025 entries": (request([5, 6], logit_bias=dict.fromkeys(range(1025), 1.0)),
                                   "at most 1024 logit_bias entries are accepted, got 1025"),
    "allowed id outside the vocabulary": (request([5, 6], allowed_token_ids=[3, 256]), "allowed_token_ids id 256"),
    # Refused on the wire message, before the server converts millions of entries on its event loop.
    "allowed_token_ids of a million": (request([5, 6], allowed_token_ids=[3] * 1_000_000),
                                       "at most 1024 allowed_token_ids entries are accepted, got 1000000"),
    "allowed ids all stop ids under min_tokens": (request([5, 6], allowed_token_ids=[2], min_tokens=1),
                                                  "would ban every token"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_requests_get_invalid_argument_and_the_server_keeps_serving(server, case):
    bad, words = INVALID[case]
    with pytest.raises(grpc.RpcError) as error:
        collect(server.stub.Generate(bad, timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.value.details()
    assert collect(server.stub.Generate(greedy([5, 6], 1)))[0].finish_reason == pb.FINISH_REASON_LENGTH
    server.wait_idle()  # the refusal held no block


def test_a_duplicate_request_id_is_invalid(server):
    first = server.stub.Generate(greedy([1, 2, 3], 450, request_id="twice"))
    next(first)
    with pytest.raises(grpc.RpcError) as error:
        collect(server.stub.Generate(greedy([1, 2, 3], 4, request_id="twice"), timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "twice" in error.value.details()
    first.cancel()
    server.wait_idle()


def test_a_request_id_is_free_once_its_last_message_is_read(server):
    """A client may stop reading at the last finish reason, before the stream's status: the id is free by then."""
    for _ in range(30):
        for message in server.stub.Generate(greedy([5, 6, 7], 1, request_id="next-please"), timeout=10):
            if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                break
    server.wait_idle()


def reopen(stub: engine_pb2_grpc.EngineStub, request_: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
    """Generate `request_` once its id is free: the stream that used it last may still be closing."""
    deadline = time.monotonic() + 5
    while True:
        call = stub.Generate(request_, timeout=10)
        try:
            return itertools.chain([next(call)], call)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "already in use" in error.details()
            assert time.monotonic() < deadline, "the id stayed in use"


def test_a_request_id_reused_right_after_a_cancel_gets_a_stream_of_its_own(server):
    """The cancelled request's abort comes back after its id is free again. It once reached the new stream,
    which ended ABORT while its request ran on in the engine, out of reach of Abort."""
    for trial in range(10):
        cancelled = server.stub.Generate(greedy([9, 9, 8], 400, request_id="reused"))
        next(cancelled)
        cancelled.cancel()
        sample = collect(reopen(server.stub, greedy([9, 9, 8], 5 + trial, request_id="reused")))[0]
        assert sample.finish_reason == pb.FINISH_REASON_LENGTH, f"trial {trial}"
        assert len(sample.tokens) == sample.usage.completion_tokens == 5 + trial
    server.wait_idle()


def test_logprobs_over_the_wire(server, offline):
    prompt = prompts_of([12], seed=5)[0]
    expected = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3))
    expected = expected[0].outputs[0]
    sample = collect(server.stub.Generate(greedy(prompt, 6, logprobs=3)))[0]
    assert sample.tokens == expected.token_ids and len(sample.logprobs) == 6
    for token, got, (want_logprob, want_top) in zip(sample.tokens, sample.logprobs, expected.logprobs, strict=True):
        assert got.sampled.token_id == token and got.sampled.logprob == pytest.approx(want_logprob, abs=1e-4)
        assert [t.token_id for t in got.top] == [t for t, _ in want_top]
        assert [t.logprob for t in got.top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)


def test_logit_bias_and_allowed_token_ids_over_the_wire(server, offline):
    """Greedy with a +100 bias gives the forced token throughout; sampled n > 1 with an allowlist gives the
    offline API's tokens, each in the set; every block is free afterwards."""
    prompt = prompts_of([14], seed=9)[0]
    forced = collect(server.stub.Generate(greedy(prompt, 10, logit_bias={77: 100.0})))[0]
    assert forced.tokens == [77] * 10 and forced.finish_reason == pb.FINISH_REASON_LENGTH
    allowed = [5, 50, 77, 130]
    expected = offline.generate(prompt, SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=12,
                                                       allowed_token_ids=allowed, logit_bias={5: 0.5}))
    samples = collect(server.stub.Generate(request(prompt, temperature=1.0, seed=3, n=2, max_tokens=12,
                                                   allowed_token_ids=allowed, logit_bias={5: 0.5})))
    assert [samples[i].tokens for i in range(2)] == [out.token_ids for out in expected[0].outputs]
    assert all(set(s.tokens) <= set(allowed) for s in samples.values())
    # EOS is not implied: with ignore_eos off, the allowlist still runs to max_tokens.
    assert all(s.finish_reason == pb.FINISH_REASON_LENGTH for s in samples.values())
    server.wait_idle()


def test_prompt_logprobs_over_the_wire(server, offline):
    """Once per request, on sample 0's first message: one entry per prompt token after the first, naming it.
    The prompt is scored whole even when cached (a request before this one cached it), and its KV blocks
    are all freed after."""
    prompt = prompts_of([30], seed=9)[0]
    expected = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=3))[0]
    collect(server.stub.Generate(greedy(prompt, 2)))
    samples = collect(server.stub.Generate(request(prompt, temperature=0.0, max_tokens=5, n=2, prompt_logprobs=3)))
    first, other = samples[0], samples[1]
    assert first.prompt_logprobs_per_message[0] == len(prompt) - 1 == len(expected.prompt_logprobs)
    assert sum(first.prompt_logprobs_per_message) == len(prompt) - 1  # on no later message
    assert sum(other.prompt_logprobs_per_message) == 0
    assert first.usage.cached_prompt_tokens == 0
    assert_prompt_logprobs(prompt, first.prompt_logprobs, expected.prompt_logprobs)
    server.wait_idle()


def test_n_samples_stream_with_their_index(server, offline):
    prompt = prompts_of([10], seed=6)[0]
    # temperature 1.0 and 0.5 travel exactly as float32; other values would round on the wire.
    expected = offline.generate(prompt, SamplingParams(temperature=0.5, seed=7, n=3, max_tokens=8, ignore_eos=True))
    samples = collect(server.stub.Generate(request(prompt, temperature=0.5, seed=7, n=3, max_tokens=8,
                                                   ignore_eos=True)))
    assert sorted(samples) == [0, 1, 2]
    assert [samples[i].tokens for i in range(3)] == [out.token_ids for out in expected[0].outputs]
    assert all(s.finish_reason == pb.FINISH_REASON_LENGTH and s.usage.completion_tokens == 8 for s in samples.values())


def test_stop_token_and_cached_prompt_usage(server):
    prompt = prompts_of([19], seed=8)[0]
    first = collect(server.stub.Generate(greedy(prompt, 8)))[0]
    assert first.usage.cached_prompt_tokens == 0
    # The first output position whose token has not appeared before: the stop must end the sample there.
    stop_at = next(i for i in range(1, 8) if first.tokens[i] not in first.tokens[:i])
    stop_id = first.tokens[stop_at]
    second = collect(server.stub.Generate(greedy(prompt, 8, stop_token_ids=[stop_id])))[0]
    assert second.tokens == first.tokens[: stop_at + 1]
    assert (second.finish_reason, second.stop_token_id) == (pb.FINISH_REASON_STOP, stop_id)
    assert second.usage.completion_tokens == stop_at + 1
    assert 0 < second.usage.cached_prompt_tokens < 19


def test_metrics_count_what_was_served(server):
    def delta(after: dict, before: dict, name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    before = server.metrics()
    cancelled = server.stub.Generate(greedy([3, 1, 4, 1, 5], 450))
    next(cancelled)
    cancelled.cancel()
    server.wait_idle()
    with pytest.raises(grpc.RpcError):
        collect(server.stub.Generate(request([])))
    middle = server.metrics()
    assert delta(middle, before, "pagoda_engine_requests_cancelled_total") == 1
    assert delta(middle, before, "pagoda_engine_requests_failed_total", code="INVALID_ARGUMENT") == 1

    collect(server.stub.Generate(greedy([4, 5, 6, 7, 8], 5)))
    after = server.metrics()
    assert delta(after, middle, "pagoda_engine_generation_tokens_total") == 5
    assert delta(after, middle, "pagoda_engine_prompt_tokens_total") == 5
    assert delta(after, middle, "pagoda_engine_request_samples_finished_total", finish_reason="length") == 1
    assert delta(after, middle, "pagoda_engine_time_to_first_token_seconds_count") == 1
    assert delta(after, middle, "pagoda_engine_inter_token_latency_seconds_count") == 4
    assert delta(after, middle, "pagoda_engine_e2e_request_latency_seconds_count") == 1
    assert after[("pagoda_engine_num_running", ())] == after[("pagoda_engine_num_waiting", ())] == 0
    assert after[("pagoda_engine_kv_cache_usage", ())] == 0
    assert after[("pagoda_engine_prefix_cache_queried_tokens_total", ())] > 0


# ---- servers of their own ----


def dummy_model_dir(path: Path, **sizes) -> Path:
    """A config.json for dummy weights (--load-format dummy): any size without writing a checkpoint."""
    config = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                  bos_token_id=1, eos_token_id=2, hidden_act="silu", rms_norm_eps=1e-6, torch_dtype="float32")
    (path / "config.json").write_text(json.dumps({**config, **sizes}))
    return path


def test_the_waiting_cap_answers_resource_exhausted(tmp_path):
    # A long context, so the running request cannot finish while the test fills the queue.
    server = Server(dummy_model_dir(tmp_path), "--load-format", "dummy", "--num-kv-blocks", "1024",
                    "--max-num-seqs", "1", "--max-waiting-requests", "1", "--max-n", "1")
    try:
        server.health_statuses_until_serving()
        running = server.stub.Generate(greedy([3, 4, 5], 8000))
        next(running)
        waiting = server.stub.Generate(greedy([6, 7, 8], 8000))
        deadline = time.monotonic() + 10
        while server.load().num_waiting < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as error:
            collect(server.stub.Generate(greedy([1, 2], 4), timeout=10))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        running.cancel()
        waiting.cancel()
        server.wait_idle()
    finally:
        assert server.stop() == 0


def test_prompt_logprobs_come_with_the_sample_left_when_sample_0_is_aborted(model_dir, offline):
    """Abort with indices=[0] while the request waits (one sequence runs at a time, and another request holds
    it): sample 1 scores the prompt instead and sends the entries with its first token, once."""
    server = Server(model_dir, "--block-size", "4", "--num-kv-blocks", "256", "--max-num-seqs", "1")
    try:
        server.health_statuses_until_serving()
        running = server.stub.Generate(greedy([9, 8, 7, 6], 450))
        next(running)
        prompt = prompts_of([30], seed=10)[0]
        waiting = server.stub.Generate(request(prompt, "abort-0", temperature=0.0, max_tokens=5, n=2,
                                               prompt_logprobs=3))
        deadline = time.monotonic() + 10
        while server.load().num_waiting < 2:
            assert time.monotonic() < deadline, "the request never queued"
            time.sleep(0.01)
        assert server.stub.Abort(pb.AbortRequest(request_id="abort-0", indices=[0])).found
        running.cancel()
        samples = collect(waiting)
        expected = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=3))[0]
        aborted, left = samples[0], samples[1]
        assert (aborted.finish_reason, aborted.tokens, aborted.prompt_logprobs) == (pb.FINISH_REASON_ABORT, [], [])
        assert left.finish_reason == pb.FINISH_REASON_LENGTH and left.tokens == expected.outputs[0].token_ids
        assert left.prompt_logprobs_per_message[0] == len(prompt) - 1 == sum(left.prompt_logprobs_per_message)
        assert left.usage.cached_prompt_tokens == 0
        assert_prompt_logprobs(prompt, left.prompt_logprobs, expected.prompt_logprobs)
        server.wait_idle()
    finally:
        assert server.stop() == 0


def test_a_client_that_stops_reading_does_not_trip_the_step_watchdog(model_dir):
    """The stream stays open, waiting on its client, while the engine core has finished and idles without
    step reports. The watchdog once took that for a stuck engine and stopped the service."""
    server = Server(model_dir, "--num-kv-blocks", "1024", "--engine-step-timeout-s", "1")
    # Without BDP probing the receive window stays at its initial 64 KiB, which this stream overflows.
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)])
    try:
        server.health_statuses_until_serving()
        stalled = engine_pb2_grpc.EngineStub(channel).Generate(
            request([5, 6, 7, 8], temperature=1.0, seed=1, n=16, max_tokens=100, ignore_eos=True, logprobs=20))
        first = next(stalled)
        server.wait_idle()  # the core has finished every sample
        time.sleep(3)  # three timeouts
        assert not stalled.done(), "the server got the whole stream out: the test proves nothing"
        assert server.process.poll() is None and server.health_status() == SERVING
        assert collect(server.stub.Generate(greedy([1, 2, 3], 4)))[0].finish_reason == pb.FINISH_REASON_LENGTH
        samples = collect(itertools.chain([first], stalled))
        assert sorted(samples) == list(range(16))
        assert all(s.finish_reason == pb.FINISH_REASON_LENGTH and len(s.tokens) == 100 for s in samples.values())
    finally:
        channel.close()
        assert server.stop() == 0


def test_start_serve_and_drain_on_sigterm(tmp_path):
    # Big enough that loading takes a visible while on the CPU (health is seen NOT_SERVING) and a step tens
    # of milliseconds (a 4000-token request outlasts the grace period).
    model_dir = dummy_model_dir(tmp_path, hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
                                num_attention_heads=8, num_key_value_heads=4)
    server = Server(model_dir, "--load-format", "dummy", "--num-kv-blocks", "1024", "--drain-grace-seconds", "3")
    try:
        statuses = server.health_statuses_until_serving()
        assert statuses[0] == NOT_SERVING and statuses[-1] == SERVING
        short = server.stub.Generate(greedy([5] * 8, 12))
        endless = server.stub.Generate(greedy([6] * 8, 4000))
        short_first, endless_first = next(short), next(endless)
        server.process.send_signal(signal.SIGTERM)
        # Draining: health turns NOT_SERVING, new work is refused, in-flight work goes on.
        deadline = time.monotonic() + 5
        while server.health_status() != NOT_SERVING:
            assert time.monotonic() < deadline, "health stayed SERVING after SIGTERM"
            time.sleep(0.01)
        assert server.health_status("pagoda.v1.Engine") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as error:
            collect(server.stub.Generate(greedy([1, 2], 2), timeout=5))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        finished = collect(short)[0]
        assert finished.finish_reason == pb.FINISH_REASON_LENGTH
        assert len(short_first.token_ids) + len(finished.tokens) == 12
        # The grace period runs out long before 4000 tokens: the rest is aborted, and its stream ends
        # UNAVAILABLE (retryable), not as an answer that finished; then the process exits 0.
        received = list(endless_first.token_ids)
        with pytest.raises(grpc.RpcError) as error:
            for message in endless:
                received += message.token_ids
                assert message.finish_reason == pb.FINISH_REASON_UNSPECIFIED
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "shut down" in error.value.details()
        assert 0 < len(received) < 4000
        assert server.process.wait(timeout=15) == 0
    finally:
        server.stop()


def test_a_stop_while_loading_does_not_wait_for_the_load(tmp_path):
    """SIGTERM before the model is loaded stops the server at once (exit 0, its engine core gone), instead of
    loading, warming up and announcing SERVING first."""
    # A second or more of loading on the CPU (the core imports torch, then fills 250M dummy weights).
    model_dir = dummy_model_dir(tmp_path, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                                num_attention_heads=8, num_key_value_heads=4)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pagoda_engine", "--model", str(model_dir), "--device", "cpu",
                                "--dtype", "float32", "--load-format", "dummy", "--num-kv-blocks", "64",
                                "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=30).status
        assert status == NOT_SERVING
        core = [p for p in psutil.Process(process.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=30)
        assert process.returncode == 0, log[-2000:]
        assert "stopping before the engine finished loading" in log and "serving pagoda.v1.Engine" not in log
        psutil.wait_procs(core, timeout=10)
        assert not any(p.is_running() for p in core)
    finally:
        if process.poll() is None:
            process.kill()


def test_the_engine_core_process_ends_with_its_server(tmp_path):
    """The engine runs in a child process; a server killed outright must not leave it behind."""
    server = Server(dummy_model_dir(tmp_path), "--load-format", "dummy", "--num-kv-blocks", "1024")
    try:
        server.health_statuses_until_serving()
        # Besides the core, multiprocessing starts a resource tracker of its own.
        (core,) = [p for p in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        busy = server.stub.Generate(greedy([3, 4, 5], 8000))
        next(busy)
        server.process.kill()
        core.wait(timeout=10)  # psutil.TimeoutExpired if it outlives its server
    finally:
        server.stop()


def test_a_signal_to_the_whole_process_group_still_drains(tmp_path):
    """Ctrl-C reaches every process of the group: the engine core ignores it and the server drains."""
    server = Server(dummy_model_dir(tmp_path), "--load-format", "dummy", "--num-kv-blocks", "1024",
                    start_new_session=True)
    try:
        server.health_statuses_until_serving()
        short = server.stub.Generate(greedy([5] * 8, 40))
        next(short)
        os.killpg(server.process.pid, signal.SIGINT)
        assert collect(short)[0].finish_reason == pb.FINISH_REASON_LENGTH
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
