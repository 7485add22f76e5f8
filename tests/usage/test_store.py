"""The usage database on SQLite and PostgreSQL: migrations, keys, limits, leases, records."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import Engine, select, update

from llmserve.usage import keys as key_table
from llmserve.usage import limits
from llmserve.usage.database import open_database
from llmserve.usage.keys import KeyLimits, KeyRecord
from llmserve.usage.limits import Admission, Refusal
from llmserve.usage.records import UsageFilter, UsageRecord, insert_records, usage_sums
from llmserve.usage.schema import LATEST, api_keys, schema_version
from llmserve.usage.service import UsageService


def make_key(engine: Engine, name: str = "alice", **limit_values: int | str) -> KeyRecord:
    with engine.begin() as conn:
        return key_table.insert_key(
            conn,
            name=name,
            key_hash=key_table.hash_key(f"secret-{name}"),
            prefix=None,
            role="api",
            source="db",
            limits=KeyLimits(**limit_values),  # type: ignore[arg-type]
        )


def admit(engine: Engine, key: KeyRecord, now: float, replica: str = "r1") -> Admission | Refusal:
    with engine.begin() as conn:
        return limits.admit(conn, key.id, replica, now)


def test_migrations_are_recorded_and_idempotent(database_url: str) -> None:
    open_database(database_url).dispose()
    engine = open_database(database_url)  # a second start finds the schema current
    with engine.connect() as conn:
        assert conn.execute(select(schema_version.c.version)).scalars().all() == [LATEST]
    engine.dispose()


def test_a_newer_schema_is_refused(database_url: str) -> None:
    engine = open_database(database_url)
    with engine.begin() as conn:
        conn.execute(update(schema_version).values(version=LATEST + 1))
    engine.dispose()
    with pytest.raises(RuntimeError, match="newer than this llmserve"):
        open_database(database_url)


def test_keys_are_stored_hashed(database_url: str) -> None:
    engine = open_database(database_url)
    make_key(engine)
    with engine.connect() as conn:
        stored = conn.execute(select(api_keys.c.key_hash).where(api_keys.c.name == "alice"))
        digest = stored.scalar_one()
    assert digest == key_table.hash_key("secret-alice")
    assert "secret" not in digest
    engine.dispose()


def test_requests_per_minute(database_url: str) -> None:
    engine = open_database(database_url)
    key = make_key(engine, rpm=3)
    now = 1_000_020.0  # 20 s into a minute
    results = [admit(engine, key, now + i) for i in range(4)]
    assert [isinstance(r, Admission) for r in results] == [True, True, True, False]
    first, refused = results[0], results[3]
    assert isinstance(first, Admission) and first.state.remaining_requests == 2
    assert isinstance(refused, Refusal) and refused.exceeded == "requests"
    assert 0 < refused.retry_after <= 60
    assert isinstance(admit(engine, key, now + 60), Admission)  # the next minute
    engine.dispose()


def test_tokens_per_minute_count_finished_requests(database_url: str) -> None:
    engine = open_database(database_url)
    key = make_key(engine, tpm=100)
    now = 2_000_000.0
    assert isinstance(admit(engine, key, now), Admission)
    with engine.begin() as conn:
        limits.count_tokens(conn, key, 100, now)
    refused = admit(engine, key, now + 1)
    assert isinstance(refused, Refusal) and refused.exceeded == "tokens"
    assert refused.state.remaining_tokens == 0
    engine.dispose()


def test_concurrency_leases_release_and_expire(database_url: str) -> None:
    engine = open_database(database_url)
    key = make_key(engine, max_concurrent=2)
    now = 3_000_000.0
    first, second = admit(engine, key, now), admit(engine, key, now, replica="r2")
    assert isinstance(first, Admission) and isinstance(second, Admission)
    third = admit(engine, key, now)
    assert isinstance(third, Refusal) and third.exceeded == "concurrency"
    with engine.begin() as conn:
        assert first.lease_id is not None
        limits.release(conn, first.lease_id)
    assert isinstance(admit(engine, key, now), Admission)
    # Replica r2 dies holding its lease: once the lease runs out, its slot comes back.
    assert isinstance(admit(engine, key, now + 1), Refusal)
    later = now + limits.LEASE_SECONDS + 1
    with engine.begin() as conn:
        limits.renew(conn, "r1", later)  # r1 is alive and renews; r2 does not
    assert isinstance(admit(engine, key, later), Admission)
    assert isinstance(admit(engine, key, later), Refusal)  # r1's renewed lease still counts
    engine.dispose()


def test_quota_per_period(database_url: str) -> None:
    engine = open_database(database_url)
    key = make_key(engine, quota_tokens=50, quota_period="day")
    noon = 1_796_212_800.0  # 2026-12-02 12:00 UTC
    with engine.begin() as conn:
        limits.count_tokens(conn, key, 30, noon)
    assert isinstance(admit(engine, key, noon), Admission)
    with engine.begin() as conn:
        limits.count_tokens(conn, key, 25, noon)
    refused = admit(engine, key, noon + 60)
    assert isinstance(refused, Refusal) and refused.exceeded == "quota"
    assert refused.retry_after == pytest.approx(12 * 3600 - 60)
    assert isinstance(admit(engine, key, noon + 12 * 3600), Admission)  # the next day
    engine.dispose()


def test_quota_periods() -> None:
    midnight = 1_796_169_600  # 2026-12-02 00:00 UTC, a Wednesday
    wednesday = midnight + 3600.0
    assert limits.period_bounds(wednesday, "day") == (midnight, midnight + 86400)
    start, end = limits.period_bounds(wednesday, "week")
    assert (start, end - start) == (midnight - 2 * 86400, 7 * 86400)
    assert limits.period_bounds(wednesday, "month") == (1_796_083_200, 1_798_761_600)


def test_revoked_and_expired_keys_are_refused(database_url: str) -> None:
    engine = open_database(database_url)
    key = make_key(engine, rpm=10)
    with engine.begin() as conn:
        key_table.revoke_key(conn, "alice")
    refused = admit(engine, key, time.time())
    assert isinstance(refused, Refusal) and refused.exceeded == "revoked"
    engine.dispose()


def test_usage_sums_group_and_filter(database_url: str) -> None:
    engine = open_database(database_url)
    day1, day2 = 1_796_212_800.0, 1_796_212_800.0 + 86400  # 2026-12-02 and 03, noon UTC

    def record(
        key: str, model: str, ts: float, status: int = 200, cancelled: bool = False
    ) -> UsageRecord:
        return UsageRecord(
            ts,
            key,
            model,
            "openai",
            "/v1/chat/completions",
            status,
            10,
            4,
            5,
            12.5,
            cancelled,
            None,
        )

    with engine.begin() as conn:
        insert_records(
            conn,
            [
                record("a", "m1", day1),
                record("a", "m1", day1, status=429),
                record("a", "m2", day2, cancelled=True),
                record("b", "m1", day2),
            ],
        )
    with engine.connect() as conn:
        by_key = usage_sums(conn, UsageFilter(), ["key"])
        only_a_day2 = usage_sums(
            conn, UsageFilter(key="a", day_from="2026-12-03"), ["model", "day"]
        )
        total = usage_sums(conn, UsageFilter(), [])
    assert [(s.key, s.requests, s.errors, s.cancelled) for s in by_key] == [
        ("a", 3, 1, 1),
        ("b", 1, 0, 0),
    ]
    assert [(s.model, s.day, s.prompt_tokens) for s in only_a_day2] == [("m2", "2026-12-03", 10)]
    assert total[0].total_tokens == 4 * 15 and total[0].duration_ms == 50.0
    engine.dispose()


def test_the_worker_keeps_order_and_survives_a_bad_write(database_url: str) -> None:
    async def scenario() -> None:
        service = UsageService(open_database(database_url), KeyLimits())
        service.start()
        key = await service.worker.call(lambda conn: key_table.key_named(conn, "anonymous"))
        assert key is not None and key.role == "anonymous"

        def bad(conn: object) -> None:
            raise ValueError("boom")

        service.worker.post(bad)  # queued with the good writes below: they still land
        for _ in range(5):
            service.record(
                key,
                UsageRecord(
                    time.time(), "anonymous", None, None, None, 200, 1, 0, 1, 1.0, False, None
                ),
            )
        assert await service.record_count() == 5
        await service.close()
        assert service.records_written == 5

    asyncio.run(scenario())
