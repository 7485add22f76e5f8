"""Together's legacy route: POST /inference, and /api/inference where the legacy SDK posts."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api.http import LenientJSONRoute, json_or_sse, unless_disconnected
from llmserve.api.together.protocol import InferenceRequest, InferenceResponse
from llmserve.api.together.serving import TogetherServing


def _serving(request: Request) -> TogetherServing:
    serving: TogetherServing = request.app.state.together
    return serving


def build_router() -> APIRouter:
    """The /inference route under both of its paths."""
    router = APIRouter(route_class=LenientJSONRoute, tags=["together"])

    async def inference(body: InferenceRequest, request: Request) -> Response:
        return json_or_sse(await unless_disconnected(request, _serving(request).inference(body)))

    for path in ("/inference", "/api/inference"):
        router.add_api_route(
            path,
            inference,
            methods=["POST"],
            response_model=InferenceResponse,
            include_in_schema=path == "/inference",
        )
    return router
