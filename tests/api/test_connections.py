"""Connection deadlines through raw sockets: a request head must arrive in time."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from llmserve.app import create_app
from llmserve.cli import _uvicorn_config
from llmserve.config import Settings
from llmserve.connections import HeadTimeoutH11Protocol, with_head_timeout
from llmserve.core.templates import load_template
from llmserve.models.manager import ModelManager
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve

HEAD_TIMEOUT = 0.5
GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def strict_server() -> Iterator[RunningServer]:
    """The fake-engine app behind the head-timeout protocol with a short deadline."""
    settings = Settings(disable_auth=True)
    manager = ModelManager(settings)
    manager.register(FakeEngine(), ["fake-model"], load_template(None, "gguf"))
    with serve(create_app(settings, manager), http=with_head_timeout(HEAD_TIMEOUT)) as server:
        yield server


def connect(server: RunningServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (EOF or reset) before our 10 s timeout."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head


def test_silent_connection_is_closed(strict_server: RunningServer) -> None:
    with connect(strict_server) as sock:
        started = time.monotonic()
        assert closed_by_server(sock)
        assert time.monotonic() - started >= HEAD_TIMEOUT * 0.8


def test_trickled_headers_are_cut_off(strict_server: RunningServer) -> None:
    """A slowloris client: bytes keep coming, but the head never completes in time."""
    with connect(strict_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        for i in range(40):  # 40 × 0.1 s, far past the deadline
            time.sleep(0.1)
            try:
                sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed or closed_by_server(sock)


def test_keep_alive_request_after_a_pause_is_served(strict_server: RunningServer) -> None:
    """The deadline covers a head in transit, not the idle time between requests."""
    with connect(strict_server) as sock:
        sock.sendall(GET_HEALTH)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(HEAD_TIMEOUT * 3)
        sock.sendall(GET_HEALTH)
        assert read_response(sock).startswith(b"HTTP/1.1 200")


def test_slow_body_is_not_cut_by_the_head_deadline(strict_server: RunningServer) -> None:
    body = b'{"prompt": "hi", "max_tokens": 2}'
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )
    with connect(strict_server) as sock:
        sock.sendall(head)
        time.sleep(HEAD_TIMEOUT * 3)
        sock.sendall(body)
        assert read_response(sock).startswith(b"HTTP/1.1 200")


def test_the_server_command_uses_the_configured_deadline() -> None:
    config = _uvicorn_config(object(), "127.0.0.1", 0, Settings(header_timeout=7.5))
    assert isinstance(config.http, type) and issubclass(config.http, HeadTimeoutH11Protocol)
    assert config.http.head_timeout == 7.5
