"""Browsers and open routes (items 13, 23, 29): Host guard, loopback-only CORS, exposure checks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from llmserve.app import create_app
from llmserve.cli import check_exposure
from llmserve.config import Settings
from llmserve.core.templates import load_template
from llmserve.exposure import AllowedHosts
from llmserve.models.manager import ModelManager
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve

KEY = "hosts-key"
EVIL = "http://evil.example"
BEARER = {"Authorization": f"Bearer {KEY}"}


@contextmanager
def server(tmp_path: Path, **settings: Any) -> Iterator[RunningServer]:
    """The fake engine behind the settings under test (serve() listens on 127.0.0.1)."""
    config = Settings(api_tokens_file=tmp_path / "t.yml", api_key=[KEY], **settings)
    manager = ModelManager(config)
    manager.register(FakeEngine(), ["m"], load_template(None, "gguf"))
    with serve(create_app(config, manager)) as running:
        yield running


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with server(tmp_path_factory.mktemp("open"), disable_auth=True) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with server(tmp_path_factory.mktemp("keyed")) as running:
        yield running


@pytest.fixture(scope="module")
def kobold_open(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with server(tmp_path_factory.mktemp("kobold"), kobold_auth=False) as running:
        yield running


def get(running: RunningServer, path: str, host: str, **headers: str) -> httpx.Response:
    return httpx.get(running.url + path, headers={"Host": host, **headers})


def preflight(running: RunningServer, origin: str, path: str = "/v1/chat/completions") -> str:
    """The Access-Control-Allow-Origin a preflight from `origin` gets ("" for none)."""
    r = httpx.options(
        running.url + path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )
    return r.headers.get("access-control-allow-origin", "")


def test_forged_host_is_refused_when_auth_is_off(open_server: RunningServer) -> None:
    r = get(open_server, "/v1/models", "evil.example")
    assert r.status_code == 403
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("permission_error", "host_not_allowed")
    assert "--allowed-hosts" in error["message"]
    kobold = get(open_server, "/api/v1/model", f"evil.example:{open_server.port}")
    assert kobold.status_code == 403
    assert kobold.json()["detail"]["type"] == "forbidden"
    admin = httpx.post(open_server.url + "/v1/model/unload", headers={"Host": "rebind.evil"})
    assert admin.status_code == 403


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "LOCALHOST.", "[::1]", "127.0.0.1:{port}", "app.localhost"]
)
def test_loopback_hosts_are_accepted(open_server: RunningServer, host: str) -> None:
    r = get(open_server, "/v1/models", host.format(port=open_server.port))
    assert r.status_code == 200, r.text


def test_bound_address_and_allowed_hosts_are_accepted(tmp_path: Path) -> None:
    # The guard reads the configured address; the test server itself listens on loopback.
    # Names only: tests name no address but loopback (or the unspecified 0.0.0.0 / ::).
    settings = {"host": "bound.example", "disable_auth": True, "allowed_hosts": ["llm.example"]}
    with server(tmp_path, **settings) as running:
        assert get(running, "/v1/models", "bound.example:8000").status_code == 200
        assert get(running, "/v1/models", "LLM.example").status_code == 200
        assert get(running, "/v1/models", "unbound.example").status_code == 403
        assert get(running, "/v1/models", "other.example").status_code == 403


def test_star_allows_any_host(tmp_path: Path) -> None:
    with server(tmp_path, disable_auth=True, allowed_hosts=["*"]) as running:
        assert get(running, "/v1/models", "anything.example").status_code == 200


def test_wildcard_bind_accepts_addresses_not_foreign_names() -> None:
    hosts = AllowedHosts.of(Settings(host="0.0.0.0", disable_auth=True))
    assert hosts.accepts("0.0.0.0:8000") and hosts.accepts("[::]:80")  # address literals
    assert not hosts.accepts("evil.example")


def test_keys_on_routes_need_no_host_check(keyed_server: RunningServer) -> None:
    assert get(keyed_server, "/v1/models", "llm.example", **BEARER).status_code == 200
    assert get(keyed_server, "/v1/models", "llm.example").status_code == 401


def test_open_kobold_routes_are_guarded_alone(kobold_open: RunningServer) -> None:
    assert get(kobold_open, "/api/v1/model", "evil.example").status_code == 403
    assert get(kobold_open, "/api/v1/model", "localhost").status_code == 200
    assert get(kobold_open, "/v1/models", "evil.example", **BEARER).status_code == 200
    assert preflight(kobold_open, EVIL, "/api/v1/generate") == ""
    assert preflight(kobold_open, EVIL, "/v1/chat/completions") == "*"


def test_cors_is_loopback_only_when_auth_is_off(open_server: RunningServer) -> None:
    assert preflight(open_server, EVIL) == ""
    assert preflight(open_server, "http://127.0.0.1.evil.example") == ""
    for origin in ("http://localhost:5173", "http://127.0.0.1:8080", "https://[::1]"):
        assert preflight(open_server, origin) == origin
    r = httpx.get(open_server.url + "/v1/models", headers={"Origin": EVIL})
    assert "access-control-allow-origin" not in r.headers


def test_cors_is_star_when_keys_are_required(keyed_server: RunningServer) -> None:
    assert preflight(keyed_server, EVIL) == "*"


def test_cors_localhost_means_any_loopback_origin(tmp_path: Path) -> None:
    with server(tmp_path, cors_origins=["localhost", "https://app.example/"]) as running:
        assert preflight(running, "http://localhost:3000") == "http://localhost:3000"
        assert preflight(running, "http://127.0.0.1:9") == "http://127.0.0.1:9"
        assert preflight(running, "https://app.example") == "https://app.example"
        assert preflight(running, EVIL) == ""


def test_explicit_star_is_honoured_with_auth_off(tmp_path: Path) -> None:
    with server(tmp_path, disable_auth=True, cors_origins=["*"]) as running:
        assert preflight(running, EVIL) == "*"


@pytest.mark.parametrize(
    "origin", ["example.com", "localhst", "http://app.example/path", "ftp://x", "http://x:port"]
)
def test_values_that_are_not_origins_are_refused(origin: str) -> None:
    with pytest.raises(ValidationError, match="is not an origin"):
        Settings(cors_origins=[origin])


@pytest.mark.parametrize("host", ["http://llm.example", "llm.example:8000", "a/b", "bad_name"])
def test_values_that_are_not_host_names_are_refused(host: str) -> None:
    with pytest.raises(ValidationError, match="is not a host name"):
        Settings(allowed_hosts=[host])


@pytest.mark.parametrize(
    "settings",
    [
        {"disable_auth": True, "host": "0.0.0.0"},
        {"disable_auth": True, "admin_port": 9001, "admin_host": "0.0.0.0"},
        {"kobold_auth": False, "host": "0.0.0.0"},
        {"ollama_auth": False, "host": "0.0.0.0"},
    ],
)
def test_check_exposure_refuses_open_public_routes(settings: dict[str, Any]) -> None:
    with pytest.raises(SystemExit, match="--i-know-this-is-public"):
        check_exposure(Settings(**settings))
    check_exposure(Settings(**settings, i_know_this_is_public=True))


@pytest.mark.parametrize(
    "settings",
    [
        {"host": "0.0.0.0"},
        {"host": "0.0.0.0", "admin_port": 9001, "admin_host": "0.0.0.0"},
        {"disable_auth": True, "host": "localhost", "admin_port": 9001},
        {"kobold_auth": False, "host": "127.0.0.1"},
        {"ollama_auth": False, "host": "127.0.0.1"},
        {"disable_auth": True, "admin_api": False, "host": "::1"},
    ],
)
def test_check_exposure_allows_keys_or_loopback(settings: dict[str, Any]) -> None:
    check_exposure(Settings(**settings))


def test_simple_cross_origin_posts_are_refused_when_auth_is_off(open_server: RunningServer) -> None:
    # A page's form or text/plain POST needs no preflight: CORS alone would let it run.
    for path in ("/v1/model/unload", "/v1/chat/completions", "/api/v1/generate"):
        r = httpx.post(
            open_server.url + path,
            content="{}",
            headers={"Origin": EVIL, "Content-Type": "text/plain"},
        )
        assert r.status_code == 403, (path, r.text)
    error = httpx.post(open_server.url + "/v1/model/unload", headers={"Origin": "null"}).json()
    assert error["error"]["code"] == "origin_not_allowed"
    assert get(open_server, "/v1/models", "127.0.0.1").status_code == 200  # still loaded


def test_same_and_loopback_origins_pass_when_auth_is_off(open_server: RunningServer) -> None:
    for origin in (open_server.url, "http://localhost:3000", "http://[::1"):
        r = httpx.get(open_server.url + "/v1/models", headers={"Origin": origin})
        assert r.status_code == (403 if origin.endswith("[::1") else 200), origin
