"""OpenAI Responses routes: create (JSON or typed SSE), and get/delete of stored responses."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api.http import LenientJSONRoute, sse_response, unless_disconnected
from llmserve.api.responses.protocol import DeletedResponse, ResponseObject, ResponsesRequest
from llmserve.api.responses.serving import ResponsesServing


def _serving(request: Request) -> ResponsesServing:
    serving: ResponsesServing = request.app.state.responses
    return serving


def build_router() -> APIRouter:
    """POST /v1/responses, GET and DELETE /v1/responses/{response_id}."""
    router = APIRouter(route_class=LenientJSONRoute, tags=["responses"])

    async def create(body: ResponsesRequest, request: Request) -> Response:
        result = await unless_disconnected(request, _serving(request).create(body))
        if isinstance(result, ResponseObject):
            return Response(result.model_dump_json(), media_type="application/json")
        return sse_response(result)

    async def get(response_id: str, request: Request) -> ResponseObject:
        return _serving(request).get(response_id)

    async def delete(response_id: str, request: Request) -> DeletedResponse:
        return _serving(request).delete(response_id)

    router.add_api_route("/v1/responses", create, methods=["POST"], response_model=ResponseObject)
    router.add_api_route("/v1/responses/{response_id}", get, methods=["GET"])
    router.add_api_route("/v1/responses/{response_id}", delete, methods=["DELETE"])
    return router
