"""Every request cap through the real services: a tokenizer service in front of an engine, both with small
caps set by their flags, answering INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message that names the cap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pagoda.v1 import engine_pb2 as epb
from pagoda.v1 import tokenizer_pb2 as tpb
from tests.conftest import make_tiny_model
from tests.test_tokenizer_service import Engine, Front, wait_for
from tests.tokenizer_helpers import byte_level_tokenizer_json, write_tokenizer_dir

pytestmark = pytest.mark.timeout(60)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_MODEL_LEN = 4096
MESSAGE_BYTES = 64 * 1024
MAX_WAITING = 2
# Long enough to outlast each test that holds it; cancelled as soon as it has served its purpose.
ENDLESS = epb.SamplingParams(max_tokens=MAX_MODEL_LEN - 100, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-limits"), "LlamaForCausalLM", vocab_size=400,
                           bos_token_id=0, eos_token_id=2, max_position_embeddings=2 * MAX_MODEL_LEN)
    return write_tokenizer_dir(path, byte_level_tokenizer_json(400))


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory) -> Iterator[Engine]:
    """One sequence runs at a time and two may wait, so that three requests fill the engine."""
    engine = Engine(tiny_dir, tmp_path_factory.mktemp("engine-logs") / "engine.log", "--max-num-seqs", "1",
                    "--max-waiting-requests", str(MAX_WAITING), "--max-n", "2", "--max-logprobs", "3",
                    "--max-model-len", str(MAX_MODEL_LEN), "--max-message-bytes", str(MESSAGE_BYTES))
    try:
        engine.wait_serving()
        yield engine
    finally:
        engine.stop()


def start_front(tiny_dir: Path, engine: Engine, log: Path, *flags: str) -> Front:
    front = Front(tiny_dir, [engine.address], log, *flags)
    front.wait_serving()
    return front


@pytest.fixture(scope="module")
def front(tiny_dir, engine, tmp_path_factory) -> Iterator[Front]:
    front = start_front(tiny_dir, engine, tmp_path_factory.mktemp("front-logs") / "front.log",
                        "--max-stop-strings", "2", "--max-stop-string-chars", "8",
                        "--max-message-bytes", str(MESSAGE_BYTES))
    yield front
    front.stop()


def refusal(call) -> grpc.RpcError:
    """The error a Generate call ends with."""
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    return error.value


def generate(front: Front, prompt: str = "hi", stop: tuple[str, ...] = (), **params) -> grpc.RpcError:
    request = tpb.TextGenerateRequest(prompt=prompt, stop=stop, sampling_params=epb.SamplingParams(**params))
    return refusal(front.stub.Generate(request, timeout=10))


def fill_engine(front: Front, engine: Engine) -> list:
    """One request running on the engine and as many waiting as may; returns their calls, for the caller to
    cancel."""
    running = front.stub.Generate(tpb.TextGenerateRequest(prompt="running", sampling_params=ENDLESS))
    next(running)
    waiting = [front.stub.Generate(tpb.TextGenerateRequest(prompt=f"waiting {i}", sampling_params=ENDLESS))
               for i in range(MAX_WAITING)]
    wait_for(lambda: engine.load().num_waiting == MAX_WAITING, 10, "the queue to fill")
    return [running, *waiting]


def cancel(calls: list, engine: Engine) -> None:
    for call in calls:
        call.cancel()
    wait_for(lambda: engine.load().num_running == engine.load().num_waiting == 0, 10, "the engine to go idle")


@pytest.mark.parametrize(("params", "words"), [
    (dict(n=3), "n must be in [1, 2]"),
    (dict(logprobs=4), "logprobs must be in [0, 3]"),
    (dict(prompt_logprobs=4), "prompt_logprobs must be in [0, 3]"),
    (dict(max_tokens=MAX_MODEL_LEN), f"max length is {MAX_MODEL_LEN}"),
    # Every id but EOS (2) is a stop id, and EOS is one too: min_tokens would leave nothing to draw.
    (dict(min_tokens=1, max_tokens=4, stop_token_ids=[i for i in range(400) if i != 2]), "would ban every token"),
    # The front passes logit_bias and allowed_token_ids on as they are; the engine checks them.
    (dict(logit_bias={5: -100.5}), "logit_bias values must be in [-100, 100], got -100.5 for token 5"),
    (dict(logit_bias={400: 1.0}), "logit_bias token id 400 is outside the vocabulary [0, 400)"),
    (dict(allowed_token_ids=[5, 400]), "allowed_token_ids id 400 is outside the vocabulary [0, 400)"),
    (dict(allowed_token_ids=[5] * 1025), "at most 1024 allowed_token_ids entries are accepted, got 1025"),
    (dict(min_tokens=1, allowed_token_ids=[2]), "would ban every token"),
])
def test_sampling_caps_are_invalid_argument(front, engine, params, words):
    error = generate(front, **params)
    assert error.code() == INVALID and words in error.details()
    load = engine.load()
    assert load.num_running == load.num_waiting == load.kv_blocks_used == 0


def test_requests_at_the_sampling_caps_are_served(front):
    params = epb.SamplingParams(n=2, logprobs=3, prompt_logprobs=3, max_tokens=2, ignore_eos=True)
    responses = list(front.stub.Generate(tpb.TextGenerateRequest(prompt="hi", sampling_params=params), timeout=10))
    entries = [entry for r in responses for entry in r.logprobs]
    assert {r.index for r in responses} == {0, 1} and len(entries) == 4 and all(len(e.top) == 3 for e in entries)
    prompt = [entry for r in responses for entry in r.prompt_logprobs]
    assert prompt and all(len(e.top) == 3 for e in prompt)


def test_a_bias_on_every_token_and_1024_allowed_ids_are_served(front, engine):
    """At the allowlist's cap (the vocabulary holds 400 ids, so some repeat), with every token biased."""
    allowed = [*range(400), *range(400), *range(224)]
    bias = {t: (t % 7 - 3) / 3 for t in range(400)} | {97: 100.0}
    params = epb.SamplingParams(max_tokens=5, ignore_eos=True, temperature=0, allowed_token_ids=allowed,
                                logit_bias=bias)
    responses = list(front.stub.Generate(tpb.TextGenerateRequest(prompt="hi", sampling_params=params), timeout=10))
    assert [t for r in responses for t in r.token_ids] == [97] * 5
    wait_for(lambda: engine.load().kv_blocks_used == 0, 10, "the engine to free every block")


