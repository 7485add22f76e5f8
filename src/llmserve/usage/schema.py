"""The usage database's tables, and the migrations that bring a database up to date.

Migrations are a numbered list of functions and a one-row `schema_version` table, not Alembic:
the schema is small, the same code must run on SQLite and PostgreSQL, it ships inside the
package (no alembic.ini or script folder to find at run time), and every replica upgrades at
start under a lock, which is a few lines here.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    select,
    text,
)

metadata = MetaData()

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("owner", String(200)),
    Column("role", String(16), nullable=False),  # api | admin | anonymous
    Column("source", String(16), nullable=False),  # db | file | cli | builtin
    Column("key_hash", String(64), unique=True),  # SHA-256 hex; none for the anonymous row
    Column("prefix", String(16)),  # the key's first characters, to recognise it in lists
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("revoked_at", Float),
    Column("allowed_models", Text),  # JSON list; NULL: every model
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("max_concurrent", Integer),
    Column("quota_tokens", Integer),
    Column("quota_period", String(16)),  # day | week | month
)

# One row per request in flight; a replica renews its rows, so a killed one's rows expire.
leases = Table(
    "leases",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key_id", Integer, nullable=False),
    Column("replica", String(32), nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("leases_key", "key_id"),
    Index("leases_replica", "replica"),
)

# Requests and tokens per key per fixed minute, for requests/tokens-per-minute limits.
rate_windows = Table(
    "rate_windows",
    metadata,
    Column("key_id", Integer, nullable=False),
    Column("window", Integer, nullable=False),  # epoch minute
    Column("requests", Integer, nullable=False, default=0),
    Column("tokens", Integer, nullable=False, default=0),
    UniqueConstraint("key_id", "window", name="rate_windows_key_window"),
)

# Tokens per key per quota period (the period's start, as an epoch second).
quota_usage = Table(
    "quota_usage",
    metadata,
    Column("key_id", Integer, nullable=False),
    Column("period_start", Integer, nullable=False),
    Column("tokens", Integer, nullable=False, default=0),
    UniqueConstraint("key_id", "period_start", name="quota_usage_key_period"),
)

usage = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("day", String(10), nullable=False),  # UTC date, for grouping on either database
    Column("key_name", String(64), nullable=False),
    Column("model", String(200)),
    Column("dialect", String(16)),
    Column("route", String(200)),
    Column("status", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("cancelled", Boolean, nullable=False),
    Column("request_id", String(128)),
    Index("usage_key_day", "key_name", "day"),
    Index("usage_model_day", "model", "day"),
)

V1_TABLES = [api_keys, leases, rate_windows, quota_usage, usage]


def _create_v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=V1_TABLES)


# MIGRATIONS[n] brings a database at version n to version n + 1; never edit a released one.
MIGRATIONS: list[Callable[[Connection], None]] = [_create_v1]
LATEST = len(MIGRATIONS)

# Any fixed number: the PostgreSQL advisory lock that serialises replicas upgrading at once.
MIGRATION_LOCK = 7_311_402


def migrate(conn: Connection) -> int:
    """Bring the database to LATEST inside the caller's transaction; the version it was at."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": MIGRATION_LOCK})
    metadata.create_all(conn, tables=[schema_version])
    found = conn.execute(select(schema_version.c.version)).scalar()
    if found is None:
        conn.execute(schema_version.insert().values(version=0))
        found = 0
    if found > LATEST:
        raise RuntimeError(
            f"the usage database is at schema version {found}, newer than this llmserve "
            f"({LATEST}); upgrade llmserve"
        )
    for step in MIGRATIONS[found:]:
        step(conn)
    conn.execute(schema_version.update().values(version=LATEST))
    return int(found)
