"""The tokenizer service end to end: `python -m pagoda_tokenizer` in front of real `python -m pagoda_engine`
processes on loopback ports, driven through the generated stubs.

A tiny random Llama (with a small byte-level BPE, so its output is a torture test of UTF-8 handling) serves
the routing, streaming and validation tests behind two engines; SmolLM2-135M-Instruct behind one engine
checks that a real chat comes back coherent. The engine-killing test runs last in its group.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pagoda.v1 import engine_pb2 as epb
from pagoda.v1 import engine_pb2_grpc, tokenizer_pb2_grpc
from pagoda.v1 import tokenizer_pb2 as tpb
from tests.conftest import make_tiny_model
from tests.tokenizer_helpers import CHATML_TEMPLATE, byte_level_tokenizer_json, write_tokenizer_dir

pytestmark = pytest.mark.timeout(90)

SERVING = health_pb2.HealthCheckResponse.SERVING
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 100)]
TINY_VOCAB = 400
# Template code reading chat_template_kwargs: a bool, and a number that must arrive as an int.
KWARGS_TAIL = "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}" \
              "{% if budget is defined %}{{ budget + 1 }}{% endif %}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A service process on a loopback port, with a channel to it."""

    def __init__(self, args: list[str], port: int, log: Path, credentials: grpc.ChannelCredentials | None = None):
        self.args, self.port, self.log = args, port, log
        if credentials is None:
            self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=CHANNEL_OPTIONS)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        # One torch thread per engine: the test machine has two cores for everything.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", *self.args], stdout=log, stderr=log, env=env)

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if self.health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.args[0]} not serving after {timeout} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.channel.close()


class Engine(Service):
    def __init__(self, model_dir: Path, log: Path, *flags: str, port: int | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        port = port or free_port()
        # `flags` come last, so they override the defaults here (argparse keeps a flag's last value).
        super().__init__(["pagoda_engine", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32",
                          "--port", str(port), "--cpu-kv-cache-gib", "0.05", "--drain-grace-seconds", "0", *flags],
                         port, log, credentials)
        self.stub = engine_pb2_grpc.EngineStub(self.channel)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def load(self) -> epb.Load:
        return self.stub.GetLoad(epb.GetLoadRequest(), timeout=5)


class Front(Service):
    def __init__(self, model_dir: Path, engine_addresses: list[str], log: Path, *flags: str,
                 credentials: grpc.ChannelCredentials | None = None):
        port = free_port()
        super().__init__(["pagoda_tokenizer", "--model", str(model_dir), "--engines", ",".join(engine_addresses),
                          "--port", str(port), "--host", "127.0.0.1", "--load-poll-interval-s", "0.05", *flags],
                         port, log, credentials)
        self.stub = tokenizer_pb2_grpc.TokenizerStub(self.channel)

    def info(self) -> tpb.TokenizerModelInfo:
        return self.stub.GetModelInfo(epb.GetModelInfoRequest(), timeout=5)


@contextlib.contextmanager
def engine_and_front(model_dir: Path, logs: Path, engine_flags: Sequence[str] = (),
                     front_flags: Sequence[str] = ()) -> Iterator[tuple[Front, Engine]]:
    """An engine and a tokenizer service in front of it, both serving; both stopped afterwards."""
    engine = Engine(model_dir, logs / "engine.log", *engine_flags)
    front = Front(model_dir, [engine.address], logs / "front.log", *front_flags)
    try:
        engine.wait_serving()
        front.wait_serving()
        yield front, engine
    finally:
        front.stop()
        engine.stop()


def greedy(max_tokens: int, **fields) -> epb.SamplingParams:
    return epb.SamplingParams(temperature=0.0, max_tokens=max_tokens, **fields)


def collect(responses) -> dict[int, dict]:
    """Per sample: its text, tokens, prompt logprobs entries, and last message."""
    samples: dict[int, dict] = defaultdict(lambda: {"text": "", "token_ids": [], "prompt_logprobs": [], "last": None})
    for r in responses:
        sample = samples[r.index]
        assert sample["last"] is None, "a message after the sample's last"
        sample["text"] += r.text
        sample["token_ids"] += list(r.token_ids)
        sample["prompt_logprobs"] += list(r.prompt_logprobs)
        if r.finish_reason != epb.FINISH_REASON_UNSPECIFIED:
            sample["last"] = r
    return dict(samples)


def wait_for(condition, timeout: float, what: str) -> float:
    """Poll until `condition()` is true; return the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - start


# ---------------------------------------------------------------------------------------------------
# A tiny model behind two engines
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-front")
    make_tiny_model(path, "LlamaForCausalLM", vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=2,
                    num_attention_heads=4, num_key_value_heads=2)
    return write_tokenizer_dir(path, byte_level_tokenizer_json(TINY_VOCAB), CHATML_TEMPLATE + KWARGS_TAIL)


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    engines = [Engine(tiny_dir, logs / f"engine{i}.log") for i in range(2)]
    front = Front(tiny_dir, [e.address for e in engines], logs / "front.log")
    try:
        for service in (*engines, front):
            service.wait_serving()
        wait_for(lambda: front.info().num_healthy_engines == 2, 10, "both engines healthy")
        yield front, engines
    finally:
        for service in (front, *engines):
            service.stop()


@pytest.fixture
def front(cluster) -> Front:
    return cluster[0]


@pytest.fixture
def engines(cluster) -> list[Engine]:
    return cluster[1]


def test_streamed_text_equals_the_offline_api(front, tiny_dir):
    """Greedy text through the service equals pagoda_engine.LLM's decoded text, token for token. The
    random model's output splits characters and emits invalid UTF-8: the streaming detokenizer must agree."""
    from pagoda_engine import LLM, SamplingParams

    prompts = ["Hello, world!", "你好，世界！", "👍🏽 👨‍👩‍👧‍👦 naïve", "def f(x):\n    return"]
    prompt_ids = [list(front.stub.Tokenize(tpb.TokenizeRequest(text=p)).token_ids) for p in prompts]
    llm = LLM(str(tiny_dir), device="cpu", dtype="float32", cpu_kv_cache_gib=0.05)
    expected = llm.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=40))
    for prompt, offline in zip(prompts, expected, strict=True):
        got = collect(front.stub.Generate(tpb.TextGenerateRequest(prompt=prompt, sampling_params=greedy(40))))[0]
        assert got["token_ids"] == offline.outputs[0].token_ids
        assert got["text"] == offline.outputs[0].text
        assert got["last"].usage.completion_tokens == len(offline.outputs[0].token_ids)
        assert got["last"].usage.prompt_tokens == len(offline.prompt_token_ids)