def test_a_prompt_longer_than_the_model_is_invalid_argument(front):
    prompt = "the prompt that never ends " * 400
    assert len(front.stub.Tokenize(tpb.TokenizeRequest(text=prompt)).token_ids) > MAX_MODEL_LEN
    error = generate(front, prompt)
    assert error.code() == INVALID and f"the model's max length is {MAX_MODEL_LEN}" in error.details()


@pytest.mark.parametrize(("stop", "words"), [
    (("a", "b", "c"), "at most 2 are accepted"),
    (("123456789",), "at most 8 characters"),
])
def test_stop_string_caps_are_invalid_argument(front, stop, words):
    error = generate(front, stop=stop)
    assert error.code() == INVALID and words in error.details()


def test_messages_over_the_size_cap_are_resource_exhausted(front, engine):
    error = generate(front, "x" * MESSAGE_BYTES)
    assert error.code() == EXHAUSTED
    ids = epb.GenerateRequest(prompt_token_ids=[300] * (MESSAGE_BYTES // 2), sampling_params=epb.SamplingParams())
    assert ids.ByteSize() > MESSAGE_BYTES
    assert refusal(engine.stub.Generate(ids, timeout=10)).code() == EXHAUSTED


def test_a_full_engine_queue_is_resource_exhausted(front, engine):
    calls = fill_engine(front, engine)
    try:
        error = generate(front, max_tokens=2)
        assert error.code() == EXHAUSTED and "already waiting" in error.details()
    finally:
        cancel(calls, engine)


def test_the_waiting_cap_holds_for_a_burst_of_requests(engine):
    """Requests sent at once all arrive before the engine reports any of them waiting: the cap must count
    those admitted since its last report too (it once read that report's count alone, and let bursts in whole)."""
    burst = 16
    calls = [engine.stub.Generate(epb.GenerateRequest(prompt_token_ids=[5, 6, 7 + i], sampling_params=ENDLESS))
             for i in range(burst)]
    try:
        peak_waiting = 0

        def settled() -> bool:  # every call refused, or on the engine (nothing finishes this soon)
            nonlocal peak_waiting
            load = engine.load()
            peak_waiting = max(peak_waiting, load.num_waiting)
            return sum(call.done() for call in calls) + load.num_running + load.num_waiting == burst

        wait_for(settled, 10, "every request to be refused or queued")
        refused = [call for call in calls if call.done()]
        assert all(call.code() == EXHAUSTED and "already waiting" in call.details() for call in refused)
        assert peak_waiting <= MAX_WAITING
        # Admitted: up to MAX_WAITING before the engine's first report, then one more once the first runs.
        assert MAX_WAITING <= burst - len(refused) <= 1 + MAX_WAITING
    finally:
        cancel(calls, engine)


def test_request_ids_are_capped_at_256_bytes(front, engine):
    """Every message of a stream echoes its request id, so both services refuse one past 256 bytes of UTF-8."""
    def text(request_id: str) -> tpb.TextGenerateRequest:
        return tpb.TextGenerateRequest(request_id=request_id, prompt="hi",
                                       sampling_params=epb.SamplingParams(max_tokens=2))

    def ids(request_id: str) -> epb.GenerateRequest:
        return epb.GenerateRequest(request_id=request_id, prompt_token_ids=[5, 6],
                                   sampling_params=epb.SamplingParams(max_tokens=2))

    for too_long in ("x" * 257, "é" * 129):  # 257 bytes; 129 characters of 2 bytes each
        for call in (front.stub.Generate(text(too_long), timeout=10), engine.stub.Generate(ids(too_long), timeout=10)):
            error = refusal(call)
            size = len(too_long.encode())
            assert error.code() == INVALID and f"request_id is {size} bytes; at most 256" in error.details()
    longest = "é" * 128
    answers = [*front.stub.Generate(text(longest), timeout=10), *engine.stub.Generate(ids(longest), timeout=10)]
    assert {answer.request_id for answer in answers} == {longest}


def test_streams_beyond_the_concurrency_cap_are_resource_exhausted(tiny_dir, engine, tmp_path):
    front = start_front(tiny_dir, engine, tmp_path / "front.log", "--max-concurrent-streams", "1")
    try:
        running = front.stub.Generate(tpb.TextGenerateRequest(prompt="the one", sampling_params=ENDLESS))
        next(running)
        error = generate(front, max_tokens=2)
        assert error.code() == EXHAUSTED and "streams are in flight" in error.details()
        cancel([running], engine)
        request = tpb.TextGenerateRequest(prompt="next", sampling_params=epb.SamplingParams(max_tokens=2))
        assert list(front.stub.Generate(request, timeout=10))[-1].finish_reason == epb.FINISH_REASON_LENGTH
    finally:
        front.stop()
