"""The usage service: who a key is, whether its limits let a request in, what it used.

Key records are cached in memory and refreshed every REFRESH_SECONDS, so checking who a
request is costs no database round trip; a new, revoked or changed key takes effect on the
next refresh (at once on the replica that made the change). A key with limits costs one
transaction per request (`admit`), which is what makes limits hold across replicas. Releases
and usage records are queued and written by the database worker off the request's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete

from llmserve.core.errors import AuthenticationError, LLMServeError
from llmserve.usage import keys as key_table
from llmserve.usage import limits
from llmserve.usage.keys import KeyLimits, KeyRecord, Role, Source
from llmserve.usage.limits import Admission, RateState, Refusal
from llmserve.usage.metrics import KeyMetrics
from llmserve.usage.records import (
    GroupBy,
    UsageFilter,
    UsageRecord,
    UsageSum,
    insert_records,
    record_count,
    usage_sums,
)
from llmserve.usage.schema import leases
from llmserve.usage.worker import DatabaseWorker

log = logging.getLogger(__name__)

REFRESH_SECONDS = 2.0
RENEW_SECONDS = 10.0  # well inside limits.LEASE_SECONDS


ERROR_KINDS = {
    "requests": ("requests", "rate_limit_exceeded"),
    "tokens": ("tokens", "rate_limit_exceeded"),
    "quota": ("insufficient_quota", "insufficient_quota"),
    "concurrency": ("rate_limit_error", "concurrency_limit_exceeded"),
}


class RateLimitedError(LLMServeError):
    """A key's limit is reached (429); `refusal` says which, and when to retry."""

    status = 429

    def __init__(self, refusal: Refusal):
        # OpenAI's own shapes: type "requests"/"tokens" for a rate, insufficient_quota.
        kind, code = ERROR_KINDS.get(refusal.exceeded, ("rate_limit_error", "rate_limit_exceeded"))
        super().__init__(refusal.message, code=code)
        self.type = kind
        self.refusal = refusal


@dataclass(frozen=True)
class FileKey:
    """A key from api_tokens.yml or --api-key, as the key store hands it over."""

    key: str
    role: Role
    source: Source


