"""Exception handlers that render every error in the shape of the dialect that was called."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmserve.core.errors import (
    InvalidRequestError,
    LLMServeError,
    NotFoundError,
    PayloadTooLargeError,
)

log = logging.getLogger(__name__)

ErrorRenderer = Callable[[LLMServeError], JSONResponse]
HTTP_ERRORS: dict[int, type[LLMServeError]] = {404: NotFoundError, 413: PayloadTooLargeError}


@dataclass(frozen=True)
class Dialect:
    """A dialect's name (in logs and metrics), the path prefixes it serves and its error shape."""

    name: str
    prefixes: tuple[str, ...]
    render: ErrorRenderer


@dataclass(frozen=True)
class ErrorRenderers:
    """Which dialect speaks for which path: the first whose prefix matches, or the default."""

    dialects: Sequence[Dialect]
    default: Dialect

    def dialect(self, path: str) -> Dialect:
        """The dialect that serves `path`."""
        for dialect in self.dialects:
            if path.startswith(dialect.prefixes):
                return dialect
        return self.default

    def for_path(self, path: str) -> ErrorRenderer:
        """The error renderer of the dialect that serves `path`."""
        return self.dialect(path).render

    def dialect_name(self, path: str) -> str:
        """The name of the dialect that serves `path`."""
        return self.dialect(path).name


def install_error_handlers(app: FastAPI, renderers: ErrorRenderers) -> None:
    """Render every error raised under a route in that route's dialect."""

    def render(request: Request, exc: LLMServeError) -> JSONResponse:
        return renderers.for_path(request.url.path)(exc)

    @app.exception_handler(LLMServeError)
    async def on_llmserve_error(request: Request, exc: LLMServeError) -> JSONResponse:
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return render(request, validation_error(exc))

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client mistake: log it whole, answer in the dialect's shape.
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        error = LLMServeError(f"internal error: {type(exc).__name__}")
        return render(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = render(request, http_error(exc.status_code, str(exc.detail)))
        response.headers.update(exc.headers or {})  # e.g. the 405's Allow
        return response


def http_error(status: int, message: str) -> LLMServeError:
    """A framework HTTPException as our error: a client error type for every 4xx."""
    error: LLMServeError
    if status in HTTP_ERRORS:
        error = HTTP_ERRORS[status](message)
    elif status == 405:
        error = InvalidRequestError(message, code="method_not_allowed")
    elif 400 <= status < 500:
        error = InvalidRequestError(message)
    else:
        error = LLMServeError(message)
    error.status = status
    return error


def retry_headers(exc: LLMServeError) -> dict[str, str] | None:
    """`Retry-After` for the statuses that invite a retry."""
    return {"Retry-After": "1"} if exc.status in (429, 503) else None


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """FastAPI's 422 as a 400 naming the first offending field in `param`."""
    problems = []
    param = None
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        where = ".".join(loc)
        param = param or where or None
        problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return InvalidRequestError("; ".join(problems) or "invalid request", param=param)
