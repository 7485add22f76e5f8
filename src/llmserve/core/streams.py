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
        first = await _first(stream)
    except BaseException:
        await _close(stream)
        raise
    return _chained(first, stream)


async def open_streams(streams: Sequence[AsyncIterator[Delta]]) -> AsyncIterator[IndexedDelta]:
    """Open every stream at once (all must validate) and merge them in arrival order.

    Each stream's first `anext` runs concurrently, so an engine receives every prompt before
    any first token (several prompts batch together). If any fails, all are closed and the
    first error in prompt order is raised.
    """
    if len(streams) == 1:
        return _tag(await open_stream(streams[0]))
    if not streams:
        return _merge([])
    firsts = [asyncio.create_task(_first(stream)) for stream in streams]
    try:
        failed = await _settle_firsts(firsts)
    except BaseException:  # cancelled while waiting (client gone): nothing is left open
        await _abandon(streams, firsts)
        raise
    if failed is not None:
        error = firsts[failed].exception()
        await _abandon(streams, firsts)
        assert error is not None
        raise error
    return _merge([_chained(t.result(), s) for t, s in zip(firsts, streams, strict=True)])


async def _first(stream: AsyncIterator[Delta]) -> Delta:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        # Engines end every request with a final delta; an empty stream is an engine fault.
        raise EngineError("the engine ended the request without any output") from None


async def _chained(first: Delta, stream: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    try:
        yield first
        async for delta in stream:
            yield delta
    finally:
        await _close(stream)


async def _settle_firsts(firsts: list[asyncio.Task[Delta]]) -> int | None:
    """Wait for the first deltas; return the earliest prompt whose first delta failed.

    Once prompt j failed, later prompts cannot change the answer and are not waited for;
    earlier ones still are, so the error raised is the same whatever order they fail in.
    """
    failed: int | None = None
    while True:
        waiting = [task for task in firsts[:failed] if not task.done()]
        if not waiting:
            return failed
        await asyncio.wait(waiting, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((i for i, task in enumerate(firsts) if _failed(task)), None)


def _failed(task: asyncio.Task[Delta]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


async def _abandon(
    streams: Sequence[AsyncIterator[Delta]], firsts: list[asyncio.Task[Delta]]
) -> None:
    """Stop the first-delta waits still running, then close every stream."""
    for task in firsts:
        task.cancel()
    await asyncio.gather(*firsts, return_exceptions=True)
    for stream in streams:
        await _close(stream)


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
