"""Routing and request handling against scripted in-process engines: least-loaded choice, prefix affinity
and its load cap, forgetting a restarted engine, retrying an engine that refuses before any output, passing
mid-stream errors through, and aborting on the engine each sample a stop string ended."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

from pagoda.v1 import engine_pb2 as pb
from pagoda.v1 import engine_pb2_grpc
from pagoda_tokenizer.config import TokenizerConfig
from pagoda_tokenizer.engine_pool import STARTUP_GRACE_S, EnginePool
from pagoda_tokenizer.errors import RequestError
from pagoda_tokenizer.generation import Generation
from pagoda_tokenizer.prefix_affinity import PrefixAffinity
from pagoda_tokenizer.sample_stream import TextOptions
from pagoda_tokenizer.tokenizer import TextTokenizer
from tests.tokenizer_helpers import byte_level_tokenizer_json

pytestmark = pytest.mark.timeout(30)

TOKENIZER = TextTokenizer(Tokenizer.from_str(byte_level_tokenizer_json()), {})
BLOCK = 4


def pool_of(n: int, **config) -> EnginePool:
    pool = EnginePool(TokenizerConfig(model="m", engines=[f"e{i}:1" for i in range(n)], **config))
    for engine in pool.engines:
        engine.healthy = True
        engine.model_info = pb.ModelInfo(block_size=BLOCK)
        engine.load = pb.Load(instance_id="first")
    return pool


def test_prefix_keys_cover_whole_blocks_only():
    affinity = PrefixAffinity(max_blocks=3, capacity=100)
    assert affinity.keys([1, 2, 3], BLOCK) == []
    keys = affinity.keys(list(range(20)), BLOCK)
    assert len(keys) == 3 and keys == affinity.keys(list(range(12)) + [99], BLOCK)
    first, second = affinity.keys([0, 1, 2, 3, 4, 5, 6, 99], BLOCK)
    assert first == keys[0] and second != keys[1]  # the second block differs
    assert affinity.keys([9, 1, 2, 3], BLOCK) != keys[:1]


def test_least_loaded_then_affinity_within_the_load_cap():
    async def main():
        pool = pool_of(3, affinity_max_extra_load=4)
        loads = dict(zip(pool.engines, (5, 1, 3), strict=True))
        for engine, running in loads.items():
            engine.load.num_running = running
        prompt = list(range(16))
        first = pool.pick(prompt, exclude=set())
        assert first is pool.engines[1]  # least loaded
        first.in_flight = 4  # our own requests count at once, before the next load poll
        assert pool.pick(prompt, exclude=set()) is first  # 4 <= 3 + 4: affinity wins
        first.in_flight = 8
        assert pool.pick(prompt, exclude=set()) is pool.engines[2]  # too much busier: least loaded
        assert pool.pick(list(range(16, 32)), exclude=set()) is pool.engines[2]  # a new prefix: least loaded
        assert pool.pick(prompt, exclude={"e2:1", "e1:1"}) is pool.engines[0]
        pool.engines[0].healthy = False
        assert pool.pick(prompt, exclude={"e2:1", "e1:1"}) is None
        await pool.close()

    asyncio.run(main())


def test_a_restarted_engine_loses_its_affinity():
    async def main():
        pool = pool_of(2)
        pool.engines[1].load.num_running = 1
        prompt = list(range(16))
        assert pool.pick(prompt, exclude=set()) is pool.engines[0]
        pool.engines[0].load.num_running = 2
        assert pool.pick(prompt, exclude=set()) is pool.engines[0]  # sticky
        pool.engines[0]._update_load(pb.Load(num_running=2, instance_id="second"))
        assert pool.pick(prompt, exclude=set()) is pool.engines[1]  # forgotten: least loaded
        await pool.close()

    asyncio.run(main())


# Scripted engines on loopback ports, in this process.

class ScriptedEngine(engine_pb2_grpc.EngineServicer):
    def __init__(self, script):
        self.script = script
        self.requests: list[pb.GenerateRequest] = []
        self.aborted: list[tuple[str, list[int]]] = []  # (request_id, sample indices; empty: all)
        self.abort_seen = asyncio.Event()

    async def Generate(self, request, context):
        self.requests.append(request)
        async for message in self.script(self, request, context):
            yield message

    async def Abort(self, request, context):
        self.aborted.append((request.request_id, list(request.indices)))
        self.abort_seen.set()
        return pb.AbortResponse(found=True)

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(max_model_len=1000, block_size=BLOCK)

    async def GetLoad(self, request, context):
        return pb.Load(instance_id="scripted")


@contextlib.asynccontextmanager
async def scripted_engines(*scripts) -> AsyncIterator[tuple[list[ScriptedEngine], EnginePool]]:
    """One scripted engine per script on a loopback port, and a started pool over them; all stopped on exit,
    pass or fail (a grpc.aio server left to the garbage collector can hang a later test)."""
    engines, servers, addresses = [], [], []
    pool = None
    try:
        for script in scripts:
            engine, server = ScriptedEngine(script), grpc.aio.server()
            engine_pb2_grpc.add_EngineServicer_to_server(engine, server)
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            servers.append(server)
            await server.start()
            engines.append(engine)
        pool = EnginePool(TokenizerConfig(model="m", engines=addresses))
        pool.start()
        for _ in range(200):
            if len(pool.healthy_engines) == len(scripts):
                break
            await asyncio.sleep(0.01)
        yield engines, pool
    finally:
        if pool is not None:
            await pool.close()
        for server in servers:
            await server.stop(None)


async def run(pool: EnginePool, prompt_ids: list[int], n: int = 1, stop: tuple[str, ...] = ()) -> list:
    generation = Generation(pool, TOKENIZER, "req", prompt_ids, pb.SamplingParams(n=n), TextOptions(stop=stop))
    return [out async for out in generation.stream()]


def tokens_of(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


def refuse(code: grpc.StatusCode):
    async def script(engine, request, context):
        await context.abort(code, "no thanks")
        yield  # an async generator, like every script

    return script


def stream_text(text: str, n: int = 1, until_abort: bool = False):
    """Send each sample's tokens one per message; then either finish, or wait for an abort and finish so."""
    async def script(engine, request, context):
        for token_id in tokens_of(text):
            for index in range(n):
                yield pb.GenerateResponse(request_id=request.request_id, index=index, token_ids=[token_id])
        if until_abort:
            await engine.abort_seen.wait()
        reason = pb.FINISH_REASON_ABORT if until_abort else pb.FINISH_REASON_LENGTH
        for index in range(n):
            yield pb.GenerateResponse(request_id=request.request_id, index=index, finish_reason=reason,
                                      usage=pb.Usage(prompt_tokens=len(request.prompt_token_ids)))

    return script


