"""The `llmserve` process: start-up checks, SIGTERM drains streams and exits 0, two signals exit."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.server import free_port


@contextmanager
def llmserve(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llmserve",
        "--port",
        str(port),
        "--ctx-size",
        "1024",
        "--parallel",
        "2",
        "--api-tokens-file",
        str(tmp_path / "t.yml"),
        *args,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def open_stream(port: int, max_tokens: int) -> socket.socket:
    payload = json.dumps(
        {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    received = b""
    while b"data:" not in received:  # headers may arrive before the first event
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_refuses_open_server_on_public_address(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmserve",
            "--host",
            "0.0.0.0",
            "--disable-auth",
            "--api-tokens-file",
            str(tmp_path / "t.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--i-know-this-is-public" in result.stderr


def test_sigterm_ends_streams_with_a_final_event_and_exits_0(tmp_path: Path) -> None:
    with llmserve(tmp_path, "--disable-auth", "--shutdown-grace", "1") as (process, port):
        sock = open_stream(port, max_tokens=1000)
        process.send_signal(signal.SIGTERM)
        body = read_all(sock)
        assert process.wait(timeout=60) == 0
    events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"


def test_sigterm_lets_a_short_stream_finish(tmp_path: Path) -> None:
    with llmserve(tmp_path, "--disable-auth", "--shutdown-grace", "30") as (process, port):
        sock = open_stream(port, max_tokens=40)
        process.send_signal(signal.SIGTERM)
        body = read_all(sock)
        assert process.wait(timeout=60) == 0
    events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    with llmserve(tmp_path, "--disable-auth", "--shutdown-grace", "60") as (process, port):
        sock = open_stream(port, max_tokens=1000)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        assert time.monotonic() - started < 20
        sock.close()


def test_admin_api_on_its_own_port(tmp_path: Path) -> None:
    admin_port = free_port()
    with llmserve(tmp_path, "--disable-auth", "--admin-port", str(admin_port)) as (process, port):
        main = f"http://127.0.0.1:{port}"
        admin = f"http://127.0.0.1:{admin_port}"
        assert httpx.post(main + "/v1/template/unload").status_code == 404
        assert httpx.post(admin + "/v1/template/unload").status_code == 200
        assert httpx.get(admin + "/v1/models").status_code == 404  # only admin routes there
        assert httpx.get(main + "/v1/models").status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_admin_api_can_be_disabled(tmp_path: Path) -> None:
    with llmserve(tmp_path, "--disable-auth", "--no-admin-api") as (_process, port):
        assert httpx.post(f"http://127.0.0.1:{port}/v1/model/unload").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{port}/v1/model").status_code == 200
