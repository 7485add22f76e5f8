"""Limit checks: one transaction per admission, shared by every replica on one database.

Requests and tokens per minute count in fixed one-minute windows; a token quota counts per
UTC day, week or month; concurrency counts lease rows, which their replica renews and which
expire when it dies. The key's row is locked for the check (PostgreSQL's FOR UPDATE; SQLite's
write lock covers the whole file), so two replicas never both admit the N+1st request.

Tokens are counted when a request ends, so a quota or token limit can be overrun by what the
requests already in flight at the moment it is reached go on to use; nothing new is admitted
after that.
"""

from __future__ import annotations

import calendar
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection, Table, and_, delete, func, select, update

from llmserve.usage.keys import KeyLimits, KeyRecord, QuotaPeriod, key_by_id_for_update
from llmserve.usage.schema import leases, quota_usage, rate_windows

WINDOW_SECONDS = 60
LEASE_SECONDS = 30.0  # how long a lease outlives its replica's last renewal
Exceeded = Literal["requests", "tokens", "quota", "concurrency", "revoked"]


@dataclass(frozen=True)
class RateState:
    """What the rate-limit headers tell: limits, what remains, seconds until each resets."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None


@dataclass(frozen=True)
class Admission:
    """A request let in: its key, the lease it holds (if the key limits concurrency), headers."""

    key: KeyRecord
    lease_id: str | None
    state: RateState


@dataclass(frozen=True)
class Refusal:
    """A request kept out: which limit, why, and when to retry."""

    exceeded: Exceeded
    message: str
    retry_after: float
    state: RateState


def _window_row(conn: Connection, key_id: int, window: int) -> tuple[int, int]:
    row = conn.execute(
        select(rate_windows.c.requests, rate_windows.c.tokens).where(
            rate_windows.c.key_id == key_id, rate_windows.c.window == window
        )
    ).first()
    return (row.requests, row.tokens) if row is not None else (0, 0)


def period_bounds(now: float, period: QuotaPeriod) -> tuple[int, int]:
    """The UTC start and end (epoch seconds) of the quota period holding `now`."""
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if period == "day":
        start, end = today, today + dt.timedelta(days=1)
    elif period == "week":
        start = today - dt.timedelta(days=today.weekday())
        end = start + dt.timedelta(days=7)
    else:
        start = today.replace(day=1)
        days = calendar.monthrange(start.year, start.month)[1]
        end = start + dt.timedelta(days=days)
    return _epoch(start), _epoch(end)


def _epoch(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


def _quota_used(conn: Connection, key_id: int, period_start: int) -> int:
    used = conn.execute(
        select(quota_usage.c.tokens).where(
            quota_usage.c.key_id == key_id, quota_usage.c.period_start == period_start
        )
    ).scalar()
    return int(used or 0)


def _live_leases(conn: Connection, key_id: int, now: float) -> int:
    conn.execute(delete(leases).where(leases.c.key_id == key_id, leases.c.expires_at <= now))
    count = conn.execute(
        select(func.count()).select_from(leases).where(leases.c.key_id == key_id)
    ).scalar()
    return int(count or 0)


def _state(limits: KeyLimits, requests: int, tokens: int, now: float) -> RateState:
    reset = (int(now // WINDOW_SECONDS) + 1) * WINDOW_SECONDS - now
    return RateState(
        limit_requests=limits.rpm,
        remaining_requests=max(0, limits.rpm - requests) if limits.rpm else None,
        reset_requests=reset if limits.rpm else None,
        limit_tokens=limits.tpm,
        remaining_tokens=max(0, limits.tpm - tokens) if limits.tpm else None,
        reset_tokens=reset if limits.tpm else None,
    )


def admit(conn: Connection, key_id: int, replica: str, now: float) -> Admission | Refusal:
    """Check every limit of the key and, if none is reached, count the request in."""
    key = key_by_id_for_update(conn, key_id)
    if key is None or not key.usable(now):
        return Refusal("revoked", "this key was revoked or has expired", 0, RateState())
    limits = key.limits
    window = int(now // WINDOW_SECONDS)
    requests, tokens = _window_row(conn, key.id, window) if (limits.rpm or limits.tpm) else (0, 0)
    refusal = _refusal(conn, key, requests, tokens, now)
    if refusal is not None:
        return refusal
    if limits.rpm or limits.tpm:
        _add(conn, rate_windows, {"key_id": key.id, "window": window}, requests=1, tokens=0)
        requests += 1
    lease_id = None
    if limits.max_concurrent:
        lease_id = uuid.uuid4().hex
        conn.execute(
            leases.insert().values(
                id=lease_id, key_id=key.id, replica=replica, expires_at=now + LEASE_SECONDS
            )
        )
    return Admission(key, lease_id, _state(limits, requests, tokens, now))


def _refusal(
    conn: Connection, key: KeyRecord, requests: int, tokens: int, now: float
) -> Refusal | None:
    limits = key.limits
    state = _state(limits, requests, tokens, now)
    reset = (int(now // WINDOW_SECONDS) + 1) * WINDOW_SECONDS - now
    if limits.rpm and requests >= limits.rpm:
        return Refusal(
            "requests", f"rate limit reached: {limits.rpm} requests per minute", reset, state
        )
    if limits.tpm and tokens >= limits.tpm:
        return Refusal(
            "tokens", f"rate limit reached: {limits.tpm} tokens per minute", reset, state
        )
    if limits.quota_tokens:
        start, end = period_bounds(now, limits.quota_period)
        if _quota_used(conn, key.id, start) >= limits.quota_tokens:
            message = f"token quota reached: {limits.quota_tokens} tokens per {limits.quota_period}"
            return Refusal("quota", message, end - now, state)
    if limits.max_concurrent and _live_leases(conn, key.id, now) >= limits.max_concurrent:
        message = f"concurrency limit reached: {limits.max_concurrent} requests at once"
        return Refusal("concurrency", message, 1.0, state)
    return None


def _add(conn: Connection, table: Table, where: dict[str, int], **amounts: int) -> None:
    """Add `amounts` to the row matching `where`, creating it; callers hold the key's lock."""
    condition = and_(*(table.c[name] == value for name, value in where.items()))
    values = {name: table.c[name] + amount for name, amount in amounts.items()}
    if conn.execute(update(table).where(condition).values(**values)).rowcount == 0:
        conn.execute(table.insert().values(**where, **amounts))


def count_tokens(conn: Connection, key: KeyRecord, tokens: int, now: float) -> None:
    """Add a finished request's tokens to the key's minute window and quota period."""
    limits = key.limits
    if tokens <= 0 or not (limits.tpm or limits.quota_tokens):
        return
    key_by_id_for_update(conn, key.id)  # the lock _add needs against another replica
    if limits.tpm:
        window = int(now // WINDOW_SECONDS)
        _add(conn, rate_windows, {"key_id": key.id, "window": window}, requests=0, tokens=tokens)
    if limits.quota_tokens:
        start, _ = period_bounds(now, limits.quota_period)
        _add(conn, quota_usage, {"key_id": key.id, "period_start": start}, tokens=tokens)


def release(conn: Connection, lease_id: str) -> None:
    """Give a lease back."""
    conn.execute(delete(leases).where(leases.c.id == lease_id))


def renew(conn: Connection, replica: str, now: float) -> None:
    """Keep this replica's leases alive for another LEASE_SECONDS."""
    conn.execute(
        update(leases).where(leases.c.replica == replica).values(expires_at=now + LEASE_SECONDS)
    )
