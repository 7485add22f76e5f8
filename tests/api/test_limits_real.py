"""Overload and time limits on the real engine: 429 past the queue, timeout ends a generation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.models.manager import ModelManager
from tests.server import RunningServer, serve


def one_slot_server(tmp: Path, **settings: object) -> Iterator[RunningServer]:
    config = Settings(
        disable_auth=True,
        api_tokens_file=tmp / "t.yml",
        ctx_size=1024,
        parallel=1,
        threads=2,
        threads_batch=2,
        **settings,  # type: ignore[arg-type]
    )
    with serve(create_app(config)) as server:
        yield server


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from one_slot_server(tmp_path_factory.mktemp("queue"), max_queue=0)


@pytest.fixture(scope="module")
def timeout_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from one_slot_server(tmp_path_factory.mktemp("timeout"), request_timeout=1.0)


def running(server: RunningServer) -> int:
    models: ModelManager = server.app.state.models
    return models.loaded()[0].engine.stats().running


def test_queue_full_is_429_and_accepted_requests_complete(small_server: RunningServer) -> None:
    results: list[httpx.Response] = []
    body = {"prompt": "Once upon a time", "max_tokens": 60, "ignore_eos": True}
    first = threading.Thread(
        target=lambda: results.append(
            httpx.post(small_server.url + "/v1/completions", json=body, timeout=60)
        )
    )
    first.start()
    deadline = time.monotonic() + 10
    while running(small_server) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    rejected = httpx.post(small_server.url + "/v1/completions", json=body, timeout=60)
    first.join()
    assert rejected.status_code == 429
    assert rejected.headers["retry-after"]
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    [accepted] = results
    assert accepted.status_code == 200
    assert accepted.json()["usage"]["completion_tokens"] == 60


def test_request_timeout_ends_generation_as_length(timeout_server: RunningServer) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}
    r = httpx.post(timeout_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["stop_reason"] == "timeout"
    assert 0 < r.json()["usage"]["completion_tokens"] < 900
    assert running(timeout_server) == 0


def test_token_ids_outside_the_vocabulary(small_server: RunningServer) -> None:
    r = httpx.post(
        small_server.url + "/v1/completions", json={"prompt": [1, 2, 10**7], "max_tokens": 1}
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"


def test_context_length_exceeded_names_both_numbers(small_server: RunningServer) -> None:
    r = httpx.post(
        small_server.url + "/v1/completions",
        json={"prompt": "hello " * 300, "max_tokens": 900, "stream": True},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "900" in error["message"] and "1024" in error["message"]
