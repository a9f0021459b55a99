"""TLS, mutual TLS and bearer tokens through the real services: an engine that requires client certificates,
and tokenizer services in front of it over TLS, driven through the generated stubs and pagoda_client on
loopback ports, with throwaway certificates made here."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pagoda.v1 import engine_pb2 as epb
from pagoda.v1 import engine_pb2_grpc, tokenizer_pb2_grpc
from pagoda.v1 import tokenizer_pb2 as tpb
from pagoda_client import Client, UnauthenticatedError, cli
from pagoda_tokenizer.config import TokenizerConfig
from tests.conftest import make_tiny_model
from tests.test_tokenizer_metrics import scrape, value
from tests.test_tokenizer_service import Engine, Front, free_port, wait_for
from tests.tls_helpers import KeyPair, Pki, make_pki
from tests.tokenizer_helpers import byte_level_tokenizer_json, write_tokenizer_dir

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-Token-4-tests"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
SERVING = health_pb2.HealthCheckResponse.SERVING


def credentials(pki: Pki, client: KeyPair | None = None) -> grpc.ChannelCredentials:
    """TLS trusting the test CA, presenting `client`'s certificate when given."""
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    return grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes(), private_key=client.key.read_bytes(),
                                        certificate_chain=client.cert.read_bytes())


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    """The code a health check on `channel` fails with (the TLS handshake is refused before any RPC)."""
    with channel, pytest.raises(grpc.RpcError) as error:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return error.value.code()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-tls"), "LlamaForCausalLM", vocab_size=400, bos_token_id=0,
                           eos_token_id=2)
    return write_tokenizer_dir(path, byte_level_tokenizer_json(400))


@pytest.fixture(scope="module")
def engine(tiny_dir, pki, tmp_path_factory) -> Iterator[Engine]:
    """An engine that requires a client certificate from the test CA (mutual TLS)."""
    log = tmp_path_factory.mktemp("engine-logs") / "engine.log"
    engine = Engine(tiny_dir, log, "--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key),
                    "--tls-client-ca-file", str(pki.ca), credentials=credentials(pki, pki.client))
    try:
        engine.wait_serving()
        yield engine
    finally:
        engine.stop()


def engine_flags(pki: Pki) -> list[str]:
    """The tokenizer service's flags for TLS to `engine`, with the client certificate it requires."""
    return ["--engine-tls-ca-file", str(pki.ca), "--engine-tls-cert-file", str(pki.client.cert),
            "--engine-tls-key-file", str(pki.client.key)]


@pytest.fixture(scope="module")
def front(tiny_dir, pki, engine, tmp_path_factory) -> Iterator[Front]:
    """TLS for clients, a bearer token read from a file, mutual TLS to the engine; logging everything; metrics
    on ``front.metrics_port``."""
    logs = tmp_path_factory.mktemp("front-logs")
    (logs / "token").write_text(TOKEN + "\n")
    metrics_port = free_port()
    front = Front(tiny_dir, [engine.address], logs / "front.log", "--tls-cert-file", str(pki.server.cert),
                  "--tls-key-file", str(pki.server.key), "--auth-token-file", str(logs / "token"),
                  "--log-level", "DEBUG", "--metrics-port", str(metrics_port), *engine_flags(pki),
                  credentials=credentials(pki))
    front.metrics_port = metrics_port
    try:
        front.wait_serving()  # health needs no token
        yield front
    finally:
        front.stop()


def target(service: Engine | Front) -> str:
    return f"127.0.0.1:{service.port}"


# ---- TLS and mutual TLS ----


def test_the_engine_requires_a_client_certificate_from_its_ca(engine, pki):
    assert refused(grpc.insecure_channel(target(engine))) == grpc.StatusCode.UNAVAILABLE
    assert refused(grpc.secure_channel(target(engine), credentials(pki))) == grpc.StatusCode.UNAVAILABLE
    stranger = grpc.secure_channel(target(engine), credentials(pki, pki.stranger))
    assert refused(stranger) == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(target(engine), credentials(pki, pki.client)) as channel:
        request = epb.GenerateRequest(prompt_token_ids=[5, 6, 7],
                                      sampling_params=epb.SamplingParams(max_tokens=4, ignore_eos=True))
        responses = list(engine_pb2_grpc.EngineStub(channel).Generate(request, timeout=10))
    assert sum(len(r.token_ids) for r in responses) == 4
    assert responses[-1].finish_reason == epb.FINISH_REASON_LENGTH


def test_the_tokenizer_service_streams_from_a_tls_engine(front, pki):
    with Client(target(front), token=TOKEN, credentials=credentials(pki)) as client:
        stream = client.generate("Hello over TLS", max_tokens=8, temperature=0.0,
                                 sampling=epb.SamplingParams(ignore_eos=True))
        deltas = list(stream)
    assert stream.finish_reason == "length" and stream.usage.completion_tokens == 8
    assert "".join(deltas) == stream.text


