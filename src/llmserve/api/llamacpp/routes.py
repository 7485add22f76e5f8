"""llama-server's native routes: /completion, /infill, /props, /slots, /apply-template."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from llmserve.api.http import LenientJSONRoute, sse_response, unless_disconnected
from llmserve.api.llamacpp.protocol import (
    ApplyTemplateRequest,
    ApplyTemplateResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResult,
    InfillRequest,
    PropsResponse,
    Slot,
)
from llmserve.api.llamacpp.serving import Completed, LlamaCppServing
from llmserve.auth import require_admin

# The paths this dialect answers (the app's dialect table names it for metrics and logs).
PATHS = ("/completion", "/infill", "/props", "/slots", "/apply-template", "/embedding")


def _serving(request: Request) -> LlamaCppServing:
    serving: LlamaCppServing = request.app.state.llamacpp
    return serving


def _respond(result: Completed | AsyncIterator[str]) -> Response:
    """Whole completions as JSON (in llama-server's key set), or their SSE events."""
    if isinstance(result, Completed):
        return Response(result.json(), media_type="application/json")
    return sse_response(result)


def build_router() -> APIRouter:
    """Routes of the llama.cpp dialect (an API key; /slots the admin key)."""
    router = APIRouter(route_class=LenientJSONRoute, tags=["llama.cpp"])

    @router.post("/completion", response_model=CompletionResponse)
    async def completion(body: CompletionRequest, request: Request) -> Response:
        return _respond(await unless_disconnected(request, _serving(request).completion(body)))

    @router.post("/infill", response_model=CompletionResponse)
    async def infill(body: InfillRequest, request: Request) -> Response:
        return _respond(await unless_disconnected(request, _serving(request).infill(body)))

    @router.get("/props")
    async def props(request: Request) -> PropsResponse:
        return _serving(request).props()

    @router.get("/slots", dependencies=[Depends(require_admin)])
    async def slots(request: Request) -> list[Slot]:
        return _serving(request).slots()

    @router.post("/embedding")
    async def embedding(body: EmbeddingRequest, request: Request) -> list[EmbeddingResult]:
        return await unless_disconnected(request, _serving(request).embedding(body))

    @router.post("/apply-template")
    async def apply_template(body: ApplyTemplateRequest, request: Request) -> ApplyTemplateResponse:
        return await _serving(request).apply_template(body)

    return router
