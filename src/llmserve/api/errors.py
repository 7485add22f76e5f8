"""Exception handlers that render every error in the shape of the dialect that was called."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmserve.core.errors import InvalidRequestError, LLMServeError, NotFoundError

ErrorRenderer = Callable[[LLMServeError], JSONResponse]


def install_error_handlers(
    app: FastAPI,
    dialects: Sequence[tuple[tuple[str, ...], ErrorRenderer]],
    default: ErrorRenderer,
) -> None:
    """Route errors to the renderer of the first dialect whose path prefix matches."""

    def render(request: Request, exc: LLMServeError) -> JSONResponse:
        path = request.url.path
        for prefixes, renderer in dialects:
            if path.startswith(prefixes):
                return renderer(exc)
        return default(exc)

    @app.exception_handler(LLMServeError)
    async def on_llmserve_error(request: Request, exc: LLMServeError) -> JSONResponse:
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return render(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = (
            NotFoundError(str(exc.detail))
            if exc.status_code == 404
            else LLMServeError(str(exc.detail))
        )
        error.status = exc.status_code
        return render(request, error)


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
