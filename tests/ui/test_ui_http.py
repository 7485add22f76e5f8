"""The web UI's HTTP layer on the fake engine: files, headers, openness, the console routes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import FastAPI

from llmserve.app import create_admin_app, create_app
from llmserve.config import Settings
from llmserve.core.templates import load_template
from llmserve.models.manager import ModelManager
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve

API_KEY = "ui-api-key"
ADMIN_KEY = "ui-admin-key"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ASSETS = ("app.js", "api.js", "playground.js", "console.js", "markdown.js", "store.js", "style.css")


def keyed_app(tmp: Path, **extra: object) -> FastAPI:
    tokens = tmp / "api_tokens.yml"
    tokens.write_text(yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY}))
    settings = Settings(api_tokens_file=tokens, models_dir=tmp / "models", **extra)  # type: ignore[arg-type]
    manager = ModelManager(settings)
    manager.register(FakeEngine(), ["m"], load_template(None, "gguf"))
    return create_app(settings, manager)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("ui")
    (tmp / "models").mkdir()
    (tmp / "models" / "spare.gguf").write_bytes(b"GGUF")
    with serve(keyed_app(tmp)) as running:
        yield running


def get(server: RunningServer, path: str, **headers: str) -> httpx.Response:
    return httpx.get(server.url + path, headers=headers, timeout=30)


def test_the_page_is_open_and_carries_a_strict_csp(server: RunningServer) -> None:
    r = get(server, "/ui")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "http" not in csp  # no inline code, no other origin
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-cache" and r.headers["etag"]
    # No inline script: every <script> has a same-origin src and no body; no inline handlers.
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", r.text, re.S)
    assert scripts and all('src="/ui/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+=", r.text) and "style=" not in r.text
    assert "javascript:" not in r.text


@pytest.mark.parametrize("name", ASSETS)
def test_assets_have_their_content_type_and_revalidate(server: RunningServer, name: str) -> None:
    r = get(server, f"/ui/{name}")
    assert r.status_code == 200 and r.content
    kind = "text/css" if name.endswith(".css") else "text/javascript"
    assert r.headers["content-type"] == f"{kind}; charset=utf-8"
    again = get(server, f"/ui/{name}", **{"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content
    assert again.headers["content-security-policy"]


def test_no_asset_names_another_origin(server: RunningServer) -> None:
    for name in ASSETS:
        text = get(server, f"/ui/{name}").text
        assert not re.search(r"https?://(?!/)", text.replace("https?:\\/\\/", "")), name
        assert "innerHTML" not in text and "eval(" not in text, name


@pytest.mark.parametrize("path", ["/ui/nope.js", "/ui/../app.py", "/ui/%2e%2e/pyproject.toml"])
def test_unknown_files_are_a_404_in_the_openai_shape(server: RunningServer, path: str) -> None:
    r = get(server, path)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_config_tells_what_this_app_serves(server: RunningServer) -> None:
    r = get(server, "/ui/config.json")
    assert r.status_code == 200
    body = r.json()
    assert body["playground"] is True and body["console"] is True and body["auth"] is True
    assert API_KEY not in r.text and ADMIN_KEY not in r.text


def test_recent_requests_need_the_admin_key_and_hold_no_prompt(server: RunningServer) -> None:
    secret = "purple-elephant-prompt"
    chat = {"model": "m", "messages": [{"role": "user", "content": secret}], "max_tokens": 2}
    answer = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=API)
    assert answer.status_code == 200
    get(server, "/ui/app.js")  # the UI's own traffic stays out of the ring
    assert get(server, "/v1/requests/recent").status_code == 401
    assert get(server, "/v1/requests/recent", **API).status_code == 403
    r = get(server, "/v1/requests/recent", **ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == 200
    newest = next(row for row in body["data"] if row["route"] == "/v1/chat/completions")
    assert newest["status"] == 200 and newest["model"] and newest["completion_tokens"] > 0
    assert secret not in r.text and API_KEY not in r.text
    assert not any(row["route"].startswith("/ui") for row in body["data"])


def test_recent_requests_limit_is_checked(server: RunningServer) -> None:
    assert len(get(server, "/v1/requests/recent?limit=1", **ADMIN).json()["data"]) == 1
    r = get(server, "/v1/requests/recent?limit=0", **ADMIN)
    assert r.status_code == 400 and "limit" in r.text


def test_the_ring_is_bounded(tmp_path: Path) -> None:
    app = keyed_app(tmp_path)
    with serve(app) as running, httpx.Client(base_url=running.url) as client:
        for _ in range(205):
            client.get("/v1/models", headers=API)
        rows = client.get("/v1/requests/recent", headers=ADMIN).json()["data"]
    assert len(rows) == 200
    assert rows[0]["time"] >= rows[-1]["time"]


def test_console_models_list_state(server: RunningServer) -> None:
    assert get(server, "/v1/console/models", **API).status_code == 403
    data = get(server, "/v1/console/models", **ADMIN).json()["data"]
    assert [(m["id"], m["state"]) for m in data] == [("m", "loaded"), ("spare", "available")]


def test_without_admin_api_the_console_is_absent(tmp_path: Path) -> None:
    with serve(keyed_app(tmp_path, admin_api=False)) as running:
        assert get(running, "/ui/config.json").json()["console"] is False
        assert get(running, "/v1/requests/recent", **ADMIN).status_code == 404
        assert get(running, "/ui").status_code == 200


def test_with_an_admin_port_the_console_is_served_there(tmp_path: Path) -> None:
    main = keyed_app(tmp_path, admin_port=1)  # the port itself is not bound here
    with serve(main) as running, serve(create_admin_app(main)) as admin:
        assert get(running, "/ui/config.json").json()["console"] is False
        assert get(running, "/v1/requests/recent", **ADMIN).status_code == 404
        config = get(admin, "/ui/config.json").json()
        assert config["console"] is True and config["playground"] is False
        assert get(admin, "/ui").status_code == 200
        for path in ("/v1/requests/recent", "/v1/console/models", "/v1/loras", "/metrics"):
            assert get(admin, path, **ADMIN).status_code == 200, path
        assert get(admin, "/v1/auth/permission", **ADMIN).json() == {"permission": "admin"}
