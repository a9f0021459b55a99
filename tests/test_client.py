"""The Python client library (pagoda_client) and the `pagoda` CLI against real services: an engine on the
CPU and the tokenizer service in front of it, serving SmolLM2-135M-Instruct on loopback ports (started by
pagoda_client.demo.local_services, which `make demo` uses too)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from pagoda.v1 import engine_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from pagoda_client import (
    AsyncClient,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    PagodaError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    cli,
)
from pagoda_client.demo import free_port, local_services
from pagoda_client.errors import from_rpc_error

pytestmark = pytest.mark.timeout(180)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def target(smollm2_dir, tmp_path_factory) -> Iterator[str]:
    with local_services(smollm2_dir, tmp_path_factory.mktemp("client-logs"), engine_args=["--cpu-kv-cache-gib", "0.25"]
                        ) as address:
        yield address


@pytest.fixture
def client(target) -> Iterator[Client]:
    with Client(target) as client:
        yield client


# ---- sync client ----

def test_chat_streams_text_deltas(client):
    with client.chat(FRANCE, temperature=0.0, max_tokens=32) as stream:
        deltas = list(stream)
    assert len(deltas) > 1 and "".join(deltas) == stream.text
    assert "Paris" in stream.text
    assert stream.finish_reason == "stop"
    assert stream.usage.completion_tokens == len(stream.token_ids) > 1
    assert stream.request_id


def test_generate_stops_at_max_tokens_and_at_stop_strings(client):
    stream = client.generate("Once upon a time", max_tokens=6, temperature=0.7, seed=3)
    stream.read()
    assert stream.finish_reason == "length" and stream.usage.completion_tokens == 6
    # Seeded sampling repeats; a stop string cuts the text before its first match.
    assert client.generate("Once upon a time", max_tokens=6, temperature=0.7, seed=3).read() == stream.text
    cut = stream.text.split()[1]
    stopped = client.generate("Once upon a time", max_tokens=6, temperature=0.7, seed=3, stop=[cut])
    assert cut not in stopped.read() and stopped.finish_reason == "stop"


def test_sampling_message_carries_other_fields(client):
    sampling = engine_pb2.SamplingParams(ignore_eos=True, temperature=0, logprobs=2)
    stream = client.chat(FRANCE, max_tokens=5, sampling=sampling)
    stream.read()
    assert stream.usage.completion_tokens == 5 and stream.finish_reason == "length"
    assert [entry.sampled.token_id for entry in stream.logprobs] == stream.token_ids
    assert all(len(entry.top) == 2 and entry.sampled.token for entry in stream.logprobs)


def test_logprobs_options_and_summary(client):
    prompt_ids = client.tokenize("The sky is").token_ids
    # The named options override the sampling message's fields.
    stream = client.generate("The sky is", max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=0,
                             sampling=engine_pb2.SamplingParams(logprobs=5))
    stream.read()
    assert [entry.sampled.token_id for entry in stream.logprobs] == stream.token_ids
    assert all(len(entry.top) == 2 for entry in stream.logprobs)
    assert [entry.sampled.token_id for entry in stream.prompt_logprobs] == prompt_ids[1:]
    summary = stream.summary()
    assert [entry["token_id"] for entry in summary["logprobs"]] == stream.token_ids
    assert [entry["token"] for entry in summary["logprobs"]] == [entry.sampled.token for entry in stream.logprobs]
    for written, wire in zip(summary["logprobs"], stream.logprobs, strict=True):
        # float32 on the wire, written as its shortest decimal: the same float32 once read back.
        assert struct.unpack("f", struct.pack("f", written["logprob"]))[0] == wire.sampled.logprob
        assert written["rank"] == 1 + [top.token_id for top in wire.top].index(wire.sampled.token_id)  # greedy
    assert all(entry["top"] == [] and entry["rank"] is None for entry in summary["prompt_logprobs"])
    # Not asked for: not in the summary.
    plain = client.generate("The sky is", max_tokens=1)
    plain.read()
    assert "logprobs" not in plain.summary() and "prompt_logprobs" not in plain.summary()


def test_logit_bias_and_allowed_token_ids_options(client):
    forced = client.tokenize("Hello world").token_ids[-1]
    # Ids as decimal strings too, as OpenAI's JSON has them.
    stream = client.generate("Once upon a time", max_tokens=4, temperature=0, logit_bias={str(forced): 100})
    stream.read()
    assert stream.token_ids == [forced] * 4
    allowed = [forced, forced + 1, forced + 2]
    # The option replaces the sampling message's list, as the scalar options replace its fields.
    stream = client.generate("Once upon a time", max_tokens=6, seed=2, allowed_token_ids=allowed,
                             sampling=engine_pb2.SamplingParams(allowed_token_ids=[0], logit_bias={0: 100}))
    stream.read()
    assert set(stream.token_ids) <= set(allowed) and stream.finish_reason == "length"
    with pytest.raises(InvalidArgumentError, match="logit_bias values must be in"):
        client.generate("Hello", logit_bias={forced: 101}).read()


def test_abort_ends_a_running_stream(client):
    endless = engine_pb2.SamplingParams(ignore_eos=True, max_tokens=4000)
    stream = client.generate("Count to ten thousand:", sampling=endless, request_id="client-test-abort")
    next(iter(stream))
    assert client.abort("client-test-abort")
    stream.read()
    assert stream.finish_reason == "abort"
    assert not client.abort("client-test-abort")


def test_one_stop_string_is_one_string(client):
    full = client.generate("Once upon a time", max_tokens=8, temperature=0.0).read()
    word = full.split()[2]
    assert client.generate("Once upon a time", max_tokens=8, temperature=0.0, stop=word).read() == \
        full[: full.index(word)]


def test_tokenize_detokenize_info_health(client):
    tokens = client.tokenize("Hello world")
    assert client.detokenize(tokens.token_ids) == "Hello world"
    chat = client.tokenize(FRANCE)
    assert "France" in chat.prompt and len(chat.token_ids) > len(tokens.token_ids)
    info = client.model_info()
    assert info.model.model_name == "SmolLM2-135M-Instruct" and info.has_chat_template
    assert client.health() == "SERVING"
    client.wait_until_serving(timeout=5)


def test_errors_are_typed_and_carry_the_status(client):
    with pytest.raises(InvalidArgumentError) as caught:
        client.generate("Hello", stop=[""]).read()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.details
    with pytest.raises(InvalidArgumentError):
        client.detokenize([10**9])
    with pytest.raises(ValueError, match="n > 1"):
        client.generate("Hello", sampling=engine_pb2.SamplingParams(n=2))
    with pytest.raises(TypeError, match="unknown options"):
        client.generate("Hello", max_token=3)


def test_unreachable_service_is_unavailable():
    with Client(f"127.0.0.1:{free_port()}", timeout=2) as client:
        with pytest.raises(UnavailableError):
            client.health()
        with pytest.raises(UnavailableError, match="not serving after"):
            client.wait_until_serving(timeout=0.5)


class _FakeCall(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"


@pytest.mark.parametrize("code, kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
    (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
    (grpc.StatusCode.INTERNAL, PagodaError),
])
def test_status_codes_map_to_error_classes(code, kind):
    error = from_rpc_error(_FakeCall(code))
    assert type(error) is kind and error.code == code and str(error) == f"{code.name}: details"


class _EchoAuthorization(tokenizer_pb2_grpc.TokenizerServicer):
    def Detokenize(self, request, context):
        return tokenizer_pb2.DetokenizeResponse(text=dict(context.invocation_metadata()).get("authorization", ""))


def test_bearer_token_is_sent_as_metadata():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(_EchoAuthorization(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", token="s3cret") as client:
            assert client.detokenize([1]) == "Bearer s3cret"
        with Client(f"127.0.0.1:{port}") as client:
            assert client.detokenize([1]) == ""
    finally:
        server.stop(None)


# ---- asyncio client ----

def test_async_client(target):
    async def run() -> None:
        async with AsyncClient(target) as client:
            await client.wait_until_serving(timeout=5)
            assert await client.health() == "SERVING"
            stream = client.chat(FRANCE, temperature=0.0, max_tokens=32)
            deltas = [delta async for delta in stream]
            assert len(deltas) > 1 and "Paris" in stream.text and stream.finish_reason == "stop"
            # Two streams at once on one channel.
            texts = await asyncio.gather(*(client.generate("The sky is", max_tokens=4, seed=s).read() for s in (1, 2)))
            assert all(texts)
            tokens = await client.tokenize("Hello world")
            assert await client.detokenize(tokens.token_ids) == "Hello world"
            scored = client.generate("The sky is", max_tokens=2, logprobs=1, prompt_logprobs=0)
            await scored.read()
            summary = scored.summary()
            assert [entry["token_id"] for entry in summary["logprobs"]] == scored.token_ids
            assert len(summary["prompt_logprobs"]) == summary["usage"]["prompt_tokens"] - 1
            assert (await client.model_info()).model.model_name == "SmolLM2-135M-Instruct"
            with pytest.raises(InvalidArgumentError):
                await client.generate("Hello", stop=[""]).read()
            assert not await client.abort("no-such-request")

    asyncio.run(run())


# ---- the CLI ----

def run_cli(target: str, *args: str, stdin: str = "", monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(["--target", target, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_streams_and_json(target, monkeypatch, capsys):
    code, out, _ = run_cli(target, "generate", "Once upon a time", "--max-tokens", "5", "--seed", "1",
                           monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and out.strip()
    code, out, _ = run_cli(target, "generate", "--max-tokens", "5", "--seed", "1", "--json",
                           stdin="Once upon a time", monkeypatch=monkeypatch, capsys=capsys)
    answer = json.loads(out)
    assert code == 0 and answer["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 5
    assert "logprobs" not in answer and "prompt_logprobs" not in answer  # only when asked for


@pytest.mark.parametrize(("args", "words"), [
    (("generate", "hi", "--max-tokens", "-3"), "-3 is not in [1, 4294967295]"),
    (("generate", "hi", "--seed", "-1"), "-1 is not in [0, 9223372036854775807]"),
    (("detokenize", "-1"), "-1 is not in [0, 4294967295]"),
    (("generate", "hi", "--logit-bias", "5"), "'5' is not ID=BIAS"),
    (("generate", "hi", "--logit-bias", "x=2"), "invalid ID=BIAS value: 'x=2'"),
    (("generate", "hi", "--allowed-token-id", "-1"), "-1 is not in [0, 4294967295]"),
    (("generate", "hi", "--logprobs", "-1"), "-1 is not in [0, 4294967295]"),
    (("chat", "--once", "hi", "--prompt-logprobs", "-2"), "-2 is not in [0, 4294967295]"),
    (("generate", "hi", "--logprobs", "two"), "invalid integer value: 'two'"),
])
def test_cli_out_of_range_numbers_are_usage_errors(target, args, words, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(target, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_cli_logit_bias_and_allowed_token_ids(target, monkeypatch, capsys):
    _, out, _ = run_cli(target, "tokenize", "Hello world", monkeypatch=monkeypatch, capsys=capsys)
    forced = out.split()[-1]
    _, expected, _ = run_cli(target, "detokenize", forced, forced, forced, monkeypatch=monkeypatch, capsys=capsys)
    code, out, _ = run_cli(target, "generate", "Once upon a time", "--max-tokens", "3", "--seed", "1",
                           "--logit-bias", f"{forced}=100", "--logit-bias", "2=-5.5", "--allowed-token-id", forced,
                           "--allowed-token-id", "2", "--json", monkeypatch=monkeypatch, capsys=capsys)
    answer = json.loads(out)
    assert code == 0 and answer["text"] + "\n" == expected and answer["finish_reason"] == "length"


def test_structured_output_options(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"]}
    stream = client.chat(FRANCE, max_tokens=60, temperature=0.0, json_schema=schema)
    answer = json.loads(stream.read())
    assert set(answer) == {"city", "population"} and isinstance(answer["population"], int)
    assert stream.finish_reason == "stop"
    phone = client.generate("Call me at", max_tokens=20, temperature=0.7, seed=5, regex=r" \d{3}-\d{4}").read()
    assert re.fullmatch(r" \d{3}-\d{4}", phone), phone
    assert client.chat(FRANCE, max_tokens=5, temperature=0.0, choice=["Rome", "Paris"]).read() == "Paris"
    with pytest.raises(InvalidArgumentError, match="regex"):
        client.generate("hi", max_tokens=5, regex="(unclosed").read()
    with pytest.raises(ValueError, match="at most one"):
        client.generate("hi", regex="a", json_object=True)


def test_cli_structured_output(target, monkeypatch, capsys, tmp_path):
    code, out, _ = run_cli(target, "chat", "--once", "What is the capital of France?", "--temperature", "0",
                           "--choice", "Paris", "--choice", "Rome", "--json", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and json.loads(out)["text"] == "Paris"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    code, out, _ = run_cli(target, "generate", "Status:", "--max-tokens", "20", "--json-schema", f"@{schema}",
                           "--json", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and isinstance(json.loads(json.loads(out)["text"])["ok"], bool)
    with pytest.raises(SystemExit) as exit_:
        run_cli(target, "generate", "hi", "--json-schema", f"@{tmp_path / 'missing.json'}",
                monkeypatch=monkeypatch, capsys=capsys)
    assert exit_.value.code == 2 and "cannot read" in capsys.readouterr().err


def assert_logprob_entries(entries: list[dict], token_ids: list[int], k: int) -> None:
    """The CLI's JSON logprobs: one entry per token of ``token_ids``, each a logprob <= 0 with k alternatives,
    most likely first, and a rank that points at the token among them (or None when it is not there)."""
    assert [entry["token_id"] for entry in entries] == token_ids
    for entry in entries:
        assert entry["logprob"] <= 0 and entry["token"], entry
        assert len(entry["top"]) == k
        top_ids = [top["token_id"] for top in entry["top"]]
        assert entry["rank"] == (top_ids.index(entry["token_id"]) + 1 if entry["token_id"] in top_ids else None)
        assert all(top["logprob"] <= 0 and top["token"] for top in entry["top"])
        assert [top["logprob"] for top in entry["top"]] == sorted((top["logprob"] for top in entry["top"]),
                                                                  reverse=True)


def test_cli_generate_logprobs_json(target, monkeypatch, capsys):
    _, out, _ = run_cli(target, "tokenize", "The sky is", monkeypatch=monkeypatch, capsys=capsys)
    prompt_ids = [int(token) for token in out.split()]
    code, out, _ = run_cli(target, "generate", "The sky is", "--max-tokens", "4", "--temperature", "0",
                           "--logprobs", "3", "--prompt-logprobs", "2", "--json", monkeypatch=monkeypatch,
                           capsys=capsys)
    answer = json.loads(out)
    assert code == 0 and answer["finish_reason"] == "length"
    # One entry per generated token; greedy, so the sampled token is among the top ones (the first).
    logprobs = answer["logprobs"]
    assert len(logprobs) == answer["usage"]["completion_tokens"] == 4
    assert_logprob_entries(logprobs, [entry["token_id"] for entry in logprobs], 3)
    assert all(entry["rank"] == 1 for entry in logprobs)
    assert "".join(entry["token"] for entry in logprobs) == answer["text"]
    # One entry per prompt token from the second on; a scored prompt skips the prefix cache.
    assert len(answer["prompt_logprobs"]) == answer["usage"]["prompt_tokens"] - 1 == len(prompt_ids) - 1
    assert_logprob_entries(answer["prompt_logprobs"], prompt_ids[1:], 2)
    assert answer["usage"]["cached_prompt_tokens"] == 0


def test_cli_chat_logprobs_json(target, monkeypatch, capsys):
    _, out, _ = run_cli(target, "tokenize", "--chat", "Hi", "--json", monkeypatch=monkeypatch, capsys=capsys)
    prompt_ids = json.loads(out)["token_ids"]
    code, out, _ = run_cli(target, "chat", "--once", "Hi", "--max-tokens", "3", "--seed", "4", "--logprobs", "0",
                           "--prompt-logprobs", "0", "--json", monkeypatch=monkeypatch, capsys=capsys)
    answer = json.loads(out)
    assert code == 0 and len(answer["logprobs"]) == answer["usage"]["completion_tokens"] > 0
    # 0: the token's own logprob only, so no alternatives and no rank.
    assert_logprob_entries(answer["logprobs"], [entry["token_id"] for entry in answer["logprobs"]], 0)
    assert all(entry["rank"] is None for entry in answer["logprobs"])
    assert_logprob_entries(answer["prompt_logprobs"], prompt_ids[1:], 0)
    assert len(answer["prompt_logprobs"]) == answer["usage"]["prompt_tokens"] - 1


def test_cli_logprobs_table_goes_to_stderr(target, monkeypatch, capsys):
    code, plain, err = run_cli(target, "generate", "The sky is", "--max-tokens", "3", "--temperature", "0",
                               monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and err == ""
    code, out, err = run_cli(target, "generate", "The sky is", "--max-tokens", "3", "--temperature", "0",
                             "--logprobs", "2", "--prompt-logprobs", "1", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and out == plain  # stdout keeps the text alone
    lines = err.splitlines()
    prompt_at = lines.index("prompt logprobs (position in the prompt): 2 tokens")
    answer_at = lines.index("logprobs (position in the answer): 3 tokens")
    assert answer_at == prompt_at + 4  # title, header, two rows
    header = lines[answer_at + 1].split()
    assert header == ["pos", "id", "token", "logprob", "rank", "top"]
    # Position, token id, the token's text as a JSON string, logprob, rank, then the alternatives.
    row = re.compile(r'\s*(\d+)\s+(\d+)\s+("(?:[^"\\]|\\.)*")\s+(\S+)\s+(\S+)\s+(.*)')
    rows = [row.fullmatch(line) for line in lines[answer_at + 2:]]
    assert all(rows) and [int(match[1]) for match in rows] == [0, 1, 2], lines
    assert "".join(json.loads(match[3]) for match in rows) + "\n" == plain
    assert all(float(match[4]) <= 0 and match[5] == "1" and match[6].startswith(match[3]) for match in rows)  # greedy
    assert [row.fullmatch(line)[1] for line in lines[prompt_at + 2:answer_at]] == ["1", "2"]  # from the second on


def test_cli_logprobs_past_the_engines_cap_are_its_invalid_argument(target, monkeypatch, capsys):
    _, out, _ = run_cli(target, "info", "--json", monkeypatch=monkeypatch, capsys=capsys)
    cap = json.loads(out)["model"]["max_logprobs"]
    for flag, field in (("--logprobs", "logprobs"), ("--prompt-logprobs", "prompt_logprobs")):
        code, _, err = run_cli(target, "generate", "Hello", "--max-tokens", "1", flag, str(cap + 1),
                               monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and err == f"pagoda: error: INVALID_ARGUMENT: {field} must be in [0, {cap}], got {cap + 1}\n"
    code, _, _ = run_cli(target, "generate", "Hello", "--max-tokens", "1", "--logprobs", str(cap), "--json",
                         monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0


def test_cli_unreadable_certificate_is_one_line(target, monkeypatch, capsys):
    code = cli.main(["--target", target, "--ca-cert", "/nonexistent.pem", "info"])
    assert code == 1 and capsys.readouterr().err.startswith("pagoda: error: ")


def test_cli_chat_once(target, monkeypatch, capsys):
    code, out, _ = run_cli(target, "chat", "--once", "What is the capital of France?", "--temperature", "0",
                           "--max-tokens", "32", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "Paris" in out


def test_cli_chat_keeps_the_conversation(target, monkeypatch, capsys):
    lines = "My name is Ada.\n\nWhat did I just tell you?\n"
    code, out, _ = run_cli(target, "chat", "--system", "Be brief.", "--temperature", "0", "--max-tokens", "24",
                           "--json", stdin=lines, monkeypatch=monkeypatch, capsys=capsys)
    first, second = (json.loads(line) for line in out.splitlines())
    assert code == 0
    # The second turn's prompt holds the first question and answer (and the blank line was skipped).
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]


def test_cli_tokenize_detokenize_health_info(target, monkeypatch, capsys):
    code, out, _ = run_cli(target, "tokenize", "Hello world", monkeypatch=monkeypatch, capsys=capsys)
    ids = out.split()
    assert code == 0 and ids
    code, out, _ = run_cli(target, "detokenize", *ids, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and out == "Hello world\n"
    code, out, _ = run_cli(target, "tokenize", "--chat", "hi", "--json", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "<|im_start|>" in json.loads(out)["prompt"]
    code, out, _ = run_cli(target, "health", monkeypatch=monkeypatch, capsys=capsys)
    assert (code, out) == (0, "SERVING\n")
    code, out, _ = run_cli(target, "info", "--json", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and json.loads(out)["model"]["model_name"] == "SmolLM2-135M-Instruct"
    code, out, _ = run_cli(target, "info", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "SmolLM2-135M-Instruct" in out


def test_cli_reports_errors_with_exit_status_1(target, monkeypatch, capsys):
    code, _, err = run_cli(target, "generate", "Hello", "--stop", "", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.startswith("pagoda: error: INVALID_ARGUMENT:")
    code, _, err = run_cli(f"127.0.0.1:{free_port()}", "health", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "UNAVAILABLE" in err


def test_console_script(target):
    script = Path(sys.executable).parent / "pagoda"
    assert script.exists(), "the `pagoda` console script is missing: reinstall (pip install -e .)"
    result = subprocess.run([str(script), "--target", target, "health", "--wait", "10"], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "SERVING\n"), result.stderr


# ---- make demo ----

def test_demo_streams_an_answer_and_stops_the_services(smollm2_dir):
    result = subprocess.run([sys.executable, "-m", "pagoda_client.demo", "--model", str(smollm2_dir),
                             "--max-tokens", "32", "What is the capital of France?"],
                            capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "done" in result.stderr
