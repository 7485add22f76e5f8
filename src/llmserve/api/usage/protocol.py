"""Request and response models of /v1/keys and /v1/usage."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmserve.models.catalog import Duration
from llmserve.usage.keys import KeyLimits, KeyRecord
from llmserve.usage.records import UsageSum

KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


class CreateKeyRequest(BaseModel):
    """A new key: its name, owner, role, expiry, allowed models and limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=KEY_NAME, description="Unique name (letters, digits, _.@-).")
    owner: str | None = Field(default=None, max_length=200)
    admin: bool = Field(default=False, description="An admin key instead of an API key.")
    expires_at: dt.datetime | None = Field(default=None, description="When the key stops working.")
    expires_in: Duration = Field(default=None, description="Or: seconds (90s, 30m, 12h) from now.")
    models: list[str] | None = Field(default=None, description="Models it may use; none: all.")
    limits: KeyLimits = Field(default_factory=lambda: KeyLimits())


class UpdateKeyRequest(BaseModel):
    """Changes to a database key; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    owner: str | None = Field(default=None, max_length=200)
    expires_at: dt.datetime | None = None
    models: list[str] | None = None
    limits: KeyLimits | None = None


def _moment(seconds: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(seconds, dt.UTC) if seconds is not None else None


class KeyInfo(BaseModel):
    """A key as listed: everything but the key itself."""

    object: Literal["api_key"] = "api_key"
    name: str
    owner: str | None
    role: str
    source: str = Field(description="db (managed here), file (api_tokens.yml), cli (--api-key).")
    prefix: str | None = Field(description="The key's first characters, to recognise it.")
    status: Literal["active", "revoked", "expired"]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    models: list[str] | None
    limits: KeyLimits

    @classmethod
    def of(cls, record: KeyRecord, now: float) -> KeyInfo:
        """The listing of `record`."""
        status: Literal["active", "revoked", "expired"] = "active"
        if record.revoked_at is not None:
            status = "revoked"
        elif record.expires_at is not None and record.expires_at <= now:
            status = "expired"
        created = _moment(record.created_at)
        assert created is not None
        return cls(
            name=record.name,
            owner=record.owner,
            role=record.role,
            source=record.source,
            prefix=record.prefix,
            status=status,
            created_at=created,
            expires_at=_moment(record.expires_at),
            revoked_at=_moment(record.revoked_at),
            models=list(record.allowed_models) if record.allowed_models is not None else None,
            limits=record.limits,
        )


class CreatedKey(KeyInfo):
    """A new key's listing plus the key, shown this once."""

    key: str = Field(description="The key itself; it is stored hashed and never shown again.")


class KeyList(BaseModel):
    """Every key."""

    object: Literal["list"] = "list"
    data: list[KeyInfo]


class UsageList(BaseModel):
    """Usage sums, one per group."""

    object: Literal["list"] = "list"
    group_by: list[str]
    data: list[UsageSum]
