"""KoboldAI routes: /api/v1 (also as /api/latest) as KoboldAI United has them, /api/extra as
KoboldCpp adds them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from llmserve.api.http import LenientJSONRoute, sse_response, unless_disconnected
from llmserve.api.kobold.protocol import (
    AbortResponse,
    ExtraVersion,
    GenkeyRequest,
    IntValue,
    KoboldCheckResponse,
    KoboldGenerateRequest,
    KoboldGenerateResponse,
    Perf,
    ResultValue,
    TokenCountRequest,
    TokenCountResponse,
)
from llmserve.api.kobold.serving import KoboldServing
from llmserve.auth import Permission, key_permission, metered, presented_keys


def _serving(request: Request) -> KoboldServing:
    serving: KoboldServing = request.app.state.kobold
    return serving


def _caller_key(request: Request) -> str | None:
    """The API key the caller presented that grants access (it scopes the caller's genkeys)."""
    for key in presented_keys(request):
        if key_permission(request, key) >= Permission.API:
            return key
    return None


CallerKey = Annotated[str | None, Depends(_caller_key)]


def build_router(require_key: bool) -> APIRouter:
    """The Kobold routes; with `require_key` all but the version probes need an API key."""
    guarded = APIRouter(
        route_class=LenientJSONRoute, dependencies=[Depends(metered(open_route=not require_key))]
    )
    _add_generation_routes(guarded)
    _add_info_routes(guarded)
    # Open like KoboldCpp's, so a client can learn `protected` before it has a key.
    router = APIRouter(route_class=LenientJSONRoute, tags=["kobold"])
    router.add_api_route("/api/extra/version", _extra_version, methods=["GET"])
    for prefix in ("/api/v1", "/api/latest"):
        router.add_api_route(
            f"{prefix}/info/version",
            _united_version,
            methods=["GET"],
            include_in_schema=prefix == "/api/v1",
        )
    router.include_router(guarded)
    return router


def _add_generation_routes(router: APIRouter) -> None:
    async def generate(
        body: KoboldGenerateRequest, request: Request, key: CallerKey
    ) -> KoboldGenerateResponse:
        return await unless_disconnected(request, _serving(request).generate(body, key))

    async def generate_stream(
        body: KoboldGenerateRequest, request: Request, key: CallerKey
    ) -> Response:
        events = await unless_disconnected(request, _serving(request).stream(body, key))
        return sse_response(events)

    async def check_get(
        request: Request, key: CallerKey, genkey: str | None = None
    ) -> KoboldCheckResponse:
        return _serving(request).check(genkey, key)

    async def check_post(
        request: Request, key: CallerKey, body: GenkeyRequest | None = None
    ) -> KoboldCheckResponse:
        return _serving(request).check(body.genkey if body else None, key)

    async def abort(
        request: Request, key: CallerKey, body: GenkeyRequest | None = None
    ) -> AbortResponse:
        return _serving(request).abort(body.genkey if body else None, key)

    for prefix in ("/api/v1", "/api/latest"):
        router.add_api_route(
            f"{prefix}/generate",
            generate,
            methods=["POST"],
            include_in_schema=prefix == "/api/v1",
        )
    router.add_api_route("/api/extra/generate/stream", generate_stream, methods=["POST"])
    router.add_api_route("/api/extra/generate/check", check_get, methods=["GET"])
    router.add_api_route("/api/extra/generate/check", check_post, methods=["POST"])
    router.add_api_route("/api/extra/abort", abort, methods=["POST"])


def _add_info_routes(router: APIRouter) -> None:
    async def tokencount(body: TokenCountRequest, request: Request) -> TokenCountResponse:
        return await _serving(request).tokencount(body.prompt, body.special is not False)

    async def model(request: Request) -> ResultValue:
        return _serving(request).model_name()

    async def max_context_length(request: Request) -> IntValue:
        return _serving(request).context_length()

    async def max_length(request: Request) -> IntValue:
        return _serving(request).max_length()

    async def perf(request: Request) -> Perf:
        return _serving(request).perf()

    for prefix in ("/api/v1", "/api/latest"):
        shown = prefix == "/api/v1"
        router.add_api_route(f"{prefix}/model", model, methods=["GET"], include_in_schema=shown)
        router.add_api_route(
            f"{prefix}/config/max_context_length",
            max_context_length,
            methods=["GET"],
            include_in_schema=shown,
        )
        router.add_api_route(
            f"{prefix}/config/max_length", max_length, methods=["GET"], include_in_schema=shown
        )
    router.add_api_route("/api/extra/tokencount", tokencount, methods=["POST"])
    router.add_api_route("/api/extra/true_max_context_length", max_context_length, methods=["GET"])
    router.add_api_route("/api/extra/perf", perf, methods=["GET"])


async def _extra_version(request: Request) -> ExtraVersion:
    return _serving(request).extra_version()


async def _united_version(request: Request) -> ResultValue:
    return _serving(request).united_version()