def test_the_tokenizer_service_refuses_plaintext(front):
    assert refused(grpc.insecure_channel(target(front))) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_on_the_tokenizer_service(tiny_dir, pki, engine, tmp_path):
    front = Front(tiny_dir, [engine.address], tmp_path / "front.log", "--tls-cert-file", str(pki.server.cert),
                  "--tls-key-file", str(pki.server.key), "--tls-client-ca-file", str(pki.ca), *engine_flags(pki),
                  credentials=credentials(pki, pki.client))
    try:
        front.wait_serving()
        assert refused(grpc.secure_channel(target(front), credentials(pki))) == grpc.StatusCode.UNAVAILABLE
        stranger = grpc.secure_channel(target(front), credentials(pki, pki.stranger))
        assert refused(stranger) == grpc.StatusCode.UNAVAILABLE
        with Client(target(front), credentials=credentials(pki, pki.client)) as client:
            assert client.tokenize("accepted").token_ids
            assert client.generate("accepted", max_tokens=3, sampling=epb.SamplingParams(ignore_eos=True)).read()
        tls_flags = ["--target", target(front), "--ca-cert", str(pki.ca)]
        assert cli.main([*tls_flags, "--client-cert", str(pki.client.cert), "--client-key", str(pki.client.key),
                         "health"]) == 0
        assert cli.main([*tls_flags, "--timeout", "2", "health"]) == 1
    finally:
        front.stop()


# ---- bearer tokens ----


@pytest.mark.parametrize(("metadata", "words"), [
    ((), "missing 'authorization: Bearer <token>'"),
    ((("authorization", "Bearer wrong-token"),), "invalid bearer token"),
    ((("authorization", f"Bearer {TOKEN}x"),), "invalid bearer token"),
    ((("authorization", f"Basic {TOKEN}"),), "must be 'Bearer <token>'"),
])
def test_calls_without_the_right_token_are_unauthenticated(front, metadata, words):
    stub = tokenizer_pb2_grpc.TokenizerStub(front.channel)
    calls = [lambda: stub.Tokenize(tpb.TokenizeRequest(text="hi"), metadata=metadata, timeout=5),
             lambda: list(stub.Generate(tpb.TextGenerateRequest(prompt="hi"), metadata=metadata, timeout=5)),
             lambda: stub.GetModelInfo(epb.GetModelInfoRequest(), metadata=metadata, timeout=5)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == UNAUTHENTICATED and words in error.value.details()


def test_refused_calls_are_counted_unauthenticated(front):
    """The metrics interceptor sits outside the token check: a refused call counts, under the status it got."""
    def refusals() -> dict[str, float]:
        metrics = scrape(front.metrics_port)
        return {method: value(metrics, "pagoda_tokenizer_requests_finished_total", method=method,
                              code="UNAUTHENTICATED") for method in ("Tokenize", "Generate")}

    stub = tokenizer_pb2_grpc.TokenizerStub(front.channel)
    before = refusals()
    for call in (lambda: stub.Tokenize(tpb.TokenizeRequest(text="hi"), timeout=5),
                 lambda: list(stub.Generate(tpb.TextGenerateRequest(prompt="hi"), timeout=5))):
        with pytest.raises(grpc.RpcError):
            call()
    # A refusal's status can reach the client a moment before the service counts it.
    wait_for(lambda: refusals() == {method: count + 1 for method, count in before.items()}, 5, "the refusals")


def test_the_client_with_the_right_token_is_served_and_with_a_wrong_one_refused(front, pki):
    with Client(target(front), token=TOKEN, credentials=credentials(pki)) as client:
        assert client.model_info().num_healthy_engines == 1
        assert client.detokenize(client.tokenize("round trip").token_ids) == "round trip"
    with Client(target(front), token="not-it", credentials=credentials(pki)) as client, \
            pytest.raises(UnauthenticatedError, match="invalid bearer token"):
        client.tokenize("hi")


def test_health_and_reflection_need_no_token(front, pki):
    with Client(target(front), credentials=credentials(pki)) as client:
        assert client.health() == "SERVING" and client.health("pagoda.v1.Tokenizer") == "SERVING"
    services = ProtoReflectionDescriptorDatabase(front.channel).get_services()
    assert {"pagoda.v1.Tokenizer", "grpc.health.v1.Health"} <= set(services)


def test_tokens_never_reach_the_log(front, pki):
    """Neither the configured token nor a near miss shows in the log, even at DEBUG."""
    near_miss = TOKEN[:-1] + "?"
    with Client(target(front), token=TOKEN, credentials=credentials(pki)) as client:
        client.generate("log me", max_tokens=2).read()
    with Client(target(front), token=near_miss, credentials=credentials(pki)) as client, \
            pytest.raises(UnauthenticatedError):
        client.generate("log me", max_tokens=2).read()
    log = front.log.read_text()
    assert "TLS, bearer token required" in log and "refused /pagoda.v1.Tokenizer/Generate" in log
    assert TOKEN not in log and near_miss not in log


# ---- configuration ----


def test_token_settings_come_from_the_environment_and_stay_out_of_repr():
    config = TokenizerConfig.from_args(["--model", "m"], env={"PAGODA_AUTH_TOKEN": TOKEN})
    assert config.auth_token == TOKEN and TOKEN not in repr(config)


@pytest.mark.parametrize("flags", [
    ["--auth-token", TOKEN, "--auth-token-file", "token"],
    ["--tls-cert-file", "cert.pem"],
    ["--tls-client-ca-file", "ca.pem"],
    ["--engine-tls-cert-file", "c.pem", "--engine-tls-key-file", "c.key"],
])
def test_settings_that_do_not_go_together_are_refused(flags):
    with pytest.raises(SystemExit):
        TokenizerConfig.from_args(["--model", "m", *flags], env={})


@pytest.mark.parametrize("service", ["pagoda_tokenizer", "pagoda_engine"])
def test_a_missing_tls_file_stops_the_service_with_its_name(service, tiny_dir, pki, tmp_path):
    missing = tmp_path / "no-such-cert.pem"
    command = [sys.executable, "-m", service, "--model", str(tiny_dir), "--port", str(free_port()),
               "--tls-cert-file", str(missing), "--tls-key-file", str(pki.server.key)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and str(missing) in done.stderr and "Traceback" not in done.stderr
