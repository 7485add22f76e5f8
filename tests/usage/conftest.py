"""Usage-database fixtures: every test runs on SQLite and on PostgreSQL (`.ci/run` starts one)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ENV = "LLMSERVE_TEST_DATABASE_URL"


def postgres_server_url() -> str:
    """The test PostgreSQL's URL; skip without one (fail under CI=true, which must have it)."""
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PG_ENV} is not set: .ci/run starts PostgreSQL for these tests")
        pytest.skip(f"no PostgreSQL: set {PG_ENV} (source .ci/postgres)")
    return url


def fresh_postgres_database() -> tuple[str, str]:
    """A new, empty database on the test server: its URL and name."""
    server = make_url(postgres_server_url()).set(drivername="postgresql+psycopg")
    name = f"llmserve_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server.set(database=name).render_as_string(hide_password=False), name


def drop_postgres_database(name: str) -> None:
    """Drop a database fresh_postgres_database made (closing what still uses it)."""
    server = make_url(postgres_server_url()).set(drivername="postgresql+psycopg")
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty usage database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'llmserve.db'}"
        return
    url, name = fresh_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(name)