def test_n_samples_with_logprobs(front):
    request = tpb.TextGenerateRequest(
        prompt="Once upon a time", skip_special_tokens=False,
        sampling_params=epb.SamplingParams(n=3, seed=7, max_tokens=12, logprobs=2),
    )
    samples = collect(front.stub.Generate(request))
    assert sorted(samples) == [0, 1, 2]
    detokenize = front.stub.Detokenize
    for sample in samples.values():
        assert sample["last"].usage.completion_tokens == len(sample["token_ids"])
        expected = detokenize(tpb.DetokenizeRequest(token_ids=sample["token_ids"], skip_special_tokens=False)).text
        if sample["last"].HasField("stop_token_id"):  # the stop token's text is left out
            expected = detokenize(tpb.DetokenizeRequest(token_ids=sample["token_ids"][:-1],
                                                        skip_special_tokens=False)).text
        assert sample["text"] == expected
    call = front.stub.Generate(request)
    first = next(call)
    call.cancel()
    entry = first.logprobs[0]
    assert len(first.logprobs) == len(first.token_ids)
    assert entry.sampled.token_id == first.token_ids[0] and len(entry.top) == 2
    assert entry.sampled.token == detokenize(tpb.DetokenizeRequest(token_ids=[entry.sampled.token_id],
                                                                   skip_special_tokens=False)).text


