"""Opening the usage database: SQLite (WAL) in data_dir by default, or PostgreSQL by URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from llmserve.usage.schema import migrate

SQLITE_FILE = "llmserve.db"


def default_url(data_dir: Path) -> str:
    """The SQLite database in `data_dir`."""
    return f"sqlite:///{(data_dir / SQLITE_FILE).resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases or an in-memory one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return None if parsed.database == ":memory:" else Path(parsed.database)


def open_database(url: str) -> Engine:
    """An engine for `url`, its schema brought up to date."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "psycopg":
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, not psycopg2
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed)
    else:
        engine = create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=2)
    with engine.begin() as conn:
        migrate(conn)
    return engine


def _sqlite_engine(url: Any) -> Engine:
    path = sqlite_path(str(url))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # 30 s busy timeout: the CLI or a second process may hold the write lock for a moment.
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" below open transactions, not the sqlite3 module.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer; NORMAL keeps every commit through a process
        # crash (only a power loss can take the last commits).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Take the write lock at the start, so a limit check and its increment are atomic.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