def metric(pool: EnginePool, name: str, **labels: str) -> float:
    return pool.metrics.registry.get_sample_value(name, labels) or 0.0


def test_refusals_before_output_move_on_to_the_next_engine():
    async def main():
        scripts = [refuse(grpc.StatusCode.RESOURCE_EXHAUSTED), refuse(grpc.StatusCode.UNAVAILABLE),
                   stream_text("fine")]
        async with scripted_engines(*scripts) as (engines, pool):
            for engine in pool.engines[:2]:
                engine.load = pb.Load(num_running=0)  # tried first: less loaded than the third
            pool.engines[2].load = pb.Load(num_running=5)
            outs = await run(pool, tokens_of("hello"))
            assert "".join(o.text for o in outs) == "fine"
            assert [len(e.requests) for e in engines] == [1, 1, 1]
            first, second, third = (engine.address for engine in pool.engines)
            errors = "pagoda_tokenizer_engine_errors_total"
            assert metric(pool, errors, engine=first, code="RESOURCE_EXHAUSTED") == 1
            assert metric(pool, errors, engine=second, code="UNAVAILABLE") == 1
            assert metric(pool, "pagoda_tokenizer_engine_failovers_total") == 2
            for address in (first, second, third):
                assert metric(pool, "pagoda_tokenizer_engine_requests_in_flight", engine=address) == 0
                assert metric(pool, "pagoda_tokenizer_engine_healthy", engine=address) == 1

    asyncio.run(main())


def test_when_every_engine_refuses_the_last_refusal_is_the_answer():
    async def main():
        async with scripted_engines(refuse(grpc.StatusCode.RESOURCE_EXHAUSTED)) as (_, pool):
            with pytest.raises(RequestError) as error:
                await run(pool, tokens_of("hello"))
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert metric(pool, "pagoda_tokenizer_engine_failovers_total") == 0  # no engine was left to try

    asyncio.run(main())


def test_errors_after_output_are_not_retried():
    async def fail_midway(engine, request, context):
        yield pb.GenerateResponse(request_id=request.request_id, token_ids=tokens_of("partial"))
        await context.abort(grpc.StatusCode.INTERNAL, "engine bug")

    async def main():
        async with scripted_engines(fail_midway, fail_midway) as (engines, pool):
            generation = Generation(pool, TOKENIZER, "req", tokens_of("hello"), pb.SamplingParams(), TextOptions())
            outs = []
            with pytest.raises(RequestError) as error:
                async for out in generation.stream():
                    outs.append(out)
            assert error.value.code == grpc.StatusCode.INTERNAL and "engine bug" in error.value.message
            assert "".join(o.text for o in outs) == "partial"
            assert sum(len(e.requests) for e in engines) == 1
            (failed,) = (client.address for client, engine in zip(pool.engines, engines, strict=True)
                         if engine.requests)
            assert metric(pool, "pagoda_tokenizer_engine_errors_total", engine=failed, code="INTERNAL") == 1
            assert metric(pool, "pagoda_tokenizer_engine_failovers_total") == 0

    asyncio.run(main())


