"""The llama.cpp engine when things go wrong: decode errors, a dead thread, full queue, close."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from llmserve.core.errors import EngineError, QueueFullError, ServiceUnavailableError
from llmserve.core.request import FinishReason
from llmserve.engines.llamacpp.engine import LlamaCppEngine
from tests.engine.helpers import Completion, Driver, request, small_engine, wait_for


@pytest.fixture
def single_slot() -> Iterator[Driver]:
    """A fresh engine with one slot and room for one waiting request."""
    engine = small_engine(ctx_size=256, parallel=1, max_queue=1)
    yield Driver(engine)
    asyncio.run(engine.close())


def test_failed_decode_fails_its_requests_and_the_engine_goes_on(
    single_slot: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = single_slot.engine
    batch = engine._runner.batch
    real_decode = batch.decode
    calls = 0

    def failing_once(ctx: object) -> int:
        nonlocal calls
        calls += 1
        return -1 if calls == 1 else real_decode(ctx)

    monkeypatch.setattr(batch, "decode", failing_once)
    prompt = single_slot.prompt("Hello there")
    with pytest.raises(EngineError):
        single_slot.run(prompt, max_tokens=4)
    result = single_slot.run(prompt, temperature=0.0, max_tokens=4, ignore_eos=True)
    assert len(result.token_ids()) == 4
    stats = engine.stats()
    assert stats.alive and stats.free_slots == stats.total_slots


def test_dead_engine_thread_fails_requests_with_503(
    single_slot: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = single_slot.engine

    def broken_step() -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(engine._runner, "step", broken_step)
    with pytest.raises(ServiceUnavailableError):
        single_slot.run(single_slot.prompt("Hello"), max_tokens=4)
    stats = engine.stats()
    assert not stats.alive
    assert stats.error is not None and "simulated crash" in stats.error
    with pytest.raises(ServiceUnavailableError):
        single_slot.run(single_slot.prompt("Hello again"), max_tokens=4)


def test_queue_beyond_max_queue_is_refused(single_slot: Driver) -> None:
    engine = single_slot.engine
    prompt = single_slot.prompt("Write a poem.")

    async def scenario() -> None:
        started = asyncio.Event()

        async def occupy() -> Completion:
            completion = Completion()
            async for delta in engine.generate(request(prompt, max_tokens=200, ignore_eos=True)):
                completion.deltas.append(delta)
                started.set()
            return completion

        running = asyncio.create_task(occupy())
        await started.wait()
        queued = asyncio.create_task(occupy())
        assert await wait_for(lambda: engine.stats().waiting == 1)
        with pytest.raises(QueueFullError):
            engine.generate(request(prompt, max_tokens=4))
        for task in (running, queued):
            task.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)

    asyncio.run(scenario())


def test_close_ends_streams_with_abort_and_refuses_new_requests() -> None:
    engine: LlamaCppEngine = small_engine(ctx_size=256, parallel=2)
    driver = Driver(engine)
    prompt = driver.prompt("Write a poem.")

    async def scenario() -> Completion:
        completion = Completion()
        closing: asyncio.Task[None] | None = None
        async for delta in engine.generate(request(prompt, max_tokens=200, ignore_eos=True)):
            completion.deltas.append(delta)
            if closing is None:
                closing = asyncio.create_task(engine.close())
        assert closing is not None
        await closing
        return completion

    result = asyncio.run(scenario())
    assert result.finish_reason is FinishReason.ABORT
    assert result.usage.completion_tokens == len(result.token_ids())
    assert not engine.stats().alive
    with pytest.raises(ServiceUnavailableError):
        driver.run(prompt, max_tokens=2)
