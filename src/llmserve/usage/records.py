"""Usage records: one row per metered request, and the sums the usage API answers with."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel
from sqlalchemy import Connection, Integer, cast, func, select

from llmserve.usage.schema import usage

GroupBy = Literal["key", "model", "day"]
GROUP_COLUMNS = {"key": usage.c.key_name, "model": usage.c.model, "day": usage.c.day}


@dataclass(frozen=True)
class UsageRecord:
    """What one request used."""

    ts: float
    key_name: str
    model: str | None
    dialect: str | None
    route: str | None
    status: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    duration_ms: float
    cancelled: bool
    request_id: str | None

    def row(self) -> dict[str, object]:
        """The record as a row of the usage table."""
        day = dt.datetime.fromtimestamp(self.ts, dt.UTC).date().isoformat()
        return {**self.__dict__, "day": day}


def insert_records(conn: Connection, records: Sequence[UsageRecord]) -> None:
    """Store records (one statement for the lot)."""
    if records:
        conn.execute(usage.insert(), [record.row() for record in records])


@dataclass(frozen=True)
class UsageFilter:
    """Which records a usage query sums: each field narrows it, None does not."""

    key: str | None = None
    model: str | None = None
    day_from: str | None = None  # YYYY-MM-DD, inclusive
    day_to: str | None = None


class UsageSum(BaseModel):
    """The sums over one group of records (a group field is None when not grouped by it)."""

    key: str | None = None
    model: str | None = None
    day: str | None = None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    total_tokens: int
    errors: int
    cancelled: int
    duration_ms: float


def usage_sums(conn: Connection, where: UsageFilter, group_by: Sequence[GroupBy]) -> list[UsageSum]:
    """Sums of the records `where` selects, one per group."""
    groups = [GROUP_COLUMNS[name].label(name) for name in group_by]
    query = select(
        *groups,
        func.count().label("requests"),
        func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(usage.c.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(cast(usage.c.status >= 400, Integer)), 0).label("errors"),
        func.coalesce(func.sum(cast(usage.c.cancelled, Integer)), 0).label("cancelled"),
        func.coalesce(func.sum(usage.c.duration_ms), 0.0).label("duration_ms"),
    )
    if where.key is not None:
        query = query.where(usage.c.key_name == where.key)
    if where.model is not None:
        query = query.where(usage.c.model == where.model)
    if where.day_from is not None:
        query = query.where(usage.c.day >= where.day_from)
    if where.day_to is not None:
        query = query.where(usage.c.day <= where.day_to)
    if groups:
        query = query.group_by(*groups).order_by(*groups)
    sums = []
    for row in conn.execute(query):
        values = dict(row._mapping)
        values["total_tokens"] = values["prompt_tokens"] + values["completion_tokens"]
        values["duration_ms"] = round(float(values["duration_ms"]), 1)
        sums.append(UsageSum(**values))
    return sums


def record_count(conn: Connection) -> int:
    """How many usage records the database holds."""
    return int(conn.execute(select(func.count()).select_from(usage)).scalar() or 0)
