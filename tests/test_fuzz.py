"""Random and hostile requests (hypothesis) for every RPC of both services, over the wire to real processes.

Every answer must be OK or a status that blames the request (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, or
OUT_OF_RANGE where gRPC itself sizes messages) with a message saying why; never UNKNOWN or INTERNAL, and
never a crash. Streams that are accepted are read to their first message and then cancelled, so valid
requests with enormous budgets cost no time. Afterwards both services are healthy and the engine is idle.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pagoda.decode_guard import DecodeGuard
from pagoda.v1 import engine_pb2 as epb
from pagoda.v1 import tokenizer_pb2 as tpb
from tests.test_faults import engine_idle
from tests.test_tokenizer_service import TINY_VOCAB, Engine, Front, engine_and_front, wait_for
from tests.test_tokenizer_service import tiny_dir as tiny_dir  # noqa: F401 - a fixture, shared

pytestmark = pytest.mark.timeout(300)

REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
# Bounded: the whole file runs in well under a minute on two shared cores.
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                print_blob=True)

UINT32_MAX = 2**32 - 1
uint32 = st.one_of(st.integers(0, UINT32_MAX), st.sampled_from([0, 1, 2**31, UINT32_MAX]))
uint64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]))
int32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-(2**31), -2, -1, 0, 1, 2**31 - 1]))
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
# Token ids around the vocabulary's edge, and anywhere else a uint32 reaches.
token_ids = st.one_of(st.integers(0, TINY_VOCAB - 1), st.sampled_from([TINY_VOCAB - 1, TINY_VOCAB, TINY_VOCAB + 1]),
                      uint32)
# Protobuf strings are UTF-8: lone surrogates cannot be sent at all (raw invalid bytes are fuzzed below).
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
roles = st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer", "", "wizard",
                                   "<|im_start|>", "__class__", "{{ messages }}"]), text)
json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | text,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=10)
kwarg_names = st.one_of(st.sampled_from(["messages", "add_generation_prompt", "tools", "documents", "self",
                                         "bos_token", "enable_thinking", "budget"]), text)


@st.composite
def sampling_params(draw: st.DrawFn) -> epb.SamplingParams:
    fields = draw(st.fixed_dictionaries({}, optional={
        "temperature": floats, "top_k": int32, "top_p": floats, "min_p": floats, "repetition_penalty": floats,
        "presence_penalty": floats, "frequency_penalty": floats, "seed": uint64, "max_tokens": uint32,
        "min_tokens": uint32, "stop_token_ids": st.lists(uint32, max_size=300), "ignore_eos": st.booleans(),
        "logprobs": uint32, "prompt_logprobs": st.one_of(st.integers(0, 20), uint32),
        "n": st.one_of(st.integers(0, 20), uint32),
        "logit_bias": st.dictionaries(token_ids, st.one_of(floats, st.floats(-100, 100, width=32)), max_size=40),
        "allowed_token_ids": st.lists(token_ids, max_size=40),
    }))
    return epb.SamplingParams(**fields)


def struct_of(values: dict) -> Struct:
    struct = Struct()
    struct.update(values)
    return struct


chat_messages = st.lists(st.builds(tpb.ChatMessage, role=roles, content=text), max_size=6)
template_kwargs = st.dictionaries(kwarg_names, json_values, max_size=4).map(struct_of)
stop_lists = st.one_of(st.lists(text, max_size=20), st.lists(st.just("x"), min_size=1000, max_size=1000))


def answered(call: Callable[[], object]) -> grpc.StatusCode:
    """Run one call; a stream is read to its first message, then cancelled. Fails on an unexpected status."""
    try:
        response = call()
        if hasattr(response, "cancel"):
            first = next(response, None)
            response.cancel()
            assert first is not None, "an accepted stream ended without a message"
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, f"{error.code()}: {error.details()}"
        assert error.details(), f"{error.code()} without a message"
        return error.code()


@pytest.fixture(scope="module")
def pair(tiny_dir, tmp_path_factory):  # noqa: F811 - the fixture imported above
    logs = tmp_path_factory.mktemp("fuzz-logs")
    with engine_and_front(tiny_dir, logs) as (front, engine):
        yield front, engine
        # Whatever the fuzzing did, both still serve, and the engine holds no request and no block.
        for service in (engine, front):
            assert service.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: engine_idle(engine), 10, "the engine to go idle")
        assert front.process.poll() is None and engine.process.poll() is None


@pytest.fixture(scope="module")
def front(pair) -> Front:
    return pair[0]


@pytest.fixture(scope="module")
def engine(pair) -> Engine:
    return pair[1]


# ---- the engine's RPCs ----


@FUZZ
@given(prompt=st.lists(token_ids, max_size=600), params=sampling_params(), request_id=text)
@example(prompt=[TINY_VOCAB - 1], params=epb.SamplingParams(max_tokens=UINT32_MAX), request_id="")
@example(prompt=[1], params=epb.SamplingParams(temperature=math.nan, top_p=math.inf), request_id="")
def test_engine_generate(engine, prompt, params, request_id):
    answered(lambda: engine.stub.Generate(epb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                                              sampling_params=params), timeout=30))


@FUZZ
@given(request_id=text)
def test_engine_unary_rpcs(engine, request_id):
    assert answered(lambda: engine.stub.Abort(epb.AbortRequest(request_id=request_id), timeout=10)) == \
        grpc.StatusCode.OK
    assert answered(lambda: engine.stub.GetLoad(epb.GetLoadRequest(), timeout=10)) == grpc.StatusCode.OK
    assert answered(lambda: engine.stub.GetModelInfo(epb.GetModelInfoRequest(), timeout=10)) == grpc.StatusCode.OK


# ---- the tokenizer service's RPCs ----


@FUZZ
@given(prompt=text, params=sampling_params(), stop=stop_lists, flags=st.tuples(st.booleans(), st.booleans()),
       request_id=text)
def test_front_generate(front, prompt, params, stop, flags, request_id):
    request = tpb.TextGenerateRequest(request_id=request_id, prompt=prompt, sampling_params=params, stop=stop,
                                      include_stop_str_in_output=flags[0], skip_special_tokens=flags[1])
    answered(lambda: front.stub.Generate(request, timeout=30))


@FUZZ
@given(messages=chat_messages, kwargs=template_kwargs, params=sampling_params(), stop=stop_lists,
       add_generation_prompt=st.booleans())
def test_front_chat(front, messages, kwargs, params, stop, add_generation_prompt):
    request = tpb.ChatRequest(messages=messages, chat_template_kwargs=kwargs, sampling_params=params, stop=stop,
                              add_generation_prompt=add_generation_prompt)
    answered(lambda: front.stub.Chat(request, timeout=30))


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"budget": math.inf, "nan": math.nan}, grpc.StatusCode.OK),  # once UNKNOWN: json_format refused them
    ({"self": 1, "add_special_tokens": 2}, grpc.StatusCode.OK),  # once UNKNOWN: a clash with render()'s parameters
    ({"messages": []}, grpc.StatusCode.INVALID_ARGUMENT),  # once UNKNOWN, for the same reason
    ({"add_generation_prompt": False}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_template_kwargs_found_by_fuzzing(front, kwargs, code):
    request = tpb.TokenizeRequest(chat=tpb.ChatMessages(messages=[tpb.ChatMessage(role="user", content="hi")]),
                                  chat_template_kwargs=struct_of(kwargs))
    assert answered(lambda: front.stub.Tokenize(request, timeout=10)) == code


def test_a_huge_n_is_refused_before_any_sample_exists(front):
    # 10^5, not the 2^32 - 1 fuzzing found: were the check gone, this still fails, without exhausting memory.
    request = tpb.TextGenerateRequest(prompt="hi", sampling_params=epb.SamplingParams(n=100_000, max_tokens=2))
    with pytest.raises(grpc.RpcError) as error:
        list(front.stub.Generate(request, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "the engines' max_n" in error.value.details()


@FUZZ
@given(text_input=st.none() | text, messages=chat_messages, kwargs=template_kwargs, add_special=st.booleans())
def test_front_tokenize(front, text_input, messages, kwargs, add_special):
    if text_input is not None:
        request = tpb.TokenizeRequest(text=text_input, add_special_tokens=add_special)
    else:
        request = tpb.TokenizeRequest(chat=tpb.ChatMessages(messages=messages), chat_template_kwargs=kwargs)
    answered(lambda: front.stub.Tokenize(request, timeout=10))


@FUZZ
@given(ids=st.lists(token_ids, max_size=2000), skip=st.booleans(), request_id=text)
def test_front_detokenize_abort_and_info(front, ids, skip, request_id):
    code = answered(lambda: front.stub.Detokenize(tpb.DetokenizeRequest(token_ids=ids, skip_special_tokens=skip),
                                                  timeout=10))
    assert (code == grpc.StatusCode.OK) == all(i < TINY_VOCAB for i in ids)
    assert answered(lambda: front.stub.Abort(epb.AbortRequest(request_id=request_id), timeout=10)) == \
        grpc.StatusCode.OK
    assert answered(lambda: front.stub.GetModelInfo(epb.GetModelInfoRequest(), timeout=10)) == grpc.StatusCode.OK


# ---- raw bytes on the wire ----

METHODS = {  # every unary-request RPC of both services, and whether it streams its answer
    "/pagoda.v1.Engine/Generate": True, "/pagoda.v1.Engine/Abort": False, "/pagoda.v1.Engine/GetModelInfo": False,
    "/pagoda.v1.Engine/GetLoad": False, "/pagoda.v1.Tokenizer/Generate": True, "/pagoda.v1.Tokenizer/Chat": True,
    "/pagoda.v1.Tokenizer/Tokenize": False, "/pagoda.v1.Tokenizer/Detokenize": False,
    "/pagoda.v1.Tokenizer/GetModelInfo": False, "/pagoda.v1.Tokenizer/Abort": False,
}
# Field 1 is a string (request_id, or text) in these requests: bytes that are not UTF-8 there cannot parse.
STRING_FIELD_1 = ["/pagoda.v1.Engine/Generate", "/pagoda.v1.Engine/Abort", "/pagoda.v1.Tokenizer/Generate",
                  "/pagoda.v1.Tokenizer/Chat", "/pagoda.v1.Tokenizer/Tokenize", "/pagoda.v1.Tokenizer/Abort"]
INVALID_UTF8 = b"\x0a\x03\xff\xfe\x41"
# Field 1 announced as 5 bytes long with 2 to follow: no message of any type parses from it.
TRUNCATED = b"\x0a\x05ab"


def raw_call(pair, method: str, payload: bytes, timeout: float = 30):
    front, engine = pair
    channel = engine.channel if method.startswith("/pagoda.v1.Engine/") else front.channel
    kind = channel.unary_stream if METHODS[method] else channel.unary_unary
    return kind(method)(payload, timeout=timeout)  # no serializers: the bytes go out as they are


@pytest.mark.parametrize("method", STRING_FIELD_1)
def test_invalid_utf8_is_invalid_argument(pair, method):
    assert answered(lambda: raw_call(pair, method, INVALID_UTF8)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("method", METHODS)
def test_truncated_messages_are_invalid_argument(pair, method):
    assert answered(lambda: raw_call(pair, method, TRUNCATED)) == grpc.StatusCode.INVALID_ARGUMENT


REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
# ServerReflectionRequest.file_by_filename (field 3) holding bytes that are not UTF-8.
REFLECTION_INVALID_UTF8 = b"\x1a\x03\xff\xfe\xfd"


@pytest.mark.parametrize("payload", [REFLECTION_INVALID_UTF8, TRUNCATED], ids=["invalid-utf8", "truncated"])
@pytest.mark.parametrize("which", ["engine", "front"])
def test_reflection_requests_that_do_not_parse_are_invalid_argument(pair, which, payload):
    # Reflection streams its requests, so grpc parses them inside the servicer: once UNKNOWN and a traceback.
    service = pair[1] if which == "engine" else pair[0]
    logged = service.log.stat().st_size
    reflect = service.channel.stream_stream(REFLECTION)
    with pytest.raises(grpc.RpcError) as error:
        list(reflect(iter([payload]), timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in error.value.details()
    listing = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    answer = reflection_pb2.ServerReflectionResponse.FromString(next(reflect(iter([listing]), timeout=10)))
    assert reflection_pb2.ServiceResponse(name="grpc.health.v1.Health") in answer.list_services_response.service
    with open(service.log, "rb") as log:
        log.seek(logged)
        assert b"Traceback" not in log.read()


def test_a_stream_unary_request_that_does_not_parse_is_invalid_argument(caplog):
    # The services have no stream-unary RPC: a real server with the guard stands in for one.
    async def count(requests, context):
        return b"%d" % len([request async for request in requests])

    async def main():
        server = grpc.aio.server(interceptors=[DecodeGuard()])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Counter", {
            "Count": grpc.stream_unary_rpc_method_handler(count, health_pb2.HealthCheckRequest.FromString)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_unary("/test.Counter/Count")  # no serializers: raw bytes
                assert await call(iter([b"", b""]), timeout=10) == b"2"
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call(iter([b"", INVALID_UTF8]), timeout=10)  # HealthCheckRequest's field 1 is a string
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "not a valid protobuf message" in error.value.details()
        finally:
            await server.stop(None)

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@FUZZ
@given(method=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=200))
def test_random_bytes(pair, method, payload):
    answered(lambda: raw_call(pair, method, payload))


def test_oversized_messages_are_resource_exhausted(front, engine):
    # gRPC's default 4 MiB receive limit on the tokenizer service; the engine's is --max-message-bytes.
    with pytest.raises(grpc.RpcError) as error:
        front.stub.Tokenize(tpb.TokenizeRequest(text="x" * (5 << 20)), timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.value.details()
    # A prompt far past the model length, still under the limits: refused by the length check.
    code = answered(lambda: front.stub.Generate(tpb.TextGenerateRequest(prompt="hi " * 500_000), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
