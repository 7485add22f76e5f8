"""API and admin keys over real HTTP (fake engine): 401 / 200, file creation, rotation."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from llmserve.app import create_app
from llmserve.cli import main as cli_main
from llmserve.config import Settings
from llmserve.core.templates import load_template
from llmserve.models.manager import ModelManager
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve

CLI_KEY = "ansible123!"


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth") / "api_tokens.yml"


@pytest.fixture(scope="module")
def keyed_server(tokens_file: Path) -> Iterator[RunningServer]:
    settings = Settings(api_tokens_file=tokens_file, api_key=[CLI_KEY])
    manager = ModelManager(settings)
    manager.register(FakeEngine(), ["fake-model"], load_template(None, "gguf"))
    with serve(create_app(settings, manager)) as server:
        yield server


def file_keys(path: Path) -> dict[str, str]:
    return yaml.safe_load(path.read_text())


def chat(server: RunningServer, **headers: str) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)


def test_tokens_file_created_owner_only(keyed_server: RunningServer, tokens_file: Path) -> None:
    assert stat.S_IMODE(os.stat(tokens_file).st_mode) == 0o600
    keys = file_keys(tokens_file)
    assert len(keys["api_key"]) == 32 and len(keys["admin_key"]) == 32
    assert keys["api_key"] != keys["admin_key"]


def test_missing_and_wrong_keys_get_401(keyed_server: RunningServer) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"x-api-key": "nope"}):
        r = chat(keyed_server, **headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert "nope" not in r.text


def test_every_key_and_header_form_is_accepted(
    keyed_server: RunningServer, tokens_file: Path
) -> None:
    keys = file_keys(tokens_file)
    for headers in (
        {"Authorization": f"Bearer {keys['api_key']}"},
        {"x-api-key": keys["api_key"]},
        {"Authorization": f"Bearer {CLI_KEY}"},
        {"x-admin-key": keys["admin_key"]},
        {"Authorization": f"Bearer {keys['admin_key']}"},
    ):
        assert chat(keyed_server, **headers).status_code == 200, headers


def test_health_is_open(keyed_server: RunningServer) -> None:
    assert httpx.get(keyed_server.url + "/health").status_code == 200


def test_permission_route(keyed_server: RunningServer, tokens_file: Path) -> None:
    keys = file_keys(tokens_file)
    url = keyed_server.url + "/v1/auth/permission"
    assert httpx.get(url, headers={"x-api-key": keys["api_key"]}).json() == {"permission": "api"}
    admin = httpx.get(url, headers={"x-admin-key": keys["admin_key"]}).json()
    assert admin == {"permission": "admin"}
    assert httpx.get(url).status_code == 401


def test_key_rotation_without_restart(keyed_server: RunningServer, tokens_file: Path) -> None:
    old = file_keys(tokens_file)
    tokens_file.write_text(
        yaml.safe_dump({"api_key": ["rotated-1", "rotated-2"], "admin_key": old["admin_key"]})
    )
    try:
        assert chat(keyed_server, Authorization="Bearer rotated-2").status_code == 200
        assert chat(keyed_server, Authorization=f"Bearer {old['api_key']}").status_code == 401
    finally:
        tokens_file.write_text(yaml.safe_dump(old))
    assert chat(keyed_server, Authorization=f"Bearer {old['api_key']}").status_code == 200


def test_keys_command_prints_keys(
    tokens_file: Path, keyed_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_main(["keys", "--api-tokens-file", str(tokens_file)])
    out = capsys.readouterr().out
    assert file_keys(tokens_file)["admin_key"] in out


def test_keys_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens = tmp_path / "api_tokens.yml"
    settings = Settings(api_tokens_file=tokens, api_key=["secret-cli-key"])
    manager = ModelManager(settings)
    manager.register(FakeEngine(), ["fake-model"], load_template(None, "gguf"))
    with caplog.at_level(logging.DEBUG), serve(create_app(settings, manager)) as server:
        keys = file_keys(tokens)
        chat(server, Authorization=f"Bearer {keys['api_key']}")
        chat(server, Authorization="Bearer wrong-key-xyz")
    logged = caplog.text
    assert str(tokens) in logged
    for secret in (keys["api_key"], keys["admin_key"], "secret-cli-key", "wrong-key-xyz"):
        assert secret not in logged


def test_disable_auth_opens_everything_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(api_tokens_file=tmp_path / "t.yml", disable_auth=True)
    manager = ModelManager(settings)
    manager.register(FakeEngine(), ["fake-model"], load_template(None, "gguf"))
    with caplog.at_level(logging.WARNING), serve(create_app(settings, manager)) as server:
        assert chat(server).status_code == 200
        assert httpx.get(server.url + "/v1/auth/permission").json() == {"permission": "admin"}
    assert "authentication is DISABLED" in caplog.text
    assert not (tmp_path / "t.yml").exists()


def test_broken_tokens_file_keeps_serving_and_health_says_so(
    keyed_server: RunningServer, tokens_file: Path
) -> None:
    good = tokens_file.read_text()
    keys = yaml.safe_load(good)
    # Caught mid-write: the list of API keys is cut off inside its second key.
    tokens_file.write_text(f"admin_key: {keys['admin_key']}\napi_key: [{keys['api_key']}, ab")
    try:
        for _ in range(3):
            r = chat(keyed_server, Authorization=f"Bearer {keys['api_key']}")
            assert r.status_code == 200, r.text
        assert chat(keyed_server, Authorization="Bearer nope").status_code == 401
        health = httpx.get(keyed_server.url + "/health")
        assert health.status_code == 200
        (problem,) = health.json()["problems"]
        assert str(tokens_file) in problem and "keeping the last good keys" in problem
        assert keys["api_key"] not in health.text
    finally:
        tokens_file.write_text(good)
    assert "problems" not in httpx.get(keyed_server.url + "/health").json()


def test_tokens_file_broken_at_start_gives_401_not_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = tmp_path / "api_tokens.yml"
    tokens.write_bytes(b"api_key: \xff\xfe not text\n")
    settings = Settings(api_tokens_file=tokens, api_key=[CLI_KEY])
    manager = ModelManager(settings)
    manager.register(FakeEngine(), ["fake-model"], load_template(None, "gguf"))
    with caplog.at_level(logging.ERROR), serve(create_app(settings, manager)) as server:
        assert chat(server, Authorization="Bearer anything").status_code == 401
        assert chat(server).status_code == 401
        assert chat(server, Authorization=f"Bearer {CLI_KEY}").status_code == 200
        health = httpx.get(server.url + "/health").json()
        assert "only --api-key keys" in health["problems"][0]
    assert f"cannot use {tokens}: not UTF-8 text" in caplog.text
