"""Hostile input through the real server on the real model: bodies, templates, disconnects."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.models.manager import ModelManager
from tests.conftest import TEST_SETTINGS
from tests.server import RunningServer, serve

JSON = {"content-type": "application/json"}
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
PLAIN = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# Renders like PLAIN, but misbehaves on request: loops 10^10 times, divides by zero.
MOODY = (
    "{% if messages[-1]['content'] == 'spin' %}" + SPIN + "{% endif %}"
    "{% if messages[-1]['content'] == 'zero' %}{{ 1 / 0 }}{% endif %}" + PLAIN
)


def post_raw(server: RunningServer, path: str, body: bytes | str) -> httpx.Response:
    raw = body.encode() if isinstance(body, str) else body
    return httpx.post(server.url + path, content=raw, headers=JSON, timeout=120)


def openai_error(response: httpx.Response, status: int = 400) -> dict[str, str]:
    assert response.status_code == status, response.text
    error: dict[str, str] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


# ---- bodies (items 5, 24, 25) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", r'{"prompt": "Hello \ud800", "max_tokens": 2}', "prompt"),
        ("/tokenize", r'{"prompt": "\udfff"}', "prompt"),
        ("/v1/token/encode", r'{"text": "\ud800"}', "text"),
        (
            "/v1/chat/completions",
            r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
            "messages.0.content.0.text",
        ),
        ("/v1/completions", '{"prompt": "Hello", "temperature": NaN}', "temperature"),
        ("/v1/completions", '{"prompt": "Hello", "top_p": Infinity}', "top_p"),
    ],
)
def test_real_server_refuses_what_cannot_be_tokenized(
    real_server: RunningServer, path: str, body: str, param: str
) -> None:
    assert openai_error(post_raw(real_server, path, body))["param"] == param


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/extra/tokencount", r'{"prompt": "\ud800"}'),
        ("/api/v1/generate", r'{"prompt": "Hello", "max_length": 2, "temperature": -Infinity}'),
    ],
)
def test_real_server_refuses_them_in_kobold_shape(
    real_server: RunningServer, path: str, body: str
) -> None:
    r = post_raw(real_server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["detail"]["type"] == "bad_input"


def test_real_server_refuses_bytes_that_are_not_utf8(real_server: RunningServer) -> None:
    r = post_raw(real_server, "/v1/completions", b'{"prompt": "\xc3\x28", "max_tokens": 2}')
    assert openai_error(r)["code"] == "invalid_encoding"
    r = post_raw(real_server, "/tokenize", b'{"prompt": "\xed\xa0\x80"}')  # a UTF-8'd surrogate
    assert openai_error(r)["code"] == "invalid_encoding"


def test_real_server_refuses_deep_nesting(real_server: RunningServer) -> None:
    r = post_raw(real_server, "/v1/completions", "[" * 100_000)
    assert openai_error(r)["code"] == "json_too_deep"
    body = '{"prompt": "Hello", "args": ' + "{" + '"a": {' * 400 + "}" * 401 + "}"
    assert openai_error(post_raw(real_server, "/inference", body))["param"] == "args"


# ---- disconnects (item 18) --------------------------------------------------------------------


class Records(logging.Handler):
    """Collects log records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    """Every llmserve record (INFO and up) and everything uvicorn reports as an error."""
    handler = Records()
    ours, uvicorn_error = logging.getLogger("llmserve"), logging.getLogger("uvicorn.error")
    level = ours.level
    ours.setLevel(logging.INFO)
    ours.addHandler(handler)
    uvicorn_error.addHandler(handler)
    try:
        yield handler
    finally:
        ours.removeHandler(handler)
        uvicorn_error.removeHandler(handler)
        ours.setLevel(level)


def running(server: RunningServer) -> int:
    models: ModelManager = server.app.state.models
    return sum(model.engine.stats().running for model in models.loaded())


def wait_for(condition: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_a_client_leaving_a_non_streaming_chat_ends_quietly(
    real_server: RunningServer, records: Records
) -> None:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1500,
            "ignore_eos": True,
        }
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", real_server.port), timeout=30) as sock:
        sock.sendall(head + body)
        wait_for(lambda: running(real_server) >= 1)
    # Gone before the answer: the engine slot frees and the handler ends, saying so at INFO.
    wait_for(lambda: running(real_server) == 0)
    wait_for(
        lambda: any(
            r.levelno >= logging.ERROR or "client left" in r.getMessage() for r in records.records
        )
    )
    assert httpx.get(real_server.url + "/health", timeout=30).status_code == 200
    errors = [r.getMessage() for r in records.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert not any("Exception in ASGI application" in r.getMessage() for r in records.records)


def test_a_client_leaving_while_sending_its_body_ends_quietly(
    real_server: RunningServer, records: Records
) -> None:
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", real_server.port), timeout=30) as sock:
        sock.sendall(head + b'{"prompt": "Hel')
    wait_for(
        lambda: any(r.levelno >= logging.ERROR or "499" in r.getMessage() for r in records.records)
    )
    assert [r.getMessage() for r in records.records if r.levelno >= logging.ERROR] == []


# ---- templates through the admin API (items 6, 26, 28) ----------------------------------------


@pytest.fixture(scope="module")
def templated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The real model with a folder of good and bad chat templates, auth off."""
    root = tmp_path_factory.mktemp("templates")
    folder = root / "templates"
    folder.mkdir()
    (folder / "plain.jinja").write_text(PLAIN)
    (folder / "moody.jinja").write_text(MOODY)
    (folder / "spin.jinja").write_text(SPIN)
    (folder / "bigrange.jinja").write_text("{{ range(10**9)|list|length }}" + PLAIN)
    (folder / "latin1.jinja").write_bytes(("caf\u00e9 " + PLAIN).encode("latin-1"))
    settings = Settings(
        disable_auth=True,
        templates_dir=folder,
        api_tokens_file=root / "api_tokens.yml",
        **TEST_SETTINGS,
    )
    with serve(create_app(settings)) as server:
        yield server


def switch(server: RunningServer, name: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/template/switch", json={"name": name}, timeout=120)


def chat(server: RunningServer, content: str, **extra: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def active(server: RunningServer) -> str:
    return str(httpx.get(server.url + "/v1/templates", timeout=30).json()["active"])


def test_bad_template_files_are_refused_and_the_old_one_stays(templated: RunningServer) -> None:
    assert switch(templated, "plain").status_code == 200
    for name in ("spin", "bigrange", "latin1"):
        error = openai_error(switch(templated, name))
        assert error["code"] == "chat_template_error", error
        assert active(templated) == "file:plain.jinja"
    assert "UTF-8" in openai_error(switch(templated, "latin1"))["message"]
    assert chat(templated, "Hello").status_code == 200


def test_templates_that_fail_on_a_request_answer_400(templated: RunningServer) -> None:
    assert switch(templated, "moody").status_code == 200
    try:
        for content in ("spin", "zero"):
            error = openai_error(chat(templated, content))
            assert (error["code"], error["param"]) == ("chat_template_error", "messages")
        assert chat(templated, "Hello").status_code == 200  # the server is fine
    finally:
        assert httpx.post(templated.url + "/v1/template/unload", json={}).status_code == 200


def test_reserved_template_kwargs_answer_400(templated: RunningServer) -> None:
    for key in ("messages", "add_generation_prompt", "bos_token"):
        error = openai_error(chat(templated, "Hello", chat_template_kwargs={key: 1}))
        assert error["param"] == f"chat_template_kwargs.{key}"
    assert chat(templated, "Hello", chat_template_kwargs={"enable_thinking": False}).is_success
