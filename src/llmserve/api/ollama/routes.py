"""Ollama's native routes: `/`, /api/version (open), /api/tags, show, ps, chat, generate, pull."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Send

from llmserve.api.http import LenientJSONRoute, unless_disconnected
from llmserve.api.ollama.protocol import (
    OLLAMA_BANNER,
    ChatRequest,
    EmbedRequest,
    EmbedResponse,
    GenerateRequest,
    LegacyEmbeddingRequest,
    LegacyEmbeddingResponse,
    ModelRequest,
    PsResponse,
    ShowResponse,
    StatusResponse,
    TagsResponse,
    VersionResponse,
)
from llmserve.api.ollama.serving import OllamaServing, one_line, unsupported
from llmserve.auth import Permission, metered, request_permission

NDJSON = "application/x-ndjson"


class NDJSONResponse(StreamingResponse):
    """A stream of JSON lines whose generator is closed however the response ends.

    Closing it closes the engine stream, so a client that leaves mid-answer frees its slot.
    """

    media_type = NDJSON

    def __init__(self, lines: AsyncIterator[str]):
        super().__init__(lines, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._lines = lines

    async def stream_response(self, send: Send) -> None:
        """Send every line, then close the generator (also when sending fails)."""
        closer = getattr(self._lines, "aclose", None)
        if closer is None:
            await super().stream_response(send)
            return
        async with aclosing(self._lines):  # type: ignore[type-var]
            await super().stream_response(send)


class OllamaJSONRoute(LenientJSONRoute):
    """Bodies are JSON whatever their Content-Type says.

    Ollama's own examples post with plain `curl -d '{...}'`, whose Content-Type is a form's.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def json_handler(request: Request) -> Response:
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
            return await handler(request)

        return json_handler


def _serving(request: Request) -> OllamaServing:
    serving: OllamaServing = request.app.state.ollama
    return serving


def _is_admin(request: Request) -> bool:
    return request_permission(request) >= Permission.ADMIN


def json_or_ndjson(result: BaseModel | AsyncIterator[str]) -> Response:
    """A whole answer as JSON, or NDJSON lines."""
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(exclude_none=True), media_type="application/json")
    return NDJSONResponse(result)


def build_open_router() -> APIRouter:
    """`GET /`, `HEAD /` and /api/version: open without a key, as clients probe them first."""
    router = APIRouter(route_class=LenientJSONRoute, tags=["ollama"])

    async def banner(request: Request) -> Response:
        # Browsers go to the web UI; every other client gets Ollama's banner, byte for byte
        # (opencode compares it).
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/ui", status_code=307)
        return PlainTextResponse(OLLAMA_BANNER)

    async def version() -> VersionResponse:
        return VersionResponse()

    router.add_api_route("/", banner, methods=["GET", "HEAD"], include_in_schema=False)
    router.add_api_route("/api/version", version, methods=["GET"])
    router.add_api_route("/api/version", version, methods=["HEAD"], include_in_schema=False)
    return router


def build_router(require_key: bool) -> APIRouter:
    """The Ollama routes; with `require_key` they need an API key (Bearer works)."""
    router = APIRouter(
        route_class=OllamaJSONRoute,
        tags=["ollama"],
        dependencies=[Depends(metered(open_route=not require_key))],
    )
    _add_model_routes(router)
    _add_generation_routes(router)
    _add_unsupported_routes(router)
    return router


def _add_model_routes(router: APIRouter) -> None:
    async def tags(request: Request) -> TagsResponse:
        return _serving(request).tags()

    async def ps(request: Request) -> PsResponse:
        return _serving(request).ps()

    async def show(body: ModelRequest, request: Request) -> ShowResponse:
        return await unless_disconnected(request, _serving(request).show(body))

    async def pull(body: ModelRequest, request: Request) -> Response:
        status = _serving(request).pull(body)
        return json_or_ndjson(one_line(status) if body.stream else status)

    router.add_api_route("/api/tags", tags, methods=["GET"])
    router.add_api_route("/api/tags", tags, methods=["HEAD"], include_in_schema=False)
    router.add_api_route("/api/ps", ps, methods=["GET"])
    router.add_api_route("/api/show", show, methods=["POST"])
    router.add_api_route("/api/pull", pull, methods=["POST"], response_model=StatusResponse)


def _add_generation_routes(router: APIRouter) -> None:
    async def chat(body: ChatRequest, request: Request) -> Response:
        work = _serving(request).chat(body, _is_admin(request))
        return json_or_ndjson(await unless_disconnected(request, work))

    async def generate(body: GenerateRequest, request: Request) -> Response:
        work = _serving(request).generate(body, _is_admin(request))
        return json_or_ndjson(await unless_disconnected(request, work))

    async def embed(body: EmbedRequest, request: Request) -> EmbedResponse:
        return await unless_disconnected(request, _serving(request).embed(body))

    async def embeddings(body: LegacyEmbeddingRequest, request: Request) -> LegacyEmbeddingResponse:
        return await unless_disconnected(request, _serving(request).embeddings(body))

    router.add_api_route("/api/chat", chat, methods=["POST"])
    router.add_api_route("/api/generate", generate, methods=["POST"])
    router.add_api_route("/api/embed", embed, methods=["POST"])
    router.add_api_route("/api/embeddings", embeddings, methods=["POST"])


def _add_unsupported_routes(router: APIRouter) -> None:
    """Model management llmserve leaves to files and the admin API: a clean 400 each."""

    def refuse(operation: str) -> object:
        async def endpoint() -> Response:
            raise unsupported(operation)

        return endpoint

    for path, method, operation in (
        ("/api/create", "POST", "create"),
        ("/api/copy", "POST", "copy"),
        ("/api/delete", "DELETE", "delete"),
        ("/api/push", "POST", "push"),
        ("/api/blobs/{digest}", "POST", "blobs"),
        ("/api/blobs/{digest}", "HEAD", "blobs"),
    ):
        router.add_api_route(path, refuse(operation), methods=[method], include_in_schema=False)  # type: ignore[arg-type]
