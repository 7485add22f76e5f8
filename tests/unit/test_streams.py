"""open_streams: every prompt's first delta is awaited at once; one failure closes them all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from llmserve.core.errors import ContextLengthExceededError, InvalidRequestError
from llmserve.core.request import Delta, FinishReason, Usage
from llmserve.core.streams import IndexedDelta, open_streams


@dataclass
class Log:
    """What the fake streams saw, in order."""

    events: list[tuple[str, int]] = field(default_factory=list)
    closed: set[int] = field(default_factory=set)
    all_started: asyncio.Event = field(default_factory=asyncio.Event)


class FakeStream:
    """An engine-like delta stream: its first delta waits until every stream has started."""

    def __init__(
        self,
        index: int,
        total: int,
        log: Log,
        error: Exception | None = None,
        error_after: int = 0,
    ) -> None:
        self.index = index
        self.total = total
        self.log = log
        self.error = error
        self.error_after = error_after  # event-loop turns to wait before failing
        self.sent = 0

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Delta:
        if self.index in self.log.closed:
            raise StopAsyncIteration
        if self.sent == 0:
            self.log.events.append(("start", self.index))
            if sum(1 for kind, _ in self.log.events if kind == "start") == self.total:
                self.log.all_started.set()
            # Sequential opening would wait here forever: prompt i+1 never starts.
            await asyncio.wait_for(self.log.all_started.wait(), timeout=5)
            if self.error is not None:
                for _ in range(self.error_after):
                    await asyncio.sleep(0)
                self.log.events.append(("fail", self.index))
                raise self.error
            self.log.events.append(("first", self.index))
        self.sent += 1
        if self.sent > 2:
            raise StopAsyncIteration
        last = self.sent == 2
        return Delta(
            index=0,
            text=f"{self.index}.{self.sent}",
            finish_reason=FinishReason.LENGTH if last else None,
            usage=Usage(prompt_tokens=1, completion_tokens=2) if last else None,
        )

    async def aclose(self) -> None:
        self.log.closed.add(self.index)


async def collect(deltas: AsyncIterator[IndexedDelta]) -> list[IndexedDelta]:
    return [delta async for delta in deltas]


def test_every_first_anext_starts_before_any_completes() -> None:
    async def main() -> tuple[Log, list[IndexedDelta]]:
        log = Log()
        streams = [FakeStream(i, 8, log) for i in range(8)]
        merged = await open_streams(streams)
        return log, await collect(merged)

    log, deltas = asyncio.run(main())
    kinds = [kind for kind, _ in log.events]
    assert kinds[:8] == ["start"] * 8
    assert sorted(i for kind, i in log.events if kind == "first") == list(range(8))
    for index in range(8):
        texts = [d.delta.text for d in deltas if d.prompt_index == index]
        assert texts == [f"{index}.1", f"{index}.2"]
    assert log.closed == set(range(8))


def test_an_error_in_prompt_3_closes_every_stream_and_raises() -> None:
    async def main() -> Log:
        log = Log()
        error = InvalidRequestError("bad prompt 3", param="prompt")
        streams = [FakeStream(i, 8, log, error if i == 3 else None) for i in range(8)]
        with pytest.raises(InvalidRequestError) as caught:
            await open_streams(streams)
        assert caught.value is error
        return log

    log = asyncio.run(main())
    assert log.closed == set(range(8))
    assert ("fail", 3) in log.events


def test_the_first_error_in_prompt_order_wins() -> None:
    """Prompt 5 fails first in time, prompt 2 later: prompt 2's error is the one raised."""

    async def main() -> Log:
        log = Log()
        second = InvalidRequestError("prompt 2 is invalid", param="prompt")
        fifth = ContextLengthExceededError("prompt 5 is too long", param="prompt")
        streams = [FakeStream(i, 6, log) for i in range(6)]
        streams[2] = FakeStream(2, 6, log, second, error_after=5)
        streams[5] = FakeStream(5, 6, log, fifth)
        with pytest.raises(InvalidRequestError) as caught:
            await open_streams(streams)
        assert caught.value is second
        return log

    log = asyncio.run(main())
    fails = [i for kind, i in log.events if kind == "fail"]
    assert fails == [5, 2]
    assert log.closed == set(range(6))


def test_a_single_stream_is_opened_and_closed() -> None:
    async def main() -> tuple[Log, list[IndexedDelta]]:
        log = Log()
        merged = await open_streams([FakeStream(0, 1, log)])
        return log, await collect(merged)

    log, deltas = asyncio.run(main())
    assert [d.delta.text for d in deltas] == ["0.1", "0.2"]
    assert log.closed == {0}
