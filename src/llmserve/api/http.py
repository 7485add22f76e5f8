"""HTTP plumbing every dialect shares: lenient JSON bodies, SSE responses, disconnect watching."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.api.errors import ErrorRenderers
from llmserve.core.errors import PayloadTooLargeError

T = TypeVar("T")


class LenientJSONRequest(Request):
    """A request whose JSON body may hold raw control characters inside strings.

    curl users paste multi-line prompts into `-d '...'` (the InstructLab seed does), which puts
    raw newlines inside JSON strings; strict JSON forbids them, every popular server accepts them.
    """

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), strict=False)
        return self._json


class LenientJSONRoute(APIRoute):
    """An APIRoute that hands its endpoint a LenientJSONRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def lenient_handler(request: Request) -> Response:
            return await handler(LenientJSONRequest(request.scope, request.receive))

        return lenient_handler


def json_or_sse(result: BaseModel | AsyncIterator[str]) -> Response:
    """A whole response as JSON, or a stream of SSE data lines."""
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    return sse_response(result)


def sse_response(lines: AsyncIterator[str] | AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """An unbuffered `text/event-stream`: `data: LINE\\n\\n` per string, or the events as given."""
    return EventSourceResponse(
        lines,
        sep="\n",
        ping=15,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client goes away first (frees its engine slot)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
    return await task


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 in the dialect's shape."""

    app: ASGIApp
    max_bytes: int
    renderers: ErrorRenderers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = PayloadTooLargeError(f"request body is larger than {self.max_bytes} bytes")
            await self.renderers.for_path(scope["path"])(error)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            # Chunked bodies have no Content-Length: count as they arrive. FastAPI passes
            # HTTPExceptions from body reading through, so this one reaches the error handlers.
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)
