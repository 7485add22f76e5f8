"""Anthropic Messages routes: POST /v1/messages and /v1/messages/count_tokens.

`anthropic-version`, `anthropic-beta` and Claude Code's `?beta=true` are accepted and change
nothing; keys come from `x-api-key` or `Authorization: Bearer` (the app's `require_api`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api.anthropic.protocol import (
    CountTokensRequest,
    CountTokensResponse,
    MessageResponse,
    MessagesRequest,
)
from llmserve.api.anthropic.serving import AnthropicServing
from llmserve.api.http import LenientJSONRoute, sse_response, unless_disconnected


def _serving(request: Request) -> AnthropicServing:
    serving: AnthropicServing = request.app.state.anthropic
    return serving


def build_router() -> APIRouter:
    """The Messages routes (under /v1 only, where the SDK and Claude Code post)."""
    router = APIRouter(route_class=LenientJSONRoute, tags=["anthropic"])

    async def messages(body: MessagesRequest, request: Request) -> Response:
        result = await unless_disconnected(request, _serving(request).messages(body))
        if isinstance(result, MessageResponse):
            return Response(result.model_dump_json(), media_type="application/json")
        return sse_response(result)

    async def count_tokens(body: CountTokensRequest, request: Request) -> CountTokensResponse:
        return await unless_disconnected(request, _serving(request).count_tokens(body))

    router.add_api_route("/v1/messages", messages, methods=["POST"], response_model=MessageResponse)
    router.add_api_route("/v1/messages/count_tokens", count_tokens, methods=["POST"])
    return router
