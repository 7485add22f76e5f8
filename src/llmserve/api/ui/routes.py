"""The web UI's routes: static files at /ui (open, the page asks for the key) and console JSON.

The UI is build-free: the files under `llmserve/ui/static/` are what the browser runs (ES modules,
CSS, HTML), read once when the router is built. Every response carries a Content-Security-Policy
that allows this origin only and no inline script or style.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from llmserve import __version__
from llmserve.api.http import LenientJSONRoute
from llmserve.api.ui.protocol import (
    ConsoleModel,
    ConsoleModelList,
    RecentRequest,
    RecentRequestList,
    UiConfig,
)
from llmserve.auth import KeyStore, require_admin
from llmserve.core.errors import NotFoundError
from llmserve.models.manager import ModelManager
from llmserve.observability import RecentRequests

STATIC_PACKAGE = "llmserve.ui"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Files are not fingerprinted: revalidate each time (a 304 on loopback costs nothing), so an
    # upgraded server never runs with yesterday's modules.
    "Cache-Control": "no-cache",
}
# The UI's own traffic (its files, its polling) would push real requests out of the ring.
# Health probes (load balancers, systemd) are as frequent and say nothing about clients.
QUIET_PREFIXES = (
    "/ui",
    "/v1/requests/recent",
    "/v1/console/",
    "/v1/auth/permission",
    "/health",
)
RING_SIZE = 200


@dataclass(frozen=True)
class Asset:
    """One static file, ready to send."""

    body: bytes
    media_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Every file under the static folder by its path there (`app.js`, `img/logo.svg`)."""
    root = resources.files(STATIC_PACKAGE) / "static"
    found: dict[str, Asset] = {}
    _walk(root, "", found)
    return found


def _walk(folder: Traversable, prefix: str, found: dict[str, Asset]) -> None:
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            _walk(entry, name + "/", found)
            continue
        suffix = "." + name.rpartition(".")[2]
        if suffix in CONTENT_TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            found[name] = Asset(body, CONTENT_TYPES[suffix], etag)


def _send(asset: Asset, request: Request) -> Response:
    headers = {**SECURITY_HEADERS, "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def build_router(playground: bool, console: bool) -> APIRouter:
    """GET /ui, /ui/config.json and /ui/<file>: open, since the page itself asks for the key."""
    assets = load_assets()
    router = APIRouter(route_class=LenientJSONRoute, tags=["ui"])

    async def index(request: Request) -> Response:
        return _send(assets["index.html"], request)

    async def config(request: Request) -> Response:
        keys: KeyStore = request.app.state.keys
        body = UiConfig(
            version=__version__, playground=playground, console=console, auth=not keys.disabled
        )
        return Response(
            body.model_dump_json(), media_type="application/json", headers=SECURITY_HEADERS
        )

    async def asset(name: str, request: Request) -> Response:
        found = assets.get(name or "index.html")
        if found is None:
            raise NotFoundError(f"the web UI has no file {name[:100]!r}")
        return _send(found, request)

    for path, endpoint in (("/ui", index), ("/ui/config.json", config), ("/ui/{name:path}", asset)):
        router.add_api_route(path, endpoint, methods=["GET", "HEAD"], include_in_schema=False)
    return router


def _recent(request: Request) -> RecentRequests:
    recent: RecentRequests = request.app.state.recent
    return recent


def _manager(request: Request) -> ModelManager:
    manager: ModelManager = request.app.state.models
    return manager


Recent = Annotated[RecentRequests, Depends(_recent)]
Manager = Annotated[ModelManager, Depends(_manager)]


def build_console_router() -> APIRouter:
    """The admin console's read-only views: recent requests and models with their state."""
    router = APIRouter(
        route_class=LenientJSONRoute, tags=["admin"], dependencies=[Depends(require_admin)]
    )

    @router.get("/v1/requests/recent")
    async def recent_requests(
        recent: Recent, limit: Annotated[int, Query(ge=1, le=RING_SIZE)] = RING_SIZE
    ) -> RecentRequestList:
        rows = [
            RecentRequest(time=ended, **asdict(record)) for ended, record in recent.newest(limit)
        ]
        return RecentRequestList(size=recent.size, data=rows)

    @router.get("/v1/console/models")
    async def console_models(manager: Manager) -> ConsoleModelList:
        return ConsoleModelList(data=_console_models(manager))

    return router


def _console_models(manager: ModelManager) -> list[ConsoleModel]:
    cards = [
        ConsoleModel(
            id=m.id,
            state="failed" if m.failed else "loaded",
            aliases=list(m.aliases),
            context_length=m.engine.info.context_length,
            path=m.engine.info.path,
        )
        for m in manager.loaded()
    ]
    named = {name for m in manager.loaded() for name in m.names}
    if manager.loading is not None and manager.loading not in named:
        cards.append(ConsoleModel(id=manager.loading, state="loading"))
        named.add(manager.loading)
    cards += [
        ConsoleModel(id=entry.name, state="available", path=str(entry.path))
        for entry in manager.available()
        if entry.name not in named
    ]
    return cards
