"""Management routes (admin key) and token routes (API key), TabbyAPI and vLLM style."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from llmserve.api.admin.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    LoraList,
    LoraLoadRequest,
    ModelCardDetails,
    ModelLoadRequest,
    ModelTarget,
    ModelUnloadRequest,
    OverrideList,
    OverrideSwitchRequest,
    StatusResponse,
    TemplateList,
    TemplateSwitchRequest,
    TokenDecodeRequest,
    TokenDecodeResponse,
    TokenEncodeRequest,
    TokenEncodeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from llmserve.api.admin.serving import AdminServing
from llmserve.api.http import LenientJSONRoute, json_or_sse
from llmserve.auth import Permission, require_admin, require_api


def _admin(request: Request) -> AdminServing:
    serving: AdminServing = request.app.state.admin
    return serving


Admin = Annotated[AdminServing, Depends(_admin)]
Granted = Annotated[Permission, Depends(require_api)]


def build_admin_router() -> APIRouter:
    """Routes that change what is loaded: admin key only."""
    router = APIRouter(
        route_class=LenientJSONRoute, tags=["admin"], dependencies=[Depends(require_admin)]
    )

    @router.post("/v1/model/load", response_model=StatusResponse)
    async def load_model(body: ModelLoadRequest, admin: Admin) -> Response:
        if body.stream:
            return json_or_sse(await admin.load_model_stream(body))
        return json_or_sse(await admin.load_model(body))

    @router.post("/v1/model/unload")
    async def unload_model(admin: Admin, body: ModelUnloadRequest | None = None) -> StatusResponse:
        return await admin.unload_model(body.model_name if body is not None else None)

    @router.post("/v1/lora/load")
    async def load_loras(body: LoraLoadRequest, admin: Admin) -> StatusResponse:
        return await admin.load_loras(body)

    @router.post("/v1/lora/unload")
    async def unload_loras(admin: Admin, body: ModelTarget | None = None) -> StatusResponse:
        return await admin.unload_loras(body.model if body is not None else None)

    @router.post("/v1/sampling/override/switch")
    async def switch_overrides(body: OverrideSwitchRequest, admin: Admin) -> StatusResponse:
        return admin.switch_overrides(body)

    @router.post("/v1/sampling/override/unload")
    async def unload_overrides(admin: Admin) -> StatusResponse:
        return admin.unload_overrides()

    @router.post("/v1/template/switch")
    async def switch_template(body: TemplateSwitchRequest, admin: Admin) -> StatusResponse:
        return admin.switch_template(body.name, body.model)

    @router.post("/v1/template/unload")
    async def unload_template(admin: Admin, body: ModelTarget | None = None) -> StatusResponse:
        return admin.unload_template(body.model if body is not None else None)

    return router


def build_info_router() -> APIRouter:
    """Read-only model, LoRA, preset, template and token routes: any valid key."""
    router = APIRouter(
        route_class=LenientJSONRoute, tags=["info"], dependencies=[Depends(require_api)]
    )

    @router.get("/v1/model")
    async def model_card(admin: Admin) -> ModelCardDetails:
        return admin.model_card()

    @router.get("/v1/loras")
    async def list_loras(admin: Admin, granted: Granted, model: str | None = None) -> LoraList:
        return admin.list_loras(granted >= Permission.ADMIN, model)

    @router.get("/v1/sampling/overrides")
    async def list_overrides(admin: Admin) -> OverrideList:
        return admin.list_overrides()

    @router.get("/v1/templates")
    async def list_templates(admin: Admin, model: str | None = None) -> TemplateList:
        return admin.list_templates(model)

    @router.post("/v1/token/encode")
    async def encode(body: TokenEncodeRequest, admin: Admin) -> TokenEncodeResponse:
        return await admin.encode(body)

    @router.post("/v1/token/decode")
    async def decode(body: TokenDecodeRequest, admin: Admin) -> TokenDecodeResponse:
        return admin.decode(body)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest, admin: Admin) -> TokenizeResponse:
        return await admin.tokenize(body)

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, admin: Admin) -> DetokenizeResponse:
        return await admin.detokenize(body)

    @router.get("/tokenizer_info")
    async def tokenizer_info(admin: Admin) -> TokenizerInfo:
        return admin.tokenizer_info()

    return router