def test_prompt_logprobs_with_token_text(front, engines, tiny_dir):
    """Generate and Chat: sample 0's first message carries an entry per prompt token after the first, with
    the token's text, the values the offline API gives; no other message carries any. Nothing is left
    running or holding KV blocks."""
    from pagoda_engine import LLM, SamplingParams

    messages = [tpb.ChatMessage(role="user", content="Score me")]
    cases = [
        ("Generate", tpb.TextGenerateRequest(prompt="Once upon a time, naïve 👍", sampling_params=greedy(
            3, n=2, prompt_logprobs=2)), tpb.TokenizeRequest(text="Once upon a time, naïve 👍")),
        ("Chat", tpb.ChatRequest(messages=messages, sampling_params=greedy(3, prompt_logprobs=2)),
         tpb.TokenizeRequest(chat=tpb.ChatMessages(messages=messages))),
    ]
    llm = LLM(str(tiny_dir), device="cpu", dtype="float32", cpu_kv_cache_gib=0.05)
    for method, request, tokenize in cases:
        prompt = list(front.stub.Tokenize(tokenize).token_ids)
        expected = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2))[0]
        responses = list(getattr(front.stub, method)(request, timeout=30))
        first_of_0 = next(r for r in responses if r.index == 0)
        assert [len(r.prompt_logprobs) for r in responses if r is not first_of_0] == [0] * (len(responses) - 1)
        entries = first_of_0.prompt_logprobs
        assert len(entries) == len(prompt) - 1 == len(expected.prompt_logprobs), method
        for token, entry, (logprob, top) in zip(prompt[1:], entries, expected.prompt_logprobs, strict=True):
            assert entry.sampled.token_id == token and entry.sampled.logprob == pytest.approx(logprob, abs=1e-4)
            assert [t.token_id for t in entry.top] == [t for t, _ in top]
            for named in (entry.sampled, *entry.top):
                assert named.token == front.stub.Detokenize(tpb.DetokenizeRequest(
                    token_ids=[named.token_id], skip_special_tokens=False)).text
    wait_for(lambda: all(e.load().num_running == e.load().kv_blocks_used == 0 for e in engines), 5, "engines idle")


