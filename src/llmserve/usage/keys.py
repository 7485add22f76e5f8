"""Keys as database records: named, owned, hashed, with limits, expiry and allowed models."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, Row, select

from llmserve.usage.schema import api_keys

ANONYMOUS = "anonymous"
KEY_PREFIX = "llms-"
Role = Literal["api", "admin", "anonymous"]
Source = Literal["db", "file", "cli", "builtin"]
QuotaPeriod = Literal["day", "week", "month"]


class KeyLimits(BaseModel):
    """Per-key limits; a missing value means no limit of that kind."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(
        default=None, ge=1, description="Tokens (prompt + completion) per minute."
    )
    max_concurrent: int | None = Field(
        default=None, ge=1, description="Requests in flight at once."
    )
    quota_tokens: int | None = Field(default=None, ge=1, description="Tokens per quota period.")
    quota_period: QuotaPeriod = Field(default="month", description="The quota's period (UTC).")

    def any(self) -> bool:
        """Whether any limit is set."""
        return any(
            v is not None for v in (self.rpm, self.tpm, self.max_concurrent, self.quota_tokens)
        )


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored (never the key itself)."""

    id: int
    name: str
    owner: str | None
    role: Role
    source: Source
    key_hash: str | None
    prefix: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    allowed_models: tuple[str, ...] | None
    limits: KeyLimits

    def usable(self, now: float) -> bool:
        """Neither revoked nor expired."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest a key is stored and looked up by."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key, recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _record(row: Row[Any]) -> KeyRecord:
    models = json.loads(row.allowed_models) if row.allowed_models is not None else None
    limits = KeyLimits(
        rpm=row.rpm,
        tpm=row.tpm,
        max_concurrent=row.max_concurrent,
        quota_tokens=row.quota_tokens,
        quota_period=row.quota_period or "month",
    )
    return KeyRecord(
        row.id,
        row.name,
        row.owner,
        row.role,
        row.source,
        row.key_hash,
        row.prefix,
        row.created_at,
        row.expires_at,
        row.revoked_at,
        tuple(models) if models is not None else None,
        limits,
    )


def _limit_columns(limits: KeyLimits) -> dict[str, Any]:
    return limits.model_dump()


def all_keys(conn: Connection) -> list[KeyRecord]:
    """Every key, oldest first."""
    return [_record(row) for row in conn.execute(select(api_keys).order_by(api_keys.c.id))]


def key_named(conn: Connection, name: str) -> KeyRecord | None:
    """The key called `name`, if any."""
    row = conn.execute(select(api_keys).where(api_keys.c.name == name)).first()
    return _record(row) if row is not None else None


def key_by_id_for_update(conn: Connection, key_id: int) -> KeyRecord | None:
    """The key with `key_id`, locked until the transaction ends (PostgreSQL; SQLite locks all)."""
    query = select(api_keys).where(api_keys.c.id == key_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
    return _record(row) if row is not None else None


def insert_key(
    conn: Connection,
    *,
    name: str,
    key_hash: str | None,
    prefix: str | None,
    role: Role,
    source: Source,
    owner: str | None = None,
    expires_at: float | None = None,
    allowed_models: Sequence[str] | None = None,
    limits: KeyLimits | None = None,
) -> KeyRecord:
    """Store a new key record and return it."""
    values = {
        "name": name,
        "owner": owner,
        "role": role,
        "source": source,
        "key_hash": key_hash,
        "prefix": prefix,
        "created_at": time.time(),
        "expires_at": expires_at,
        "allowed_models": json.dumps(list(allowed_models)) if allowed_models is not None else None,
        **_limit_columns(limits or KeyLimits()),
    }
    conn.execute(api_keys.insert().values(**values))
    found = key_named(conn, name)
    assert found is not None
    return found


def update_key(conn: Connection, name: str, changes: dict[str, Any]) -> KeyRecord | None:
    """Apply column `changes` to the key called `name`; the updated record."""
    if "allowed_models" in changes and changes["allowed_models"] is not None:
        changes = {**changes, "allowed_models": json.dumps(list(changes["allowed_models"]))}
    if "limits" in changes:
        limits = changes.pop("limits")
        changes.update(_limit_columns(limits))
    conn.execute(api_keys.update().where(api_keys.c.name == name).values(**changes))
    return key_named(conn, name)


def revoke_key(conn: Connection, name: str) -> None:
    """Mark the key called `name` revoked now (its record and usage stay)."""
    conn.execute(
        api_keys.update()
        .where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=time.time())
    )


def ensure_anonymous(conn: Connection, limits: KeyLimits) -> KeyRecord:
    """The one principal of routes opened without keys, its limits set from the settings."""
    found = key_named(conn, ANONYMOUS)
    if found is None:
        return insert_key(
            conn,
            name=ANONYMOUS,
            key_hash=None,
            prefix=None,
            role="anonymous",
            source="builtin",
            limits=limits,
        )
    if found.limits != limits:
        updated = update_key(conn, ANONYMOUS, {"limits": limits})
        assert updated is not None
        return updated
    return found


def shown_prefix(key: str) -> str | None:
    """The start of a key shown in listings: 4 characters, and none of a short key."""
    return key[:4] if len(key) >= 16 else None


def file_key_name(source: Source, role: Role, key_hash: str) -> str:
    """A stable name for a key from api_tokens.yml or --api-key: where it is from, its hash."""
    return f"{source}-{role}-{key_hash[:8]}"


def import_keys(conn: Connection, keys: Iterable[tuple[str, Role, Source]]) -> dict[str, KeyRecord]:
    """Record the file's and the command line's keys (read-only rows); records by hash."""
    known = {record.key_hash: record for record in all_keys(conn) if record.key_hash}
    found: dict[str, KeyRecord] = {}
    for key, role, source in keys:
        digest = hash_key(key)
        record = known.get(digest)
        if record is None:
            record = insert_key(
                conn,
                name=file_key_name(source, role, digest),
                key_hash=digest,
                prefix=shown_prefix(key),
                role=role,
                source=source,
            )
            known[digest] = record
        found[digest] = record
    return found
