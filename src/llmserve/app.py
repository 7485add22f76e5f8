"""create_app: builds the FastAPI application and everything it owns from Settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmserve import __version__
from llmserve.api import ops
from llmserve.api.openai import routes as openai_routes
from llmserve.api.openai.serving import OpenAIServing, error_body
from llmserve.auth import KeyStore, require_api
from llmserve.config import Settings
from llmserve.core.errors import InvalidRequestError, LLMServeError, NotFoundError
from llmserve.models.manager import ModelManager

log = logging.getLogger(__name__)


def create_app(settings: Settings, models: ModelManager | None = None) -> FastAPI:
    """The whole server; with `models` given (already holding a model) nothing is loaded."""
    manager = models or ModelManager(settings)
    keys = KeyStore(settings.tokens_path(), settings.api_key, settings.disable_auth)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys.ensure_file()
        loading = None
        if not manager.loaded():
            # Load in the background so /health can answer 503 while the model loads.
            loading = asyncio.create_task(_load(manager))
        yield
        if loading is not None:
            loading.cancel()
        await manager.close()

    app = FastAPI(title="llmserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.models = manager
    app.state.keys = keys
    app.state.openai = OpenAIServing(manager)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=False,
    )
    _install_error_handlers(app)
    app.include_router(ops.build_router())
    app.include_router(openai_routes.build_router(), dependencies=[Depends(require_api)])
    return app


async def _load(manager: ModelManager) -> None:
    try:
        await manager.load_configured()
    except Exception:
        log.exception("loading the model failed; /health stays 503")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LLMServeError)
    async def on_llmserve_error(request: Request, exc: LLMServeError) -> JSONResponse:
        return _render(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _render(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = (
            NotFoundError(str(exc.detail))
            if exc.status_code == 404
            else LLMServeError(str(exc.detail))
        )
        error.status = exc.status_code
        return _render(error)


def _render(exc: LLMServeError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(error_body(exc).model_dump(), status_code=exc.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """FastAPI's 422 as an OpenAI 400 naming the first offending field."""
    problems = []
    param = None
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        where = ".".join(loc)
        param = param or where or None
        problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return InvalidRequestError("; ".join(problems) or "invalid request", param=param)
