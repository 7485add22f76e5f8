"""Keys as records, limits and usage over HTTP, on the real model, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from sqlalchemy import create_engine, select

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.usage.schema import api_keys
from tests.conftest import TEST_SETTINGS
from tests.server import RunningServer, serve
from tests.usage.conftest import drop_postgres_database, fresh_postgres_database

FILE_KEY = "file-api-key-0123456789"
ADMIN_KEY = "file-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Generous: the machine may be busy; a test fails on content, never on time.
HTTP = httpx.Client(timeout=120)
CHAT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """llmserve with a file API key, a file admin key, Kobold open with anonymous limits."""
    root = tmp_path_factory.mktemp(f"keys-{request.param}")
    (root / "api_tokens.yml").write_text(f"api_key: {FILE_KEY}\nadmin_key: {ADMIN_KEY}\n")
    dropped = None
    url = None
    if request.param == "postgresql":
        url, dropped = fresh_postgres_database()
    settings = Settings(
        data_dir=root,
        database_url=url,
        kobold_auth=False,
        anonymous_limits={"rpm": 2},  # type: ignore[arg-type]
        **TEST_SETTINGS,  # type: ignore[arg-type]
    )
    try:
        with serve(create_app(settings)) as running:
            yield running
    finally:
        if dropped is not None:
            drop_postgres_database(dropped)


def create_key(server: RunningServer, name: str, **fields: Any) -> dict[str, Any]:
    response = HTTP.post(f"{server.url}/v1/keys", headers=ADMIN, json={"name": name, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def usage_of(server: RunningServer, name: str, **params: str) -> dict[str, Any]:
    response = HTTP.get(
        f"{server.url}/v1/usage", headers=ADMIN, params={"key": name, "group_by": "key", **params}
    )
    assert response.status_code == 200, response.text
    rows = response.json()["data"]
    assert len(rows) <= 1
    return rows[0] if rows else {"requests": 0, "total_tokens": 0}


def wait_for_records(server: RunningServer, name: str, count: int) -> dict[str, Any]:
    """The key's usage once `count` records are written (they are written off the hot path)."""
    for _ in range(200):
        row = usage_of(server, name)
        if row["requests"] >= count:
            return row
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError(f"{name}: only {row['requests']} of {count} records were written")


def test_a_created_key_is_shown_once_and_stored_hashed(server: RunningServer) -> None:
    created = create_key(server, "alice", owner="Alice", models=None)
    key = created["key"]
    assert key.startswith("llms-") and created["prefix"] == key[:9]
    listed = HTTP.get(f"{server.url}/v1/keys", headers=ADMIN).json()["data"]
    alice = next(item for item in listed if item["name"] == "alice")
    assert "key" not in alice and alice["owner"] == "Alice" and alice["status"] == "active"
    assert key not in HTTP.get(f"{server.url}/v1/keys", headers=ADMIN).text
    url = server.app.state.settings.usage_database_url()
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        stored = conn.execute(select(api_keys.c.key_hash).where(api_keys.c.name == "alice"))
        assert stored.scalar_one() == hashlib.sha256(key.encode()).hexdigest()
    engine.dispose()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="any", **CHAT)  # type: ignore[call-overload]
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_file_and_command_line_keys_are_listed_and_read_only(server: RunningServer) -> None:
    HTTP.post(f"{server.url}/v1/chat/completions", headers=bearer(FILE_KEY), json=CHAT)
    listed = HTTP.get(f"{server.url}/v1/keys", headers=ADMIN).json()["data"]
    files = [item for item in listed if item["source"] == "file"]
    assert files and all(item["name"].startswith("file-") for item in files)
    name = next(item["name"] for item in files if item["role"] == "api")
    refused = HTTP.delete(f"{server.url}/v1/keys/{name}", headers=ADMIN)
    assert refused.status_code == 409 and "api_tokens.yml" in refused.json()["error"]["message"]
    assert HTTP.delete(f"{server.url}/v1/keys/anonymous", headers=ADMIN).status_code == 409
    assert HTTP.get(f"{server.url}/v1/keys/nobody", headers=ADMIN).status_code == 404