def test_stop_string_cuts_the_output_and_aborts_on_the_engine(front, engines):
    request = tpb.TextGenerateRequest(prompt="The stop test", sampling_params=greedy(60, ignore_eos=True))
    full = collect(front.stub.Generate(request))[0]
    text = full["text"]
    # From the first half, so that later tokens remain to be cut.
    stop = next(text[i : i + 3] for i in range(5, len(text) // 2) if "\ufffd" not in text[i : i + 3])
    cut = text.index(stop)
    for include, expected in ((False, text[:cut]), (True, text[: cut + len(stop)])):
        request.stop[:] = ["never appears \u2603", stop]
        request.include_stop_str_in_output = include
        got = collect(front.stub.Generate(request))[0]
        assert got["text"] == expected
        assert got["last"].finish_reason == epb.FINISH_REASON_STOP and got["last"].stop_string == stop
        assert got["token_ids"] == full["token_ids"][: len(got["token_ids"])]
        assert len(got["token_ids"]) < len(full["token_ids"])
        assert got["last"].usage.completion_tokens == len(got["token_ids"])
    # Two (greedy, so equal) samples: both cut; once both are, the request is aborted on the engine.
    request.sampling_params.n = 2
    both = collect(front.stub.Generate(request))
    assert [both[i]["text"] for i in (0, 1)] == [text[: cut + len(stop)]] * 2
    assert all(both[i]["last"].stop_string == stop for i in (0, 1))
    wait_for(lambda: all(e.load().num_running == 0 for e in engines), 5, "engines idle")


def test_a_sample_cut_by_a_stop_string_ends_while_the_others_run_on(front, engines):
    """n=2 and a stop string only sample 0 meets: that sample alone is aborted on the engine, and its last
    message comes while sample 1 still streams, not at the end of the whole request."""
    request = tpb.TextGenerateRequest(prompt="The stop test", sampling_params=epb.SamplingParams(
        temperature=1.0, seed=3, max_tokens=200, ignore_eos=True, n=2))
    texts = {i: sample["text"] for i, sample in collect(front.stub.Generate(request)).items()}
    stop = next(piece for i in range(2, 40) if (piece := texts[0][i : i + 3]).strip() and "\ufffd" not in piece
                and piece not in texts[1])
    request.stop[:] = [stop]
    messages = list(front.stub.Generate(request))
    last_of_0 = next(i for i, m in enumerate(messages) if m.index == 0 and m.finish_reason)
    assert messages[last_of_0].finish_reason == epb.FINISH_REASON_STOP
    assert sum(len(m.token_ids) for m in messages[last_of_0:] if m.index == 1) > 100  # of its 200
    got = collect(messages)
    assert got[0]["text"] == texts[0][: texts[0].index(stop)] and got[1]["text"] == texts[1]
    assert got[1]["last"].finish_reason == epb.FINISH_REASON_LENGTH
    wait_for(lambda: all(e.load().num_running == 0 for e in engines), 5, "engines idle")


def test_chat_uses_the_template(front):
    messages = [tpb.ChatMessage(role="system", content="Be brief."), tpb.ChatMessage(role="user", content="Hi")]
    tokenized = front.stub.Tokenize(tpb.TokenizeRequest(chat=tpb.ChatMessages(messages=messages)))
    assert tokenized.prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                               "<|im_start|>assistant\n"
    assert tokenized.tokens[0] == "<|im_start|>" and tokenized.max_model_len == 512
    chat = collect(front.stub.Chat(tpb.ChatRequest(messages=messages, sampling_params=greedy(8))))[0]
    plain = collect(front.stub.Generate(tpb.TextGenerateRequest(
        prompt=tokenized.prompt, add_special_tokens=False, sampling_params=greedy(8))))[0]
    assert chat["token_ids"] == plain["token_ids"] and chat["text"] == plain["text"]

    kwargs = Struct()
    kwargs.update({"enable_thinking": False, "budget": 41})
    tokenized = front.stub.Tokenize(tpb.TokenizeRequest(chat=tpb.ChatMessages(messages=messages),
                                                        chat_template_kwargs=kwargs, add_generation_prompt=False))
    assert tokenized.prompt.endswith("Hi<|im_end|>\n<think></think>42")


def test_long_prompt_logprobs_come_in_messages_under_the_limit(engines, tiny_dir, tmp_path):
    """A 480-token prompt at 20 alternatives is about 140 KB of prompt logprobs with their text: past this
    front's 100 KB message limit in one message. They come in several, each under it, ahead of the first
    token, and the front does not fail over when a message is too large for it."""
    front = Front(tiny_dir, [engines[0].address], tmp_path / "front.log", "--max-message-bytes", "100000")
    try:
        front.wait_serving()
        prompt = "the quick brown fox jumps over the lazy dog " * 24
        prompt_ids = front.stub.Tokenize(tpb.TokenizeRequest(text=prompt)).token_ids
        assert 400 < len(prompt_ids) < 512
        params = epb.SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=20)
        responses = list(front.stub.Generate(tpb.TextGenerateRequest(prompt=prompt, sampling_params=params),
                                             timeout=60))
        carrying = [r for r in responses if r.prompt_logprobs]
        assert len(carrying) == 2 and not carrying[0].token_ids and carrying[1].token_ids
        entries = [e for r in carrying for e in r.prompt_logprobs]
        assert [e.sampled.token_id for e in entries] == list(prompt_ids[1:])
    finally:
        front.stop()


def test_requests_spread_over_both_engines(front, engines):
    before = [e.load().prefix_cache_queried_tokens for e in engines]
    prompts = [f"{i} distinct opening words for spreading" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: collect(front.stub.Generate(
            tpb.TextGenerateRequest(prompt=p, sampling_params=greedy(30, ignore_eos=True)))), prompts))
    after = [e.load().prefix_cache_queried_tokens for e in engines]
    assert all(a > b for a, b in zip(after, before, strict=True)), "an engine got no request"


def test_same_prefix_requests_stick_to_one_engine(front, engines):
    shared = "A long shared system prompt that spans several KV blocks of sixteen tokens each, so that " \
             "the engine that served it first still holds it in its prefix cache."
    assert len(front.stub.Tokenize(tpb.TokenizeRequest(text=shared)).token_ids) >= 48
    before = [e.load().prefix_cache_queried_tokens for e in engines]
    cached = []
    for i in range(6):
        request = tpb.TextGenerateRequest(prompt=f"{shared} Question {i}?", sampling_params=greedy(2))
        cached.append(collect(front.stub.Generate(request))[0]["last"].usage.cached_prompt_tokens)
    grew = [a > b for a, b in zip((e.load().prefix_cache_queried_tokens for e in engines), before, strict=True)]
    assert grew.count(True) == 1, "same-prefix requests went to both engines"
    assert cached[0] == 0 and all(c >= 48 for c in cached[1:]), f"prefix cache hits: {cached}"


