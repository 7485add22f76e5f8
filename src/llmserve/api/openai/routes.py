"""OpenAI-compatible routes, under /v1 and (as vLLM and llama.cpp offer them) without it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from llmserve.api.http import LenientJSONRoute, json_or_sse, unless_disconnected
from llmserve.api.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)
from llmserve.api.openai.serving import OpenAIServing
from llmserve.auth import Permission, require_api
from llmserve.core.errors import InvalidRequestError

Granted = Annotated[Permission, Depends(require_api)]


def _serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.openai
    return serving


def build_router() -> APIRouter:
    """Routes of the OpenAI dialect, each registered with and without the /v1 prefix."""
    router = APIRouter(route_class=LenientJSONRoute, tags=["openai"])

    async def completions(body: CompletionRequest, request: Request) -> Response:
        return json_or_sse(await unless_disconnected(request, _serving(request).completion(body)))

    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return json_or_sse(await unless_disconnected(request, _serving(request).chat(body)))

    async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
        return await unless_disconnected(request, _serving(request).embeddings(body))

    async def list_models(request: Request, granted: Granted) -> ModelList:
        return _serving(request).list_models(include_available=granted >= Permission.ADMIN)

    async def get_model(model_id: str, request: Request) -> ModelCard:
        return _serving(request).model_card(model_id)

    async def rerank() -> Response:
        # vLLM's, Cohere's and llama-server's rerank/score routes: out of scope, said plainly.
        raise InvalidRequestError(
            "reranking and scoring are not served by llmserve; use /v1/embeddings and compare "
            "the vectors",
            param="model",
            code="unsupported_endpoint",
        )

    for path in ("/v1/rerank", "/v2/rerank", "/rerank", "/v1/score", "/score", "/reranking"):
        router.add_api_route(path, rerank, methods=["POST"], include_in_schema=False)

    for prefix in ("/v1", ""):
        router.add_api_route(
            f"{prefix}/completions",
            completions,
            methods=["POST"],
            response_model=CompletionResponse,
            include_in_schema=bool(prefix),
        )
        router.add_api_route(
            f"{prefix}/chat/completions",
            chat_completions,
            methods=["POST"],
            response_model=ChatCompletionResponse,
            include_in_schema=bool(prefix),
        )
        router.add_api_route(
            f"{prefix}/embeddings",
            embeddings,
            methods=["POST"],
            response_model=EmbeddingResponse,
            include_in_schema=bool(prefix),
        )
        router.add_api_route(
            f"{prefix}/models", list_models, methods=["GET"], include_in_schema=bool(prefix)
        )
        router.add_api_route(
            f"{prefix}/models/{{model_id:path}}",
            get_model,
            methods=["GET"],
            include_in_schema=bool(prefix),
        )
    return router
