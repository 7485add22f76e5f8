"""Operational routes: /health (always open), /metrics and /v1/auth/permission."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from llmserve.api.http import LenientJSONRoute
from llmserve.auth import KeyStore, Permission, require_api
from llmserve.models.manager import Health, ModelManager

Granted = Annotated[Permission, Depends(require_api)]


class PermissionResponse(BaseModel):
    """Which permission the presented key has."""

    permission: str


class ModelHealth(BaseModel):
    """GET /health?model=ID: whether that model can answer now (or once loaded)."""

    status: Literal["ok", "unavailable"]
    model: str = Field(description="The name asked about.")
    state: Health = Field(description="loaded, available (loads on demand), loading or failed.")


def model_health(models: ModelManager, name: str) -> JSONResponse:
    """200 for a model that serves or can be loaded, 503 while it loads or after it failed."""
    state = models.health(name)
    ready = state in ("loaded", "available")
    body = ModelHealth(status="ok" if ready else "unavailable", model=name, state=state)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def operator_problems(request: Request) -> list[str]:
    """What the operator should fix while the server keeps serving (a broken api_tokens.yml)."""
    keys: KeyStore = request.app.state.keys
    if keys.disabled:
        return []
    keys.keys()  # re-read a changed file now, so /health tells its state without a request
    return [keys.problem] if keys.problem else []


def build_router() -> APIRouter:
    """/health: 200 when a model serves, 503 while loading or after an engine failure.

    `/health?model=ID` answers for one model (404 for a name no request could be served by).
    """
    router = APIRouter(route_class=LenientJSONRoute, tags=["ops"])

    @router.get("/metrics")
    async def metrics(request: Request, granted: Granted) -> Response:
        body = generate_latest(request.app.state.metrics.registry)
        usage = request.app.state.usage
        if usage is not None and granted >= Permission.ADMIN:  # per-key series: admin only
            body += generate_latest(usage.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/auth/permission")
    async def permission(granted: Granted) -> PermissionResponse:
        return PermissionResponse(permission=granted.name.lower())

    @router.get("/health")
    async def health(request: Request, model: str | None = None) -> JSONResponse:
        models: ModelManager = request.app.state.models
        if model is not None:
            return model_health(models, model)
        body: dict[str, object] = {"status": "ok"}
        if not models.ready:
            reason = models.load_error or models.engine_error() or "loading"
            body = {"status": "unavailable", "reason": reason}
        if problems := operator_problems(request):
            body["problems"] = problems
        return JSONResponse(body, status_code=200 if models.ready else 503)

    return router
