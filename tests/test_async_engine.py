"""AsyncEngine: the engine core process serves concurrent asyncio streams; cancels free blocks at once."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import pytest

from pagoda_engine import SamplingParams
from pagoda_engine.async_engine import AsyncEngine, EngineDeadError
from pagoda_engine.config import EngineConfig
from pagoda_engine.sequence import FinishReason
from tests.test_engine import make_llm, prompts_of


async def collect(engine: AsyncEngine, request_id: str, prompt, params) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    async for batch in engine.generate(request_id, prompt, params):
        for out in batch:
            tokens.setdefault(out.index, []).extend(out.token_ids)
    return tokens


async def wait_for_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        load = engine.load
        if load.running == 0 and load.waiting == 0 and load.kv_blocks_free == load.kv_blocks_total:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {engine.load}")


@pytest.fixture
def llm(tiny_model_dirs):
    return make_llm(tiny_model_dirs["llama"])


async def started(llm) -> AsyncEngine:
    """An engine core process with the offline engine's configuration."""
    engine = AsyncEngine(llm.engine.config)
    await engine.start()
    return engine


def test_concurrent_streams_equal_the_offline_api(llm):
    prompts = prompts_of([5, 20, 35, 8, 50, 13, 27, 40])
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    async def main():
        engine = await started(llm)
        results = await asyncio.gather(*(collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts)))
        await wait_for_idle(engine)
        await engine.stop()
        return results

    results = asyncio.run(main())
    assert [r[0] for r in results] == expected


def test_closing_a_stream_aborts_and_frees_blocks(llm):
    async def main():
        engine = await started(llm)
        stream = engine.generate("long", prompts_of([30])[0], SamplingParams(max_tokens=400, ignore_eos=True))
        first = await anext(stream)
        assert first[0].token_ids
        await stream.aclose()
        await wait_for_idle(engine)
        # The id is free again once the stream is gone.
        assert await collect(engine, "long", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
        await engine.stop()

    asyncio.run(main())


def test_abort_by_id_ends_the_stream_with_abort(llm):
    async def main():
        engine = await started(llm)
        reasons = []
        async for batch in engine.generate("x", [4, 5, 6], SamplingParams(max_tokens=400, ignore_eos=True)):
            if not reasons:  # one abort, after the first batch of tokens
                assert engine.abort("x")
            reasons += [out.finish_reason for out in batch]
        assert reasons[-1] is FinishReason.ABORT
        assert not engine.abort("x")
        await wait_for_idle(engine)
        await engine.stop()

    asyncio.run(main())


def test_an_engine_core_that_cannot_load_is_a_clear_error(tmp_path):
    async def main():
        with pytest.raises(RuntimeError, match="no config.json"):
            await AsyncEngine(EngineConfig(model=str(tmp_path), device="cpu")).start()

    asyncio.run(main())


def test_a_killed_engine_core_fails_every_stream(llm):
    async def main():
        engine = await started(llm)
        stream = engine.generate("long", [1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        await anext(stream)
        engine._process.kill()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        await asyncio.wait_for(engine.failed.wait(), timeout=10)
        with pytest.raises(EngineDeadError):
            await anext(engine.generate("after", [1, 2, 3], SamplingParams(max_tokens=2)))
        await engine.stop()

    asyncio.run(main())


def test_a_stuck_engine_core_is_declared_dead(llm):
    """A core that stops making progress (here SIGSTOPped, as a wedged GPU would) fails its streams in time."""
    config = dataclasses.replace(llm.engine.config, engine_step_timeout_s=1.0)

    async def main():
        engine = AsyncEngine(config)
        await engine.start()
        stream = engine.generate("long", [1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        await anext(stream)
        os.kill(engine._process.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert 0.5 <= time.monotonic() - start < 10
        assert engine.failed.is_set()
        await engine.stop()
        assert engine._process.exitcode == -signal.SIGKILL

    asyncio.run(main())