def test_client_cancel_aborts_on_the_engine(front, engines):
    call = front.stub.Generate(tpb.TextGenerateRequest(
        prompt="Cancel me", sampling_params=epb.SamplingParams(max_tokens=400, ignore_eos=True)))
    next(call)
    assert sum(e.load().num_running for e in engines) == 1
    call.cancel()
    wait_for(lambda: all(e.load().num_running == 0 and e.load().kv_blocks_used == 0 for e in engines), 2,
             "the engine to drop the cancelled request")


def test_abort_by_request_id(front):
    call = front.stub.Generate(tpb.TextGenerateRequest(
        request_id="abort-me", prompt="Abort me", sampling_params=epb.SamplingParams(max_tokens=400, ignore_eos=True)))
    first = next(call)
    assert first.request_id == "abort-me"
    assert front.stub.Abort(epb.AbortRequest(request_id="abort-me")).found
    rest = collect(call)[0]
    assert rest["last"].finish_reason == epb.FINISH_REASON_ABORT
    assert not front.stub.Abort(epb.AbortRequest(request_id="abort-me")).found


def test_abort_of_one_sample(front):
    call = front.stub.Generate(tpb.TextGenerateRequest(
        request_id="abort-one", prompt="Abort one", sampling_params=greedy(400, ignore_eos=True, n=2)))
    first = next(call)
    assert front.stub.Abort(epb.AbortRequest(request_id="abort-one", indices=[0])).found
    samples = collect(itertools.chain([first], call))
    assert samples[0]["last"].finish_reason == epb.FINISH_REASON_ABORT and len(samples[0]["token_ids"]) < 400
    assert samples[1]["last"].finish_reason == epb.FINISH_REASON_LENGTH and len(samples[1]["token_ids"]) == 400


@pytest.mark.parametrize(("method", "request_", "match"), [
    ("Generate", tpb.TextGenerateRequest(prompt=""), "prompt must not be empty"),
    ("Chat", tpb.ChatRequest(), "messages must not be empty"),
    ("Chat", tpb.ChatRequest(messages=[tpb.ChatMessage(role="wizard", content="hi")]), "unknown role"),
    ("Generate", tpb.TextGenerateRequest(prompt="hi " * 600), "max length is 512"),
    ("Generate", tpb.TextGenerateRequest(prompt="hi", sampling_params=epb.SamplingParams(max_tokens=600)),
     "does not fit"),
    ("Generate", tpb.TextGenerateRequest(prompt="hi", stop=["s"] * 17), "at most 16"),
    ("Generate", tpb.TextGenerateRequest(prompt="hi", stop=["x" * 257]), "at most 256 characters"),
    ("Generate", tpb.TextGenerateRequest(prompt="hi", stop=["ok", ""]), "must not be empty"),
    ("Generate", tpb.TextGenerateRequest(prompt="hi", sampling_params=epb.SamplingParams(temperature=-1)),
     "temperature"),
    ("Chat", tpb.ChatRequest(messages=[tpb.ChatMessage(role="user", content="hi")],
                             sampling_params=epb.SamplingParams(prompt_logprobs=21)),
     "prompt_logprobs must be in [0, 20]"),
    ("Generate", tpb.TextGenerateRequest(prompt="hi", sampling_params=epb.SamplingParams(
        structured_output=epb.StructuredOutput(regex="[a-"))), "regex"),
    ("Generate", tpb.TextGenerateRequest(prompt="hi", sampling_params=epb.SamplingParams(
        structured_output=epb.StructuredOutput())), "names no kind"),
    ("Generate", tpb.TextGenerateRequest(prompt="hi", sampling_params=epb.SamplingParams(
        structured_output=epb.StructuredOutput(json_object=False))), "must be true"),
    ("Generate", tpb.TextGenerateRequest(prompt="hi", sampling_params=epb.SamplingParams(
        structured_output=epb.StructuredOutput(json_schema='{"$ref": "#"}'))), "matches no string"),
    ("Tokenize", tpb.TokenizeRequest(), "text or chat"),
    ("Detokenize", tpb.DetokenizeRequest(token_ids=[5, TINY_VOCAB]), "not in the vocabulary"),
])
def test_invalid_requests(front, method, request_, match):
    with pytest.raises(grpc.RpcError) as error:
        response = getattr(front.stub, method)(request_, timeout=10)
        if method in ("Generate", "Chat"):
            list(response)
    assert error.value.code() == INVALID and match in error.value.details()