@pytest.mark.parametrize("n", [1, 3])
def test_a_stop_string_aborts_its_sample_on_the_engine(n):
    async def main():
        async with scripted_engines(stream_text("one two three four", n, until_abort=True)) as (engines, pool):
            outs = await run(pool, tokens_of("count:"), n=n, stop=("three",))
            assert sorted(engines[0].aborted) == [("req", [index]) for index in range(n)]
            finals = [o for o in outs if o.finish_reason]
            assert sorted(o.index for o in finals) == list(range(n))
            assert all(o.stop_string == "three" and o.finish_reason == pb.FINISH_REASON_STOP for o in finals)
            for index in range(n):
                assert "".join(o.text for o in outs if o.index == index) == "one two "

    asyncio.run(main())


def test_one_sample_stopping_aborts_only_that_sample():
    async def two_texts(engine, request, context):
        for index, text in enumerate(("stop here", "keeps going on")):
            yield pb.GenerateResponse(request_id=request.request_id, index=index, token_ids=tokens_of(text))
        for index in range(2):
            yield pb.GenerateResponse(request_id=request.request_id, index=index,
                                      finish_reason=pb.FINISH_REASON_LENGTH)

    async def main():
        async with scripted_engines(two_texts) as (engines, pool):
            outs = await run(pool, tokens_of("x"), n=2, stop=("here",))
            assert engines[0].aborted == [("req", [0])]
            assert "".join(o.text for o in outs if o.index == 1) == "keeps going on"
            assert [o.stop_string for o in outs if o.finish_reason and o.index == 0] == ["here"]

    asyncio.run(main())


def test_a_request_aborted_whole_before_any_engine_call_reaches_none():
    """An Abort while the prompt was tokenized: every sample ends with ABORT and no engine sees the request."""
    async def main():
        async with scripted_engines(stream_text("never sent")) as (engines, pool):
            generation = Generation(pool, TOKENIZER, "req", tokens_of("hi"), pb.SamplingParams(n=2), TextOptions())
            assert await generation.abort()
            outs = [out async for out in generation.stream()]
            assert sorted(o.index for o in outs) == [0, 1]
            assert all(o.finish_reason == pb.FINISH_REASON_ABORT and not o.text for o in outs)
            assert all(o.usage.prompt_tokens == 2 and o.usage.completion_tokens == 0 for o in outs)
            assert engines[0].requests == [] and engines[0].aborted == []

    asyncio.run(main())


def test_an_abort_before_the_engine_has_the_request_is_sent_once_it_does():
    """Generate and Abort race to the engine: an abort of sample 1 before the first message goes out after it."""
    async def main():
        async with scripted_engines(stream_text("some text", n=2, until_abort=True)) as (engines, pool):
            generation = Generation(pool, TOKENIZER, "req", tokens_of("hi"), pb.SamplingParams(n=2), TextOptions())
            assert await generation.abort([1])
            assert not await generation.abort([5])  # no such sample
            outs = [out async for out in generation.stream()]
            assert engines[0].aborted == [("req", [1])]
            assert {o.index for o in outs if o.finish_reason == pb.FINISH_REASON_ABORT} == {0, 1}

    asyncio.run(main())


class SlowHealth(health.aio.HealthServicer):
    """An engine's health service whose first answer to each watch comes ``delay_s`` late."""

    def __init__(self, delay_s: float, status=health_pb2.HealthCheckResponse.SERVING):
        super().__init__()
        self.delay_s = delay_s
        self.status = status

    async def Watch(self, request, context):
        await asyncio.sleep(self.delay_s)
        yield health_pb2.HealthCheckResponse(status=self.status)
        await asyncio.Event().wait()  # the watch stays open, as a real one does


@pytest.mark.parametrize(("statuses", "served"), [
    ([health_pb2.HealthCheckResponse.SERVING], True),
    ([health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING], True),
    ([health_pb2.HealthCheckResponse.NOT_SERVING], False),
])
def test_a_new_pool_settles_on_its_engines_first_answers(statuses, served):
    """Right after start no engine has answered yet: a request then (a worker's first moments, with --workers
    the service already SERVING through another worker) was refused as if no engine served. ``settle`` waits
    until one serves or all have answered, well inside the start-up grace."""
    async def main():
        servers, addresses = [], []
        pool = None
        try:
            for i, status in enumerate(statuses):
                server = grpc.aio.server()
                engine_pb2_grpc.add_EngineServicer_to_server(ScriptedEngine(None), server)
                health_pb2_grpc.add_HealthServicer_to_server(SlowHealth(0.3 * (i + 1), status), server)
                addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
                servers.append(server)
                await server.start()
            pool = EnginePool(TokenizerConfig(model="m", engines=addresses))
            pool.start()
            assert not pool.healthy_engines
            loop = asyncio.get_running_loop()
            start = loop.time()
            await pool.settle()
            assert bool(pool.healthy_engines) == served
            assert loop.time() - start < STARTUP_GRACE_S  # settled on the answers, not on the grace running out
        finally:
            if pool is not None:
                await pool.close()
            for server in servers:
                await server.stop(None)

    asyncio.run(main())
