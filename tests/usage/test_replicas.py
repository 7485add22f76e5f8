"""Real server processes on one database: limits across replicas, records across SIGKILL."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from llmserve.usage.database import open_database
from llmserve.usage.schema import usage
from tests.server import free_port
from tests.usage.conftest import drop_postgres_database, fresh_postgres_database

ADMIN_KEY = "replica-admin-key-0123456789"
API_KEY = "replica-api-key-0123456789"
CHAT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
LONG = {**CHAT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
HTTP = httpx.Client(timeout=120)


@contextmanager
def replica(
    root: Path, name: str, database_url: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """An llmserve process on `database_url`, its log in root/name.log."""
    home = root / name
    home.mkdir(exist_ok=True)
    (home / "api_tokens.yml").write_text(f"api_key: {API_KEY}\nadmin_key: {ADMIN_KEY}\n")
    port = free_port()
    command = [
        sys.executable, "-m", "llmserve", "--port", str(port), "--ctx-size", "4096",
        "--parallel", "4", "--data-dir", str(home), "--database-url", database_url,
    ]  # fmt: skip
    with open(home / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (home / "server.log").read_text()[-2000:]
            time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    url, name = fresh_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(name)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def until(condition: object, attempts: int = 600) -> None:
    for _ in range(attempts):
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("the condition never held")


def test_a_concurrency_limit_holds_across_replicas_and_outlives_a_killed_one(
    tmp_path: Path, postgres_url: str
) -> None:
    with (
        replica(tmp_path, "a", postgres_url) as (_, a),
        replica(tmp_path, "b", postgres_url) as (b_process, b),
    ):
        created = HTTP.post(
            f"{a}/v1/keys",
            headers=bearer(ADMIN_KEY),
            json={"name": "shared", "limits": {"max_concurrent": 2}},
        )
        key = created.json()["key"]
        # Replica b learns of the key at its next refresh (an unmetered route, no slot used).
        until(lambda: HTTP.get(f"{b}/v1/models", headers=bearer(key)).status_code == 200)
        with (
            HTTP.stream("POST", f"{a}/v1/chat/completions", headers=bearer(key), json=LONG) as one,
            HTTP.stream("POST", f"{b}/v1/chat/completions", headers=bearer(key), json=LONG) as two,
        ):
            lines_one, lines_two = one.iter_lines(), two.iter_lines()  # held open
            next(lines_one), next(lines_two)
            for url in (a, b):
                third = HTTP.post(f"{url}/v1/chat/completions", headers=bearer(key), json=CHAT)
                assert third.status_code == 429, (url, third.text)
                assert third.json()["error"]["code"] == "concurrency_limit_exceeded"
            b_process.kill()  # b dies holding its lease; a's stream goes on
            b_process.wait()
            refused = 0
            for _ in range(900):  # the lease runs out LEASE_SECONDS after b's last renewal
                status = HTTP.post(
                    f"{a}/v1/chat/completions", headers=bearer(key), json=CHAT
                ).status_code
                if status == 200:
                    break
                assert status == 429
                refused += 1
                time.sleep(0.1)
            assert status == 200 and refused > 0


def written(url: str) -> int:
    metrics = HTTP.get(f"{url}/metrics", headers=bearer(ADMIN_KEY)).text
    found = re.search(r"^llmserve_usage_records_written_total (\S+)$", metrics, re.M)
    assert found is not None
    return int(float(found.group(1)))


def stored_records(database_url: str) -> int:
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        count = int(conn.execute(select(func.count()).select_from(usage)).scalar_one())
    engine.dispose()
    return count


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_records_acknowledged_before_a_sigkill_survive_it(tmp_path: Path, kind: str) -> None:
    if kind == "sqlite":
        database_url, dropped = f"sqlite:///{tmp_path / 'usage.db'}", None
    else:
        database_url, dropped = fresh_postgres_database()
    total = 40
    try:
        with replica(tmp_path, "crash", database_url) as (process, url):

            async def load() -> None:
                async with httpx.AsyncClient(
                    base_url=url, headers=bearer(API_KEY), timeout=120
                ) as http:
                    await asyncio.gather(
                        *(http.post("/v1/chat/completions", json=CHAT) for _ in range(total))
                    )

            async def kill_under_load() -> int:
                task = asyncio.create_task(load())
                while True:
                    seen = await asyncio.to_thread(written, url)
                    if seen >= 5:
                        process.kill()  # SIGKILL: no shutdown, no flush
                        break
                    await asyncio.sleep(0.05)
                with pytest.raises(httpx.TransportError):
                    await task
                return seen

            acknowledged = asyncio.run(kill_under_load())
            process.wait()
        stored = stored_records(database_url)
        assert acknowledged <= stored <= total, (acknowledged, stored)
        # A restart on the same database serves and counts on from there.
        open_database(database_url).dispose()
        with replica(tmp_path, "again", database_url) as (_, url):
            HTTP.post(f"{url}/v1/chat/completions", headers=bearer(API_KEY), json=CHAT)
            until(lambda: written(url) == 1)
        assert stored_records(database_url) == stored + 1
    finally:
        if dropped is not None:
            drop_postgres_database(dropped)


def test_a_clean_shutdown_writes_every_record(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'usage.db'}"
    with replica(tmp_path, "clean", database_url) as (process, url):

        async def load() -> list[int]:
            async with httpx.AsyncClient(
                base_url=url, headers=bearer(API_KEY), timeout=120
            ) as http:
                calls = (http.post("/v1/chat/completions", json=CHAT) for _ in range(12))
                return [r.status_code for r in await asyncio.gather(*calls)]

        assert asyncio.run(load()) == [200] * 12
        process.terminate()  # SIGTERM: drain, then close the usage database
        assert process.wait(timeout=120) == 0
    assert stored_records(database_url) == 12