def test_structured_output_on_the_engine_and_through_the_front(front, engines):
    """A random model over a small byte-level vocabulary, held to a regex: the engine's token ids spell a match
    (split into tokens any way), and the front's text is that match, ended without a stop token."""
    pattern = "[a-z]{2,6}( [a-z]{2,6}){2}[.!]"
    params = greedy(60, structured_output=epb.StructuredOutput(regex=pattern))
    prompt_ids = list(front.stub.Tokenize(tpb.TokenizeRequest(text="Hello, world!")).token_ids)
    direct = list(engines[0].stub.Generate(epb.GenerateRequest(prompt_token_ids=prompt_ids, sampling_params=params)))
    token_ids = [token for response in direct for token in response.token_ids]
    text = front.stub.Detokenize(tpb.DetokenizeRequest(token_ids=token_ids)).text
    assert re.fullmatch(pattern, text), text
    assert direct[-1].finish_reason == epb.FINISH_REASON_STOP and not direct[-1].HasField("stop_token_id")
    served = collect(front.stub.Generate(tpb.TextGenerateRequest(prompt="Hello, world!", sampling_params=params)))[0]
    assert served["text"] == text and served["last"].WhichOneof("stop_reason") is None


def test_an_answer_past_the_message_limit_is_refused_clearly(front):
    """1.5 MB of text tokenizes to an answer of several MB (the prompt, then every token's id and text)."""
    with pytest.raises(grpc.RpcError) as error:
        front.stub.Tokenize(tpb.TokenizeRequest(text="ab" * 750_000), timeout=60)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "message limit" in error.value.details() and "send less text" in error.value.details()
    assert front.stub.Tokenize(tpb.TokenizeRequest(text="still fine"), timeout=10).token_ids


def test_duplicate_request_id_is_refused(front):
    call = front.stub.Generate(tpb.TextGenerateRequest(
        request_id="twice", prompt="x", sampling_params=epb.SamplingParams(max_tokens=400, ignore_eos=True)))
    next(call)
    with pytest.raises(grpc.RpcError) as error:
        list(front.stub.Generate(tpb.TextGenerateRequest(request_id="twice", prompt="y")))
    assert error.value.code() == INVALID and "already running" in error.value.details()
    call.cancel()


def test_a_request_id_is_free_once_its_last_message_is_read(front):
    """A client may stop reading at the last finish reason, before the stream's status: the id is free by then,
    on the tokenizer service and on the engine it passes the id to."""
    request = tpb.TextGenerateRequest(request_id="next-please", prompt="x", sampling_params=greedy(1, n=2))
    for _ in range(40):
        finished = set()
        for message in front.stub.Generate(request, timeout=10):
            if message.finish_reason != epb.FINISH_REASON_UNSPECIFIED:
                finished.add(message.index)
            if len(finished) == 2:
                break


def test_model_info_and_reflection(front, engines):
    info = front.info()
    assert info.model.max_model_len == 512 and info.model.eos_token_ids == [2]
    assert info.eos_tokens == ["<|im_end|>"] and info.has_chat_template
    assert (info.num_engines, info.num_healthy_engines, info.tokenizer_vocab_size) == (2, 2, TINY_VOCAB)
    services = ProtoReflectionDescriptorDatabase(front.channel).get_services()
    assert {"pagoda.v1.Tokenizer", "grpc.health.v1.Health"} <= set(services)


