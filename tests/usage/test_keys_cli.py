"""`llmserve keys`: the file's keys, and create/list/revoke/usage on the key database."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmserve.app import create_app
from llmserve.config import Settings
from tests.conftest import TEST_SETTINGS
from tests.server import RunningServer, serve

FILE_KEY = "cli-test-file-key-0123456789"


def keys(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "llmserve", "keys", *args, "--data-dir", str(home)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "api_tokens.yml").write_text(
        f"api_key: {FILE_KEY}\nadmin_key: cli-admin-0123456789\n"
    )
    return tmp_path


@pytest.fixture
def server(home: Path) -> Iterator[RunningServer]:
    with serve(create_app(Settings(data_dir=home, **TEST_SETTINGS))) as running:  # type: ignore[arg-type]
        yield running


def test_bare_keys_prints_the_tokens_file(home: Path) -> None:
    shown = keys(home)
    assert shown.returncode == 0 and FILE_KEY in shown.stdout
    assert str(home / "api_tokens.yml") in shown.stdout


def test_a_key_made_on_the_command_line_serves_until_revoked(
    home: Path, server: RunningServer
) -> None:
    served = server.app.state.models.loaded()[0].id
    made = keys(home, "create", "ci-user", "--owner", "CI", "--rpm", "50", "--models", served)
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[0]
    assert key.startswith("llms-") and "shown only this once" in made.stdout
    listed = keys(home, "list")
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith("ci-user "))
    assert (
        "api" in row
        and "db" in row
        and "active" in row
        and "rpm=50" in row
        and key not in listed.stdout
    )
    assert keys(home, "create", "ci-user").returncode != 0  # names are unique
    assert "reserved" in keys(home, "create", "anonymous").stderr
    url = f"{server.url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    # The running server sees the new key at its next refresh (seconds).
    status = 401
    for _ in range(300):
        status = httpx.post(
            url, headers={"Authorization": f"Bearer {key}"}, json=body, timeout=120
        ).status_code
        if status != 401:
            break
        time.sleep(0.1)
    assert status == 200
    for _ in range(300):  # the record is written off the request's path
        usage = keys(home, "usage", "--key", "ci-user", "--group-by", "key")
        if "ci-user" in usage.stdout:
            break
        time.sleep(0.2)
    line = next(line for line in usage.stdout.splitlines() if line.startswith("ci-user"))
    assert line.split()[1] == "1"  # one request
    file_name = next(line.split()[0] for line in listed.stdout.splitlines() if " file " in line)
    refused = keys(home, "revoke", file_name)
    assert refused.returncode != 0 and "remove it there" in refused.stderr
    assert keys(home, "revoke", "ci-user").returncode == 0
    for _ in range(300):
        status = httpx.post(
            url, headers={"Authorization": f"Bearer {key}"}, json=body, timeout=120
        ).status_code
        if status == 401:
            break
        time.sleep(0.1)
    assert status == 401
    assert "revoked" in next(
        line for line in keys(home, "list").stdout.splitlines() if line.startswith("ci-user")
    )
