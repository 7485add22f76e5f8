"""create_app: builds the FastAPI application and everything it owns from Settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from llmserve import __version__
from llmserve.api import ops
from llmserve.api.admin import routes as admin_routes
from llmserve.api.admin.serving import AdminServing
from llmserve.api.anthropic import routes as anthropic_routes
from llmserve.api.anthropic.serving import AnthropicServing, anthropic_error_response
from llmserve.api.common import error_response
from llmserve.api.errors import Dialect, ErrorRenderers, install_error_handlers
from llmserve.api.http import BodySizeLimit
from llmserve.api.kobold import routes as kobold_routes
from llmserve.api.kobold.serving import KoboldServing, kobold_error_response
from llmserve.api.llamacpp import routes as llamacpp_routes
from llmserve.api.llamacpp.serving import LlamaCppServing
from llmserve.api.ollama import routes as ollama_routes
from llmserve.api.ollama.protocol import OLLAMA_PATHS
from llmserve.api.ollama.serving import OllamaServing, ollama_error_response
from llmserve.api.openai import routes as openai_routes
from llmserve.api.openai.serving import OpenAIServing
from llmserve.api.overrides import SamplingOverrides
from llmserve.api.responses import routes as responses_routes
from llmserve.api.responses.serving import ResponsesServing, ResponseStore
from llmserve.api.together import routes as together_routes
from llmserve.api.together.serving import TogetherServing, together_error_response
from llmserve.api.ui import routes as ui_routes
from llmserve.api.usage import routes as usage_routes
from llmserve.auth import KeyStore, metered
from llmserve.config import Settings
from llmserve.core.errors import LLMServeError
from llmserve.engines.registry import EngineRegistry
from llmserve.exposure import BrowserGuard, PathCORS
from llmserve.models.leases import LeaseScope
from llmserve.models.manager import ModelManager
from llmserve.models.wrappers import serving_engine
from llmserve.observability import AccessLog, Metrics, RecentRequests
from llmserve.usage.database import open_database
from llmserve.usage.metrics import WrittenRecords
from llmserve.usage.middleware import UsageMeter
from llmserve.usage.service import UsageService

log = logging.getLogger(__name__)


def create_app(
    settings: Settings, models: ModelManager | None = None, engines: EngineRegistry | None = None
) -> FastAPI:
    """The whole server; with `models` given (already holding a model) nothing is loaded.

    `engines`: the engines `settings.engine` may name (default: those shipped with llmserve).
    """
    manager = models or ModelManager(settings, engines)
    keys = KeyStore(settings.tokens_path(), settings.api_key, settings.disable_auth)
    usage = open_usage(settings)
    metrics = Metrics(lambda: [(m.id, m.engine.stats()) for m in manager.loaded()])
    manager.wrap_engines(lambda engine: serving_engine(engine, metrics, settings.request_timeout))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys.ensure_file()
        if usage is not None:
            usage.start(keys.file_keys())
        loading = None
        if not manager.loaded():
            # Load in the background so /health can answer 503 while the model loads.
            loading = asyncio.create_task(_load(manager))
        manager.start_monitor()
        yield
        if loading is not None:
            loading.cancel()  # the load itself finishes (it is shielded); close() waits for it
        await manager.close()
        if usage is not None:
            await usage.close()  # after the drain: every finished request's record is written

    app = FastAPI(title="llmserve", version=__version__, lifespan=lifespan)
    _attach_state(app, settings, manager, keys, metrics)
    app.state.usage = usage
    if usage is not None:
        metrics.registry.register(WrittenRecords(lambda: usage.records_written))
    _add_middleware(app, settings, usage)
    app.add_middleware(LeaseScope)  # outermost: leases end after the response is fully sent
    app.include_router(ops.build_router())
    app.include_router(admin_routes.build_info_router())
    console = settings.admin_api and settings.admin_port is None
    if console:
        app.include_router(admin_routes.build_admin_router())
        app.include_router(ui_routes.build_console_router())
    app.include_router(ui_routes.build_router(playground=True, console=console))
    if settings.admin_api and settings.admin_port is None:
        app.include_router(usage_routes.build_keys_router())
    app.include_router(usage_routes.build_usage_router())
    keyed = [Depends(metered())]
    app.include_router(openai_routes.build_router(), dependencies=keyed)
    # Both meter their own routes: each has routes open without a key (version probes).
    app.include_router(kobold_routes.build_router(require_key=settings.kobold_auth))
    app.include_router(ollama_routes.build_open_router())
    app.include_router(ollama_routes.build_router(require_key=settings.ollama_auth))
    app.include_router(together_routes.build_router(), dependencies=keyed)
    app.include_router(llamacpp_routes.build_router(), dependencies=keyed)
    app.include_router(anthropic_routes.build_router(), dependencies=keyed)
    app.include_router(responses_routes.build_router(), dependencies=keyed)
    return app


def open_usage(settings: Settings) -> UsageService | None:
    """The usage service on the configured database (None when usage is not recorded)."""
    url = settings.usage_database_url()
    if url is None:
        return None
    return UsageService(open_database(url), settings.anonymous_limits)


def create_admin_app(main: FastAPI) -> FastAPI:
    """The admin routes alone, for a separate host/port, sharing the main app's state."""
    admin = FastAPI(title="llmserve admin", version=__version__)
    for name in ("settings", "models", "keys", "metrics", "overrides", "admin", "recent", "usage"):
        setattr(admin.state, name, getattr(main.state, name))
    _add_middleware(admin, main.state.settings, None)
    admin.add_middleware(LeaseScope)
    admin.include_router(admin_routes.build_admin_router())
    admin.include_router(usage_routes.build_keys_router())
    admin.include_router(usage_routes.build_usage_router())
    # The admin console lives here then, with the read-only routes it shows.
    admin.include_router(ops.build_router())
    admin.include_router(admin_routes.build_info_router())
    admin.include_router(ui_routes.build_console_router())
    admin.include_router(ui_routes.build_router(playground=False, console=True))
    return admin


