"""Operational routes: /health."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llmserve.models.manager import ModelManager


def build_router() -> APIRouter:
    """/health: 200 when a model serves, 503 while loading or after an engine failure."""
    router = APIRouter(tags=["ops"])

    @router.get("/health")
    async def health(request: Request) -> JSONResponse:
        models: ModelManager = request.app.state.models
        if models.ready:
            return JSONResponse({"status": "ok"})
        reason = models.load_error or models.engine_error() or "loading"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    return router
