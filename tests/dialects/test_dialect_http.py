"""Auth and error shapes of the Kobold and Together dialects, over HTTP on the fake engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.api.kobold.serving import kobold_error_response
from llmserve.api.together.serving import together_error_response
from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.errors import EngineError, QueueFullError
from llmserve.core.request import Delta, GenerationRequest
from llmserve.core.templates import load_template
from llmserve.models.manager import ModelManager
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve

KEY = "dialect-key"
KOBOLD_BODY = {"prompt": "hi", "max_length": 2}
TOGETHER_BODY = {"prompt": "hi", "max_tokens": 2}


class FailingEngine(FakeEngine):
    """Produces one delta, then fails: an error after the stream has started."""

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        yield Delta(0, "alpha ", (1,))
        raise EngineError("the engine broke")


def fake_server(tmp: Path, engine: FakeEngine, **settings: Any) -> Iterator[RunningServer]:
    config = Settings(api_tokens_file=tmp / "api_tokens.yml", api_key=[KEY], **settings)
    manager = ModelManager(config)
    manager.register(engine, ["fake-model"], load_template(None, "gguf"))
    with serve(create_app(config, manager)) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Default settings: Kobold routes take the API keys."""
    yield from fake_server(tmp_path_factory.mktemp("keyed"), FakeEngine())


@pytest.fixture(scope="module")
def kobold_open(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`kobold_auth: false`: Kobold routes open, the rest still keyed."""
    yield from fake_server(tmp_path_factory.mktemp("open"), FakeEngine(), kobold_auth=False)


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """An open server whose engine fails mid-stream."""
    tmp = tmp_path_factory.mktemp("failing")
    yield from fake_server(tmp, FailingEngine(), disable_auth=True)


def kobold_detail(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail"} and set(body["detail"]) == {"msg", "type"}
    assert body["detail"]["type"] == kind
    return str(body["detail"]["msg"])


def together_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_kobold_routes_take_the_api_keys_by_default(keyed: RunningServer) -> None:
    for method, path in [
        ("POST", "/api/v1/generate"),
        ("POST", "/api/latest/generate"),
        ("POST", "/api/extra/generate/stream"),
        ("POST", "/api/extra/abort"),
        ("POST", "/api/extra/tokencount"),
        ("GET", "/api/v1/model"),
        ("GET", "/api/extra/perf"),
    ]:
        r = httpx.request(method, keyed.url + path, json=KOBOLD_BODY)
        kobold_detail(r, 401, "unauthorized")
    r = httpx.post(keyed.url + "/api/v1/generate", json=KOBOLD_BODY, headers={"x-api-key": KEY})
    assert r.status_code == 200 and r.json()["results"][0]["text"] == "alpha beta "
    # The version probes stay open, so a client learns that a key is needed.
    assert httpx.get(keyed.url + "/api/extra/version").json()["protected"] is True
    assert httpx.get(keyed.url + "/api/v1/info/version").json() == {"result": "1.2.5"}


def test_together_errors_in_togethers_shape(keyed: RunningServer) -> None:
    for path in ("/inference", "/api/inference"):
        error = together_error(httpx.post(keyed.url + path, json=TOGETHER_BODY), 401)
        assert error["code"] == "invalid_api_key"
    missing = httpx.post(keyed.url + "/inference", json={}, headers={"x-api-key": KEY})
    assert together_error(missing, 400)["param"] == "prompt"
    ok = httpx.post(keyed.url + "/inference", json=TOGETHER_BODY, headers={"x-api-key": KEY})
    assert ok.json()["choices"][0] == {"text": "alpha beta ", "finish_reason": "length", "index": 0}


def test_kobold_auth_false_opens_kobold_alone(kobold_open: RunningServer) -> None:
    r = httpx.post(kobold_open.url + "/api/v1/generate", json=KOBOLD_BODY)
    assert r.status_code == 200
    assert httpx.get(kobold_open.url + "/api/extra/version").json()["protected"] is False
    openai = httpx.post(kobold_open.url + "/v1/completions", json={"prompt": "hi"})
    assert openai.status_code == 401 and openai.json()["error"]["type"] == "authentication_error"
    together_error(httpx.post(kobold_open.url + "/inference", json=TOGETHER_BODY), 401)


def test_kobold_bad_input_and_unknown_route(kobold_open: RunningServer) -> None:
    r = httpx.post(kobold_open.url + "/api/v1/generate", json={"prompt": "x", "max_length": "a"})
    assert "max_length" in kobold_detail(r, 400, "bad_input")
    r = httpx.post(kobold_open.url + "/api/v1/generate", json={"max_length": 2})
    assert "prompt" in kobold_detail(r, 400, "bad_input")
    kobold_detail(httpx.get(kobold_open.url + "/api/v1/nope"), 404, "not_found")


def test_queue_full_is_503_for_kobold_and_429_for_together() -> None:
    kobold = kobold_error_response(QueueFullError("3 requests are already waiting"))
    assert kobold.status_code == 503 and kobold.headers["retry-after"] == "1"
    assert json.loads(kobold.body)["detail"]["type"] == "service_unavailable"
    together = together_error_response(QueueFullError("3 requests are already waiting"))
    assert together.status_code == 429
    assert json.loads(together.body)["error"]["code"] == "queue_full"


def test_errors_after_a_stream_started(failing: RunningServer) -> None:
    with httpx.stream("POST", failing.url + "/api/extra/generate/stream", json=KOBOLD_BODY) as r:
        events = [
            json.loads(line[len("data: ") :])
            for line in r.read().decode().split("\n")
            if line.startswith("data: ")
        ]
    assert events[0] == {"token": "alpha ", "finish_reason": None}
    assert events[-1] == {
        "token": "",
        "finish_reason": "error",
        "detail": {"msg": "the engine broke", "type": "server_error"},
    }
    body = {**TOGETHER_BODY, "stream_tokens": True}
    with httpx.stream("POST", failing.url + "/inference", json=body) as r:
        lines = [line for line in r.read().decode().split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: ") :])["error"]
    assert error["message"] == "the engine broke" and error["request_id"]
    # Not streaming, the same failure is a 500 in Kobold's shape.
    r = httpx.post(failing.url + "/api/v1/generate", json=KOBOLD_BODY)
    assert kobold_detail(r, 500, "server_error") == "the engine broke"