def _attach_state(
    app: FastAPI, settings: Settings, manager: ModelManager, keys: KeyStore, metrics: Metrics
) -> None:
    app.state.settings = settings
    app.state.models = manager
    app.state.keys = keys
    app.state.metrics = metrics
    app.state.recent = RecentRequests(ui_routes.RING_SIZE, ui_routes.QUIET_PREFIXES)
    app.state.overrides = SamplingOverrides()
    app.state.openai = OpenAIServing(manager, app.state.overrides)
    app.state.admin = AdminServing(settings, manager, app.state.overrides)
    kobold_protected = settings.kobold_auth and not settings.disable_auth
    app.state.kobold = KoboldServing(manager, kobold_protected, app.state.overrides)
    app.state.ollama = OllamaServing(manager, app.state.overrides)
    app.state.together = TogetherServing(manager, app.state.overrides)
    app.state.llamacpp = LlamaCppServing(manager, app.state.overrides)
    app.state.anthropic = AnthropicServing(manager, app.state.overrides)
    app.state.responses = ResponsesServing(manager, app.state.overrides, ResponseStore())


def _add_middleware(app: FastAPI, settings: Settings, usage: UsageService | None) -> None:
    # Outermost last: access log, body limit, Host/Origin guard, error handlers, CORS, routes.
    app.add_middleware(PathCORS, settings=settings)
    renderers = ErrorRenderers(
        # Together's /api/inference before Kobold's /api/: the first matching prefix wins.
        dialects=(
            Dialect("together", ("/inference", "/api/inference"), together_error_response),
            # Ollama's /api/chat, /api/tags, ... before Kobold's /api/ (/api/v1, /api/extra).
            Dialect("ollama", OLLAMA_PATHS, ollama_error_response),
            Dialect("kobold", ("/api/",), kobold_error_response),
            # OpenAI's /completions before llama.cpp's /completion, which prefixes it.
            Dialect("openai", ("/completions",), error_response),
            Dialect("llamacpp", llamacpp_routes.PATHS, error_response),
            Dialect("anthropic", ("/v1/messages",), anthropic_error_response),
            Dialect("responses", ("/v1/responses",), error_response),
        ),
        default=Dialect("openai", (), error_response),  # also admin and ops routes
    )
    install_error_handlers(app, renderers)
    app.add_middleware(BrowserGuard, settings=settings, renderers=renderers)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, renderers=renderers)
    if usage is not None:  # inside the access log, whose record it reads
        app.add_middleware(UsageMeter, usage=usage, dialect_of=renderers.dialect_name)
    app.add_middleware(
        AccessLog,
        metrics=app.state.metrics,
        dialect_of=renderers.dialect_name,
        recent=app.state.recent,
    )


async def _load(manager: ModelManager) -> None:
    """Load the configured model; when that fails nothing can serve (the server exits)."""
    try:
        await manager.load_configured()
    except LLMServeError as exc:  # a bad file or setting: its message says it all
        manager.declare_fatal(f"cannot load the model: {exc.message}")
    except Exception as exc:
        log.exception("loading the model failed")
        manager.declare_fatal(f"cannot load the model: {type(exc).__name__}: {exc}")
