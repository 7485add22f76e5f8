"""/v1/keys: create, list, change and revoke keys (admin); /v1/usage: what keys used."""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from llmserve.api.http import LenientJSONRoute
from llmserve.api.usage.protocol import (
    CreatedKey,
    CreateKeyRequest,
    KeyInfo,
    KeyList,
    UpdateKeyRequest,
    UsageList,
)
from llmserve.auth import Permission, identify, require_admin, require_api
from llmserve.core.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from llmserve.usage.keys import ANONYMOUS, KeyRecord
from llmserve.usage.records import GROUP_COLUMNS, GroupBy, UsageFilter
from llmserve.usage.service import UsageService

RESERVED_PREFIXES = ("file-", "cli-")


def _usage(request: Request) -> UsageService:
    usage: UsageService | None = request.app.state.usage
    if usage is None:
        raise ServiceUnavailableError(
            "usage is not recorded on this server (record_usage: false)", code="usage_disabled"
        )
    return usage


Usage = Annotated[UsageService, Depends(_usage)]


def _epoch(moment: dt.datetime | None) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)  # a time without zone is UTC
    return moment.timestamp()


async def _managed(usage: UsageService, name: str) -> KeyRecord:
    """The database key called `name`: 404 if none, 409 if the file or command line owns it."""
    record = await usage.key(name)
    if record is None:
        raise NotFoundError(f"no key is called `{name}`", param="name", code="key_not_found")
    if record.source != "db":
        owner = {"file": "api_tokens.yml", "cli": "--api-key", "builtin": "the server"}
        raise ConflictError(
            f"`{name}` belongs to {owner.get(record.source, record.source)}; change it there",
            param="name",
        )
    return record


def _check_new_name(name: str) -> None:
    if name == ANONYMOUS or name.startswith(RESERVED_PREFIXES):
        raise InvalidRequestError(
            f"`{name}` is reserved (anonymous, file-*, cli-*)", param="name", code="reserved_name"
        )


def build_keys_router() -> APIRouter:
    """Key management: admin key only."""
    router = APIRouter(
        route_class=LenientJSONRoute, tags=["keys"], dependencies=[Depends(require_admin)]
    )

    @router.post("/v1/keys", status_code=201)
    async def create_key(body: CreateKeyRequest, usage: Usage) -> CreatedKey:
        _check_new_name(body.name)
        if await usage.key(body.name) is not None:
            raise ConflictError(f"a key called `{body.name}` exists", param="name")
        expires = _epoch(body.expires_at)
        if body.expires_in is not None:
            expires = time.time() + body.expires_in
        secret, record = await usage.create_key(
            name=body.name,
            owner=body.owner,
            role="admin" if body.admin else "api",
            expires_at=expires,
            allowed_models=body.models,
            limits=body.limits,
        )
        info = KeyInfo.of(record, time.time())
        return CreatedKey(**info.model_dump(), key=secret)

    @router.get("/v1/keys")
    async def list_keys(usage: Usage) -> KeyList:
        now = time.time()
        return KeyList(data=[KeyInfo.of(record, now) for record in await usage.list_keys()])

    @router.get("/v1/keys/{name}")
    async def get_key(name: str, usage: Usage) -> KeyInfo:
        record = await usage.key(name)
        if record is None:
            raise NotFoundError(f"no key is called `{name}`", param="name", code="key_not_found")
        return KeyInfo.of(record, time.time())

    @router.patch("/v1/keys/{name}")
    async def update_key(name: str, body: UpdateKeyRequest, usage: Usage) -> KeyInfo:
        await _managed(usage, name)
        changes: dict[str, Any] = {}
        sent = body.model_fields_set
        if "owner" in sent:
            changes["owner"] = body.owner
        if "expires_at" in sent:
            changes["expires_at"] = _epoch(body.expires_at)
        if "models" in sent:
            changes["allowed_models"] = body.models
        if "limits" in sent and body.limits is not None:
            changes["limits"] = body.limits
        record = await usage.update_key(name, changes) if changes else await usage.key(name)
        assert record is not None
        return KeyInfo.of(record, time.time())

    @router.delete("/v1/keys/{name}")
    async def revoke_key(name: str, usage: Usage) -> KeyInfo:
        await _managed(usage, name)
        await usage.revoke_key(name)
        record = await usage.key(name)
        assert record is not None
        return KeyInfo.of(record, time.time())

    return router


def _group_by(value: str) -> list[GroupBy]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in GROUP_COLUMNS]
    if unknown:
        raise InvalidRequestError(
            f"group_by takes key, model and day, not {unknown[0]!r}", param="group_by"
        )
    return [cast(GroupBy, name) for name in dict.fromkeys(names)]


async def _own_name(request: Request, usage: UsageService) -> str:
    """The principal name of the calling (non-admin) key."""
    caller = identify(request)
    if caller.record is not None:
        return caller.record.name
    if caller.file_key is not None:
        return (await usage.file_principal(caller.file_key)).name
    raise PermissionDeniedError("this key has no usage of its own")


def build_usage_router() -> APIRouter:
    """Usage sums: the admin key sees every key's, an API key its own."""
    router = APIRouter(route_class=LenientJSONRoute, tags=["keys"])

    @router.get("/v1/usage")
    async def usage_sums(
        request: Request,
        usage: Usage,
        permission: Annotated[Permission, Depends(require_api)],
        key: str | None = None,
        model: str | None = None,
        day_from: Annotated[dt.date | None, Query(alias="from")] = None,
        day_to: Annotated[dt.date | None, Query(alias="to")] = None,
        group_by: str = "key,model,day",
    ) -> JSONResponse:
        groups = _group_by(group_by)
        if permission < Permission.ADMIN:
            own = await _own_name(request, usage)
            if key is not None and key != own:
                raise PermissionDeniedError("an API key may read only its own usage", param="key")
            key = own
        where = UsageFilter(
            key=key,
            model=model,
            day_from=day_from.isoformat() if day_from else None,
            day_to=day_to.isoformat() if day_to else None,
        )
        body = UsageList(group_by=list(groups), data=await usage.usage(where, groups))
        return JSONResponse(body.model_dump(mode="json"))

    return router
