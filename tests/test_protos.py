"""The wire contracts: committed stubs match protos/, every element is documented, the messages behave
as their comments promise, and both services work end to end over a real gRPC channel."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from pagoda.v1 import engine_pb2, engine_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
STUBS = ROOT / "clients" / "python" / "pagoda" / "v1"
PROTO_FILES = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "pagoda" / "v1").glob("*.proto"))


def _protoc(*args: str) -> None:
    # The GPU machine runs the stubs without grpcio-tools; only where it is installed can we regenerate.
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", *args, *PROTO_FILES],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"


def test_committed_stubs_match_protos(tmp_path):
    _protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    fresh = tmp_path / "pagoda" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated, "protoc generated nothing"
    committed = sorted(p.name for p in STUBS.iterdir() if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name)
    stale = [name for name in generated if not (STUBS / name).exists()
             or not filecmp.cmp(fresh / name, STUBS / name, shallow=False)]
    extra = sorted(set(committed) - set(generated))
    assert not stale and not extra, (
        f"the committed stubs in {STUBS.relative_to(ROOT)} are out of date with protos/ "
        f"(differ or missing: {stale}; no longer generated: {extra}): run `make proto` and commit the result"
    )


def test_every_element_is_documented(tmp_path):
    """The .proto is the documentation other languages read: every service, method, message, field, enum
    and enum value carries a leading comment (a comment above a run of fields covers only the first)."""
    from google.protobuf import descriptor_pb2

    out = tmp_path / "descriptors.pb"
    _protoc(f"--descriptor_set_out={out}", "--include_source_info")
    file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    missing = []
    for file in file_set.file:
        documented = {tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()}

        def need(path: tuple[int, ...], name: str, file=file, documented=documented) -> None:
            if path not in documented:
                missing.append(f"{file.name}: {name}")

        def walk_enum(enum, path, prefix):
            need(path, f"{prefix}{enum.name}")
            for i, value in enumerate(enum.value):
                need((*path, 2, i), f"{prefix}{enum.name}.{value.name}")

        def walk_message(message, path, prefix):
            name = f"{prefix}{message.name}"
            need(path, name)
            for i, field in enumerate(message.field):
                need((*path, 2, i), f"{name}.{field.name}")
            for i, nested in enumerate(message.nested_type):
                if not nested.options.map_entry:  # protoc's own message for a map field: nothing to comment
                    walk_message(nested, (*path, 3, i), f"{name}.")
            for i, enum in enumerate(message.enum_type):
                walk_enum(enum, (*path, 4, i), f"{name}.")

        # Field numbers of FileDescriptorProto / DescriptorProto / ServiceDescriptorProto in descriptor.proto.
        for i, message in enumerate(file.message_type):
            walk_message(message, (4, i), "")
        for i, enum in enumerate(file.enum_type):
            walk_enum(enum, (5, i), "")
        for i, service in enumerate(file.service):
            need((6, i), service.name)
            for j, method in enumerate(service.method):
                need((6, i, 2, j), f"{service.name}.{method.name}")
    assert not missing, "undocumented proto elements (add a comment above each):\n" + "\n".join(missing)


def test_unset_differs_from_zero_where_the_default_is_not_zero():
    params = engine_pb2.SamplingParams()
    for name in ("temperature", "top_p", "repetition_penalty", "seed", "max_tokens", "logprobs"):
        assert not params.HasField(name), name
    params.temperature = 0.0  # greedy: must survive the wire as "set to zero", not "unset"
    params.logprobs = 0
    decoded = engine_pb2.SamplingParams.FromString(params.SerializeToString())
    assert decoded.HasField("temperature") and decoded.temperature == 0.0
    assert decoded.HasField("logprobs") and decoded.logprobs == 0
    assert not decoded.HasField("top_p")
    # 0 must mean "not finished" so that a default message never claims a sample ended.
    assert engine_pb2.GenerateResponse().finish_reason == engine_pb2.FINISH_REASON_UNSPECIFIED == 0


def _sampling(**overrides) -> engine_pb2.SamplingParams:
    fields = dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
                  frequency_penalty=0.25, seed=2**63 - 1, max_tokens=32, min_tokens=2, stop_token_ids=[2, 7],
                  ignore_eos=False, logprobs=5, n=2, logit_bias={2**32 - 1: -100.0, 7: 0.5}, allowed_token_ids=[7, 9])
    fields.update(overrides)
    return engine_pb2.SamplingParams(**fields)


def _roundtrip(message):
    decoded = type(message).FromString(message.SerializeToString())
    assert decoded == message
    return decoded


def test_every_request_message_builds_and_roundtrips():
    chat = [tokenizer_pb2.ChatMessage(role="system", content="Be brief."),
            tokenizer_pb2.ChatMessage(role="user", content="Hi 👋 你好")]
    kwargs = tokenizer_pb2.ChatRequest().chat_template_kwargs
    kwargs.update({"enable_thinking": False})
    requests = [
        engine_pb2.GenerateRequest(request_id="r1", prompt_token_ids=[1, 2, 3, 2**32 - 1], sampling_params=_sampling()),
        engine_pb2.AbortRequest(request_id="r1"),
        engine_pb2.GetModelInfoRequest(),
        engine_pb2.GetLoadRequest(),
        tokenizer_pb2.TextGenerateRequest(request_id="t1", prompt="Once upon a time", add_special_tokens=False,
                                          sampling_params=_sampling(), stop=["\n\n", "The end"],
                                          include_stop_str_in_output=True, skip_special_tokens=False),
        tokenizer_pb2.ChatRequest(messages=chat, add_generation_prompt=True, chat_template_kwargs=kwargs,
                                  sampling_params=_sampling(temperature=0.0), stop=["</s>"]),
        tokenizer_pb2.TokenizeRequest(text="def f(x):\n    return x"),
        tokenizer_pb2.TokenizeRequest(chat=tokenizer_pb2.ChatMessages(messages=chat), add_generation_prompt=False),
        tokenizer_pb2.DetokenizeRequest(token_ids=[1, 2, 3], skip_special_tokens=True),
    ]
    for request in requests:
        _roundtrip(request)
    assert requests[0].sampling_params.seed == 2**63 - 1
    assert dict(requests[0].sampling_params.logit_bias) == {2**32 - 1: -100.0, 7: 0.5}
    assert requests[5].chat_template_kwargs["enable_thinking"] is False
    assert requests[7].WhichOneof("input") == "chat"


def test_response_messages_carry_what_the_comments_promise():
    top = [engine_pb2.Logprob(token_id=5, logprob=-0.1, token=" Paris"), engine_pb2.Logprob(token_id=9, logprob=-2.5)]
    response = engine_pb2.GenerateResponse(
        request_id="r1", index=1, token_ids=[5, 2],
        logprobs=[engine_pb2.TokenLogprobs(sampled=top[0], top=top), engine_pb2.TokenLogprobs(sampled=top[1])],
        finish_reason=engine_pb2.FINISH_REASON_STOP, stop_token_id=2,
        usage=engine_pb2.Usage(prompt_tokens=10, completion_tokens=7, cached_prompt_tokens=8),
    )
    assert _roundtrip(response).HasField("stop_token_id")
    text = tokenizer_pb2.TextGenerateResponse(index=0, text=" Paris", token_ids=[5],
                                              finish_reason=engine_pb2.FINISH_REASON_STOP, stop_string="\n")
    assert _roundtrip(text).WhichOneof("stop_reason") == "stop_string"
    text.stop_token_id = 2  # one oneof member replaces the other
    assert text.WhichOneof("stop_reason") == "stop_token_id"
    info = engine_pb2.ModelInfo(model_name="m", max_model_len=2048, eos_token_ids=[2], bos_token_id=0, block_size=16,
                                num_kv_blocks=100, kv_capacity_tokens=1600)
    assert _roundtrip(info).HasField("bos_token_id")  # token id 0 is a real BOS, not "none"
    _roundtrip(tokenizer_pb2.TokenizerModelInfo(model=info, has_chat_template=True, eos_tokens=["</s>"]))
    _roundtrip(engine_pb2.Load(num_running=3, kv_blocks_total=100, kv_blocks_used=40, kv_blocks_free=60,
                               prefix_cache_queried_tokens=1000, prefix_cache_hit_tokens=640, instance_id="abc"))


def test_services_declare_the_promised_methods():
    def methods(module, service):
        desc = module.DESCRIPTOR.services_by_name[service]
        return {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in desc.methods}

    assert methods(engine_pb2, "Engine") == {
        "Generate": ("GenerateRequest", "GenerateResponse", True),
        "Abort": ("AbortRequest", "AbortResponse", False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False),
        "GetLoad": ("GetLoadRequest", "Load", False),
    }
    assert methods(tokenizer_pb2, "Tokenizer") == {
        "Generate": ("TextGenerateRequest", "TextGenerateResponse", True),
        "Chat": ("ChatRequest", "TextGenerateResponse", True),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
        "Detokenize": ("DetokenizeRequest", "DetokenizeResponse", False),
        "GetModelInfo": ("GetModelInfoRequest", "TokenizerModelInfo", False),
        "Abort": ("AbortRequest", "AbortResponse", False),
    }


class _EchoEngine(engine_pb2_grpc.EngineServicer):
    """Streams the prompt back one token per message, per sample: enough to exercise the generated code."""

    def Generate(self, request, context):
        n = request.sampling_params.n or 1
        for index in range(n):
            for i, token in enumerate(request.prompt_token_ids):
                last = i == len(request.prompt_token_ids) - 1
                yield engine_pb2.GenerateResponse(
                    request_id=request.request_id, index=index, token_ids=[token],
                    finish_reason=engine_pb2.FINISH_REASON_LENGTH if last else engine_pb2.FINISH_REASON_UNSPECIFIED,
                    usage=engine_pb2.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=i + 1)
                    if last else None,
                )

    def GetLoad(self, request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")


class _UpperTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    def Detokenize(self, request, context):
        return tokenizer_pb2.DetokenizeResponse(text=" ".join(map(str, request.token_ids)))


@pytest.fixture
def channel():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    engine_pb2_grpc.add_EngineServicer_to_server(_EchoEngine(), server)
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(_UpperTokenizer(), server)
    port = server.add_insecure_port("127.0.0.1:0")  # port 0: the OS picks a free one, so parallel runs never collide
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        server.stop(grace=None)


def test_stubs_work_over_a_real_channel(channel):
    engine = engine_pb2_grpc.EngineStub(channel)
    request = engine_pb2.GenerateRequest(request_id="r", prompt_token_ids=[4, 5, 6],
                                         sampling_params=engine_pb2.SamplingParams(n=2))
    responses = list(engine.Generate(request, timeout=10))
    for index in range(2):
        mine = [r for r in responses if r.index == index]
        assert [t for r in mine for t in r.token_ids] == [4, 5, 6]
        assert [r.finish_reason for r in mine][-1] == engine_pb2.FINISH_REASON_LENGTH
        assert mine[-1].usage.completion_tokens == 3 and not mine[0].HasField("usage")

    with pytest.raises(grpc.RpcError) as error:
        engine.GetLoad(engine_pb2.GetLoadRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    tokenizer = tokenizer_pb2_grpc.TokenizerStub(channel)
    assert tokenizer.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=[1, 2]), timeout=10).text == "1 2"
    with pytest.raises(grpc.RpcError) as error:  # unimplemented methods answer UNIMPLEMENTED, not hang
        tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(text="x"), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
