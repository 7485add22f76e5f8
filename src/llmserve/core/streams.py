"""Helpers over engine delta streams: fail before the first byte, merge several prompts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from llmserve.core.errors import EngineError
from llmserve.core.request import Delta


@dataclass(frozen=True)
class IndexedDelta:
    """A delta tagged with the position of the prompt it belongs to."""

    prompt_index: int
    delta: Delta


async def open_stream(stream: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """Wait for the first delta so validation, queue and context errors raise here.

    An HTTP response can still become an error status at this point; once the first byte of
    a stream is sent, errors can only be reported inside the stream.
    """
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        # Engines end every request with a final delta; an empty stream is an engine fault.
        raise EngineError("the engine ended the request without any output") from None

    async def chained() -> AsyncIterator[Delta]:
        try:
            yield first
            async for delta in stream:
                yield delta
        finally:
            await _close(stream)

    return chained()


async def open_streams(streams: Sequence[AsyncIterator[Delta]]) -> AsyncIterator[IndexedDelta]:
    """Open every stream (all must validate) and merge them in arrival order."""
    opened: list[AsyncIterator[Delta]] = []
    try:
        for stream in streams:
            opened.append(await open_stream(stream))
    except BaseException:
        for stream in [*opened, *streams[len(opened) :]]:
            await _close(stream)
        raise
    if len(opened) == 1:
        return _tag(opened[0])
    return _merge(opened)


async def _tag(stream: AsyncIterator[Delta]) -> AsyncIterator[IndexedDelta]:
    try:
        async for delta in stream:
            yield IndexedDelta(0, delta)
    finally:
        await _close(stream)


async def _merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[IndexedDelta]:
    queue: asyncio.Queue[IndexedDelta | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                queue.put_nowait(IndexedDelta(index, delta))
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            await _close(stream)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close(stream: AsyncIterator[Delta]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
