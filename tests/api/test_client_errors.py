"""Item 31: every 4xx the framework raises carries a client error type, in each dialect's shape."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.server import RunningServer

# (path of a POST route, the dialect's shape)
DIALECTS = [
    ("/v1/chat/completions", "openai"),
    ("/api/v1/generate", "kobold"),
    ("/inference", "openai"),
]


def client_error(response: httpx.Response, shape: str) -> tuple[str, str | None]:
    """The error's (type, code); asserts it is shaped like the dialect's errors."""
    body = response.json()
    if shape == "kobold":
        assert body["detail"]["type"] == "bad_input", body
        return body["detail"]["type"], None
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert error["type"] == "invalid_request_error", body
    return error["type"], error["code"]


def raw_post(server: RunningServer, path: str, body: bytes) -> tuple[int, bytes]:
    """POST raw body bytes (no client-side encoding); the status and response body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


@pytest.mark.parametrize(("path", "shape"), DIALECTS)
def test_wrong_method_is_a_client_error(fake_server: RunningServer, path: str, shape: str) -> None:
    r = httpx.put(fake_server.url + path, json={})
    assert r.status_code == 405
    assert "POST" in r.headers["allow"]
    _, code = client_error(r, shape)
    assert code in ("method_not_allowed", None)


@pytest.mark.parametrize(("path", "shape"), DIALECTS)
def test_chunked_body_over_the_limit_is_a_client_error(
    fake_server: RunningServer, path: str, shape: str
) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(9):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(
        fake_server.url + path, content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413
    _, code = client_error(r, shape)
    assert code in ("request_too_large", None)


@pytest.mark.parametrize(("path", "shape"), DIALECTS)
@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "\xff\xfe", "messages": []}'],
    ids=["nested-1e5", "invalid-utf8"],
)
def test_unparseable_body_is_a_client_error(
    fake_server: RunningServer, path: str, shape: str, body: bytes
) -> None:
    status, payload = raw_post(fake_server, path, body)
    assert status == 400
    client_error(httpx.Response(status, content=payload), shape)


def test_unknown_route_is_not_found(fake_server: RunningServer) -> None:
    r = httpx.get(fake_server.url + "/v1/no-such-route")
    assert r.status_code == 404
    assert client_error(r, "openai") == ("invalid_request_error", "not_found")
    kobold = httpx.get(fake_server.url + "/api/v1/no-such-route")
    assert json.loads(kobold.text)["detail"]["type"] == "not_found"