class UsageService:
    """Keys, limits and usage records of one server process (a replica) on one database."""

    def __init__(self, engine: Engine, anonymous_limits: KeyLimits):
        self.replica = uuid.uuid4().hex
        self.worker = DatabaseWorker(engine)
        self.records_written = 0  # usage records committed by this process
        self.metrics = KeyMetrics()
        self._anonymous_limits = anonymous_limits
        self._database_keys: dict[str, KeyRecord] = {}
        self._file_keys: dict[str, KeyRecord] = {}
        self.anonymous: KeyRecord | None = None
        self._maintenance: asyncio.Task[None] | None = None

    # ---- start and stop ----

    def start(self, file_keys: Sequence[FileKey] = ()) -> None:
        """Record the anonymous principal and the file's keys, read the keys (blocking)."""
        self.anonymous = self.worker.call_blocking(
            lambda conn: key_table.ensure_anonymous(conn, self._anonymous_limits)
        )
        found = [(k.key, k.role, k.source) for k in file_keys]
        self.worker.call_blocking(lambda conn: key_table.import_keys(conn, found))
        self._cache(self.worker.call_blocking(key_table.all_keys))
        self._maintenance = asyncio.get_running_loop().create_task(self._maintain())

    async def close(self) -> None:
        """Write every queued record, give back this replica's leases, stop the worker."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        replica = self.replica
        self.worker.post(
            lambda conn: conn.execute(delete(leases).where(leases.c.replica == replica))
        )
        await asyncio.to_thread(self.worker.close)

    async def _maintain(self) -> None:
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                self._cache(await self.worker.call(key_table.all_keys))
                if time.monotonic() - renewed >= RENEW_SECONDS:
                    await self.worker.call(self._renew)
                    renewed = time.monotonic()
            except Exception as exc:  # a database outage must not end the loop
                log.error("usage database maintenance failed: %s", exc)

    def _renew(self, conn: Connection) -> None:
        limits.renew(conn, self.replica, time.time())

    def _cache(self, records: Iterable[KeyRecord]) -> None:
        database: dict[str, KeyRecord] = {}
        files: dict[str, KeyRecord] = {}
        for record in records:
            if record.key_hash is None:
                continue
            (database if record.source == "db" else files)[record.key_hash] = record
        self._database_keys, self._file_keys = database, files

    # ---- who a request is ----

    def database_key(self, presented: Sequence[str]) -> KeyRecord | None:
        """The usable database key among the presented ones, if any."""
        now = time.time()
        for key in presented:
            digest = key_table.hash_key(key)
            record = self._database_keys.get(digest)
            # The dict lookup finds a candidate; the comparison itself is constant-time.
            if (
                record is not None
                and record.key_hash is not None
                and hmac.compare_digest(record.key_hash, digest)
                and record.usable(now)
            ):
                return record
        return None

    async def file_principal(self, key: FileKey) -> KeyRecord:
        """The record of a file or command-line key (created the first time it is seen)."""
        digest = key_table.hash_key(key.key)
        record = self._file_keys.get(digest)
        if record is None:
            found = await self.worker.call(
                lambda conn: key_table.import_keys(conn, [(key.key, key.role, key.source)])
            )
            record = found[digest]
            self._file_keys[digest] = record
        return record

    # ---- limits ----

    async def admit(self, key: KeyRecord) -> Admission:
        """Let a request of `key` in, or raise RateLimitedError (AuthenticationError if revoked)."""
        if not key.limits.any():
            return Admission(key, None, RateState())
        replica = self.replica
        result = await self.worker.call(
            lambda conn: limits.admit(conn, key.id, replica, time.time()),
            abandoned=self._abandoned,
        )
        if isinstance(result, Refusal):
            if result.exceeded == "revoked":
                raise AuthenticationError(result.message)
            raise RateLimitedError(result)
        return result

    def _abandoned(self, result: Admission | Refusal) -> None:
        if isinstance(result, Admission):
            self.release(result)

    def release(self, admission: Admission) -> None:
        """Give back the admission's lease (queued: before the response's last bytes go out)."""
        lease_id = admission.lease_id
        if lease_id is not None:
            self.worker.post(lambda conn: limits.release(conn, lease_id))

    def record(self, key: KeyRecord, record: UsageRecord) -> None:
        """Queue a finished request's usage: its record and the tokens its limits count."""
        tokens = record.prompt_tokens + record.completion_tokens

        def write(conn: Connection) -> None:
            limits.count_tokens(conn, key, tokens, record.ts)
            insert_records(conn, [record])

        self.worker.post(write, done=self._written)
        self.metrics.observe(record)

    def _written(self) -> None:
        self.records_written += 1

    # ---- the admin side ----

    async def list_keys(self) -> list[KeyRecord]:
        """Every key record."""
        return await self.worker.call(key_table.all_keys)

    async def key(self, name: str) -> KeyRecord | None:
        """The key called `name`."""
        return await self.worker.call(lambda conn: key_table.key_named(conn, name))

    async def create_key(self, **fields: Any) -> tuple[str, KeyRecord]:
        """A new database key: the key itself (shown once) and its record."""
        secret = key_table.new_key()
        digest = key_table.hash_key(secret)
        prefix = secret[: len(key_table.KEY_PREFIX) + 4]
        record = await self.worker.call(
            lambda conn: key_table.insert_key(
                conn, key_hash=digest, prefix=prefix, source="db", **fields
            )
        )
        self._database_keys[digest] = record
        return secret, record

    async def update_key(self, name: str, changes: dict[str, Any]) -> KeyRecord | None:
        """Change a database key's limits, models or expiry."""
        record = await self.worker.call(lambda conn: key_table.update_key(conn, name, changes))
        self._cache(await self.worker.call(key_table.all_keys))
        return record

    async def revoke_key(self, name: str) -> None:
        """Revoke a database key now (on this replica at once, on others at their refresh)."""
        await self.worker.call(lambda conn: key_table.revoke_key(conn, name))
        self._cache(await self.worker.call(key_table.all_keys))

    async def usage(self, where: UsageFilter, group_by: Sequence[GroupBy]) -> list[UsageSum]:
        """Sums of usage records."""
        return await self.worker.call(lambda conn: usage_sums(conn, where, group_by))

    async def record_count(self) -> int:
        """How many usage records the database holds (every replica's)."""
        return await self.worker.call(record_count)