def test_a_chat_template_that_does_not_compile_leaves_only_chat_unavailable(engines, tmp_path):
    model_dir = write_tokenizer_dir(tmp_path / "model", byte_level_tokenizer_json(TINY_VOCAB), "{% if %}")
    broken = Front(model_dir, [engines[0].address], tmp_path / "front.log")
    try:
        broken.wait_serving()
        assert not broken.info().has_chat_template
        outs = collect(broken.stub.Generate(tpb.TextGenerateRequest(prompt="still here", sampling_params=greedy(3))))
        assert len(outs[0]["token_ids"]) == 3
        with pytest.raises(grpc.RpcError) as error:
            list(broken.stub.Chat(tpb.ChatRequest(messages=[tpb.ChatMessage(role="user", content="hi")])))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not compile" in error.value.details()
    finally:
        broken.stop()


def test_engine_death_and_restart(front, engines):
    """Kill the engine serving a stream: the stream fails with UNAVAILABLE at once, later requests go to the
    other engine; restarted, the engine serves again. Runs last: it leaves a restarted engine behind."""
    call = front.stub.Generate(tpb.TextGenerateRequest(
        prompt="Killed mid-stream", sampling_params=epb.SamplingParams(max_tokens=400, ignore_eos=True)))
    next(call)
    [victim] = [e for e in engines if e.load().num_running == 1]
    survivor = next(e for e in engines if e is not victim)
    outcome: dict = {}

    def drain() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            outcome["code"], outcome["at"] = exc.code(), time.monotonic()

    reader = threading.Thread(target=drain)
    reader.start()
    killed_at = time.monotonic()
    victim.kill()
    reader.join(timeout=5)
    assert outcome.get("code") == grpc.StatusCode.UNAVAILABLE
    assert outcome["at"] - killed_at < 1.0

    for i in range(4):
        request = tpb.TextGenerateRequest(prompt=f"after the crash {i}", sampling_params=greedy(4))
        assert collect(front.stub.Generate(request))[0]["last"].finish_reason == epb.FINISH_REASON_LENGTH
    assert front.info().num_healthy_engines == 1

    victim.start()
    victim.wait_serving()
    wait_for(lambda: front.info().num_healthy_engines == 2, 10, "the restarted engine to be used again")
    requests = [tpb.TextGenerateRequest(prompt=f"{i} back again", sampling_params=greedy(40, ignore_eos=True))
                for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: collect(front.stub.Generate(r)), requests))
    assert victim.load().prefix_cache_queried_tokens > 0, "the restarted engine got no request"
    assert survivor.load().num_running == 0


def test_no_engine_means_not_serving_and_unavailable(tiny_dir, tmp_path):
    nobody = f"127.0.0.1:{free_port()}"
    front = Front(tiny_dir, [nobody], tmp_path / "front.log")
    try:
        wait_for(lambda: _health(front) is not None, 10, "the front to answer")
        assert _health(front) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as error:
            list(front.stub.Generate(tpb.TextGenerateRequest(prompt="anyone?")))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        # Tokenizing needs no engine.
        assert front.stub.Tokenize(tpb.TokenizeRequest(text="still here")).token_ids
    finally:
        front.stop()


def _health(service: Service):
    try:
        return service.health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
    except grpc.RpcError:
        return None


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("smollm2-logs")
    engine = Engine(smollm2_dir, logs / "engine.log")
    front = Front(smollm2_dir, [engine.address], logs / "front.log")
    try:
        engine.wait_serving(timeout=120)
        front.wait_serving()
        yield front
    finally:
        front.stop()
        engine.stop()


def test_smollm2_chat_is_coherent_and_matches_the_offline_api(smollm2, smollm2_dir):
    from pagoda_engine import LLM, SamplingParams

    messages = [tpb.ChatMessage(role="user", content="What is the capital of France? Answer in one sentence.")]
    answer = collect(smollm2.stub.Chat(tpb.ChatRequest(messages=messages, sampling_params=greedy(30))))[0]
    assert "Paris" in answer["text"], answer["text"]
    assert answer["last"].finish_reason == epb.FINISH_REASON_STOP and answer["last"].stop_token_id == 2

    prompt_ids = list(smollm2.stub.Tokenize(tpb.TokenizeRequest(chat=tpb.ChatMessages(messages=messages))).token_ids)
    llm = LLM(str(smollm2_dir), device="cpu", dtype="float32", cpu_kv_cache_gib=0.05)
    [offline] = llm.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=30))
    assert answer["token_ids"] == offline.outputs[0].token_ids
    assert answer["text"] == offline.outputs[0].text