def test_key_management_needs_the_admin_key(server: RunningServer) -> None:
    body = {"name": "mallory"}
    assert HTTP.post(f"{server.url}/v1/keys", json=body).status_code == 401
    assert (
        HTTP.post(f"{server.url}/v1/keys", headers=bearer(FILE_KEY), json=body).status_code == 403
    )
    assert HTTP.get(f"{server.url}/v1/keys", headers=bearer(FILE_KEY)).status_code == 403
    duplicate = {"name": "dupe"}
    assert HTTP.post(f"{server.url}/v1/keys", headers=ADMIN, json=duplicate).status_code == 201
    again = HTTP.post(f"{server.url}/v1/keys", headers=ADMIN, json=duplicate)
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"
    for bad in (
        {"name": "anonymous"},
        {"name": "file-x"},
        {"name": "a b"},
        {"name": "x", "limits": {"rpm": 0}},
    ):
        assert HTTP.post(f"{server.url}/v1/keys", headers=ADMIN, json=bad).status_code == 400, bad


def test_revoked_and_expired_keys_are_refused(server: RunningServer) -> None:
    key = create_key(server, "bob")["key"]
    url = f"{server.url}/v1/chat/completions"
    assert HTTP.post(url, headers=bearer(key), json=CHAT).status_code == 200
    revoked = HTTP.delete(f"{server.url}/v1/keys/bob", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    refused = HTTP.post(url, headers=bearer(key), json=CHAT)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    expired = create_key(server, "carol", expires_at="2020-01-01T00:00:00Z")
    assert expired["status"] == "expired"
    assert HTTP.post(url, headers=bearer(expired["key"]), json=CHAT).status_code == 401


def test_requests_per_minute_in_every_dialect(server: RunningServer) -> None:
    key = create_key(server, "dave", limits={"rpm": 2})["key"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    first = client.chat.completions.with_raw_response.create(model="m", **CHAT)  # type: ignore[call-overload]
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    client.chat.completions.create(model="m", **CHAT)  # type: ignore[call-overload]
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", **CHAT)  # type: ignore[call-overload]
    error = caught.value
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    claude = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as refused:
        claude.messages.create(
            model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    headers = refused.value.response.headers
    assert headers["anthropic-ratelimit-requests-limit"] == "2"
    assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    ollama = HTTP.post(
        f"{server.url}/api/chat",
        headers=bearer(key),
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False},
    )
    assert ollama.status_code == 429 and "requests per minute" in ollama.json()["error"]
    assert "retry-after" in ollama.headers
    native = HTTP.post(f"{server.url}/completion", headers=bearer(key), json={"prompt": "a"})
    assert native.status_code == 429 and native.json()["error"]["type"] == "requests"


def test_the_anonymous_principal_on_open_kobold_routes(server: RunningServer) -> None:
    url = f"{server.url}/api/v1/generate"
    statuses = [
        HTTP.post(url, json={"prompt": "Hi", "max_length": 2}).status_code for _ in range(3)
    ]
    assert statuses[:2] == [200, 200] and statuses[2] == 429
    listed = HTTP.get(f"{server.url}/v1/keys/anonymous", headers=ADMIN).json()
    assert listed["limits"]["rpm"] == 2 and listed["role"] == "anonymous"
    assert wait_for_records(server, "anonymous", 3)["errors"] >= 1


def test_usage_records_match_the_responses(server: RunningServer) -> None:
    key = create_key(server, "erin")["key"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    replies = [client.chat.completions.create(model="m", **CHAT) for _ in range(3)]  # type: ignore[call-overload]
    prompt = sum(r.usage.prompt_tokens for r in replies if r.usage)
    completion = sum(r.usage.completion_tokens for r in replies if r.usage)
    row = wait_for_records(server, "erin", 3)
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
        3,
        prompt,
        completion,
    )
    assert row["errors"] == 0 and row["cancelled"] == 0
    by_model = HTTP.get(
        f"{server.url}/v1/usage", headers=ADMIN, params={"key": "erin", "group_by": "model,day"}
    ).json()
    assert [item["model"] for item in by_model["data"]] == [replies[0].model]
    own = HTTP.get(f"{server.url}/v1/usage", headers=bearer(key)).json()["data"]
    assert {item["key"] for item in own} == {"erin"}
    other = HTTP.get(f"{server.url}/v1/usage", headers=bearer(key), params={"key": "anonymous"})
    assert other.status_code == 403
    metrics = HTTP.get(f"{server.url}/metrics", headers=ADMIN).text
    assert 'llmserve_key_requests_total{key="erin",status="2xx"} 3.0' in metrics
    assert (
        f'llmserve_key_tokens_total{{key="erin",kind="completion"}} {float(completion)}' in metrics
    )
    assert key not in metrics
    public = HTTP.get(f"{server.url}/metrics", headers=bearer(key)).text
    assert "llmserve_key_requests_total" not in public and "llmserve_requests_total" in public


def test_a_cancelled_stream_is_recorded_as_cancelled(server: RunningServer) -> None:
    key = create_key(server, "frank")["key"]
    body = {**CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", headers=bearer(key), json=body
    ) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                break  # leave mid-stream
    row = wait_for_records(server, "frank", 1)
    assert row["cancelled"] == 1 and row["completion_tokens"] < 400


def test_concurrency_limit_and_release_before_the_last_byte(server: RunningServer) -> None:
    key = create_key(server, "grace", limits={"max_concurrent": 1})["key"]
    url = f"{server.url}/v1/chat/completions"
    long = {**CHAT, "max_tokens": 300, "ignore_eos": True, "stream": True}
    with HTTP.stream("POST", url, headers=bearer(key), json=long) as stream:
        lines = stream.iter_lines()  # held: a discarded iterator closes the stream
        next(lines)
        refused = HTTP.post(url, headers=bearer(key), json=CHAT)
        assert (
            refused.status_code == 429
            and refused.json()["error"]["code"] == "concurrency_limit_exceeded"
        )
    # The server frees the slot once it notices the client left (at its next delta).
    for _ in range(100):
        if HTTP.post(url, headers=bearer(key), json=CHAT).status_code == 200:
            break
    # One at a time, back to back: each finds the previous one's slot free, as the lease is
    # given back before the response's last bytes go out.
    statuses = [HTTP.post(url, headers=bearer(key), json=CHAT).status_code for _ in range(5)]
    assert statuses == [200] * 5


def test_a_quota_is_overrun_by_at_most_the_requests_in_flight(server: RunningServer) -> None:
    quota, clients, max_tokens = 600, 16, 8
    key = create_key(server, "heidi", limits={"quota_tokens": quota, "quota_period": "day"})["key"]
    body = {**CHAT, "max_tokens": max_tokens, "ignore_eos": True}

    async def client(http: httpx.AsyncClient, served: list[int]) -> None:
        for _ in range(100):
            response = await http.post("/v1/chat/completions", json=body)
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "insufficient_quota"
                return
            assert response.status_code == 200, response.text
            served.append(response.json()["usage"]["total_tokens"])
        raise AssertionError("the quota was never reached")

    async def run() -> list[int]:
        served: list[int] = []
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(key), timeout=120) as http:
            await asyncio.gather(*(client(http, served) for _ in range(clients)))
        return served

    served = asyncio.run(run())
    used = sum(served)
    biggest = max(served)
    # Admission stops once `quota` is counted; what was in flight then (≤ one request per
    # client) still finishes.
    assert quota <= used <= quota + clients * biggest, (used, biggest)
    row = wait_for_records(server, "heidi", len(served) + clients)
    assert row["total_tokens"] == used and row["errors"] == clients


def test_a_key_with_an_allow_list_sees_and_uses_only_those_models(server: RunningServer) -> None:
    served = HTTP.get(f"{server.url}/v1/models", headers=ADMIN).json()["data"][0]["id"]
    allowed = create_key(server, "ivan", models=[served])["key"]
    other = create_key(server, "judy", models=["some-other-model"])["key"]
    url = f"{server.url}/v1/chat/completions"
    assert (
        HTTP.post(url, headers=bearer(allowed), json={**CHAT, "model": served}).status_code == 200
    )
    refused = HTTP.post(url, headers=bearer(other), json={**CHAT, "model": served})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert served in refused.json()["error"]["message"]
    ollama = HTTP.post(
        f"{server.url}/api/chat",
        headers=bearer(other),
        json={"model": served, "messages": [{"role": "user", "content": "hi"}], "stream": False},
    )
    assert ollama.status_code == 403 and "error" in ollama.json()
    listed = HTTP.get(f"{server.url}/v1/models", headers=bearer(other)).json()["data"]
    assert listed == []
    mine = HTTP.get(f"{server.url}/v1/models", headers=bearer(allowed)).json()["data"]
    assert [item["id"] for item in mine] == [served]
