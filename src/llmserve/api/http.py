"""HTTP plumbing every dialect shares: lenient JSON bodies, SSE responses, disconnect watching."""

from __future__ import annotations

import asyncio
import email.message
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.api.errors import ErrorRenderers
from llmserve.core.errors import InvalidRequestError, LLMServeError, PayloadTooLargeError

T = TypeVar("T")
log = logging.getLogger(__name__)


# Deep enough for any real request (a tool schema nested ~45 levels fits), shallow enough that
# nothing downstream (pydantic, re-serialization, schema walks) can recurse into a stack overflow.
MAX_JSON_DEPTH = 100

# A lone UTF-16 surrogate ("\\ud800" as a JSON escape) is valid JSON but no text: it cannot be
# encoded to UTF-8, so the tokenizer, the template or the response writer would fail on it.
_SURROGATE = re.compile("[\ud800-\udfff]")
# A cheap scan of the raw text says whether the decoded value can hold one: a surrogate only
# comes from a \\uD800-\\uDFFF escape. Bodies of token ids (lm-eval) then skip the Python walk.
_MAY_HOLD_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class ClientDisconnectedError(LLMServeError):
    """The client left before its answer was ready (it sees nothing; the access log says 499)."""

    status = 499  # nginx's "client closed request"
    type = "invalid_request_error"
    code = "client_disconnected"


class LenientJSONRequest(Request):
    """A request whose JSON body may hold raw control characters inside strings.

    curl users paste multi-line prompts into `-d '...'` (the InstructLab seed does), which puts
    raw newlines inside JSON strings; strict JSON forbids them, every popular server accepts them.
    What no route can serve is refused here, naming where it is: bytes that are not UTF-8,
    nesting deeper than MAX_JSON_DEPTH, lone surrogates and non-finite numbers.
    """

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


def parse_json_body(raw: bytes) -> Any:
    """Decode a request body; raise InvalidRequestError for what no route can serve."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding"
        ) from None
    non_finite: list[str] = []

    def parse_float(literal: str) -> float:
        # Called by the C scanner for floats only: notes NaN, ±Infinity and overflow (1e999).
        number = float(literal)
        if not math.isfinite(number):
            non_finite.append(literal)
        return number

    try:
        value = json.loads(text, strict=False, parse_float=parse_float, parse_constant=parse_float)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # JSONDecodeError, and integers longer than Python converts
        raise InvalidRequestError(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    check_json_value(
        value,
        depth=text.count("[") + text.count("{") > MAX_JSON_DEPTH,
        strings=_MAY_HOLD_SURROGATE.search(text) is not None,
        numbers=bool(non_finite),
    )
    return value


def check_json_value(
    value: Any, *, depth: bool = True, strings: bool = True, numbers: bool = True
) -> None:
    """Walk a decoded body without recursion: depth, lone surrogates, non-finite numbers."""
    if not (depth or strings or numbers):
        return
    checks = (dict, list) + ((str,) if strings else ()) + ((float,) if numbers else ())
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise _too_deep(path)
        if isinstance(item, str):
            if strings and _SURROGATE.search(item):
                raise _bad_value("holds a lone UTF-16 surrogate, which is not text", path)
        elif isinstance(item, float):
            if numbers and not math.isfinite(item):
                raise _bad_value(f"is {item}: only finite numbers are accepted", path)
        elif isinstance(item, dict):
            if strings and any(_SURROGATE.search(key) for key in item):
                raise _bad_value("has a field name with a lone UTF-16 surrogate", path)
            fields = item.items()
            stack.extend((child, (*path, key)) for key, child in fields if _needs(child, checks))
        elif isinstance(item, list):
            entries = enumerate(item)
            stack.extend((child, (*path, str(i))) for i, child in entries if _needs(child, checks))


def _needs(value: Any, checks: tuple[type, ...]) -> bool:
    """Whether `value` must be visited: containers always, scalars when their check is on.

    A list of a million token ids then pushes nothing.
    """
    return isinstance(value, checks)


def _bad_value(problem: str, path: tuple[str, ...]) -> InvalidRequestError:
    param = ".".join(path) or None
    return InvalidRequestError(f"{param or 'the body'} {problem}", param=param)


def _too_deep(path: tuple[str, ...] = ()) -> InvalidRequestError:
    # The top-level field names the culprit; the full path would be a hundred segments long.
    field = path[0] if path else None
    return InvalidRequestError(
        f"{field or 'request body'} is nested deeper than {MAX_JSON_DEPTH} levels",
        param=field,
        code="json_too_deep",
    )


class LenientJSONRoute(APIRoute):
    """An APIRoute that hands its endpoint a LenientJSONRequest, its body already checked."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        reads_body = self.body_field is not None
        strict = self.strict_content_type
        untyped_is_json = not (strict.value if isinstance(strict, DefaultPlaceholder) else strict)

        async def lenient_handler(request: Request) -> Response:
            lenient = LenientJSONRequest(request.scope, request.receive)
            if reads_body and _is_json(lenient, untyped_is_json):
                # Parsed here, not inside FastAPI's handler: that one turns every exception but
                # a JSONDecodeError into a bare 400 without the offending field.
                try:
                    body = await lenient.body()
                except ClientDisconnect:
                    raise ClientDisconnectedError("client disconnected while sending") from None
                if body:
                    await lenient.json()
            return await handler(lenient)

        return lenient_handler


def _is_json(request: Request, untyped_is_json: bool) -> bool:
    """Whether FastAPI would read this body as JSON (a JSON content type, as it decides)."""
    content_type = request.headers.get("content-type")
    if not content_type:
        return untyped_is_json
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


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
    if task.done():
        return task.result()
    task.cancel()
    # Wait for the cancellation to reach the engine; the task's own CancelledError is not
    # ours to raise: escaping the endpoint, it would be an ASGI crash with a traceback.
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved
    log.info(
        "client left %s %s before the answer; request cancelled", request.method, request.url.path
    )
    raise ClientDisconnectedError("client disconnected before the answer was ready")


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
