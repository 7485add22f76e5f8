"""The `llmserve` process: start-up checks, SIGTERM drains streams and exits 0, two signals exit."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from gguf import GGUFWriter

from llmserve.models.defaults import default_model_path
from tests.server import free_port

# Runs `llmserve` with an engine step that fails once the file named by argv[1] exists.
FAILING_ENGINE = """
import os, sys
from llmserve.engines.llamacpp.runner import StepRunner
from llmserve.cli import main
marker, real_step = sys.argv.pop(1), StepRunner.step
def step(self):
    if os.path.exists(marker):
        raise RuntimeError("injected engine failure")
    real_step(self)
StepRunner.step = step
main()
"""


@contextmanager
def llmserve(
    tmp_path: Path, *args: str, launcher: tuple[str, ...] = ("-m", "llmserve")
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    command = [
        sys.executable,
        *launcher,
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
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
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


def test_a_stream_on_a_swapped_out_engine_ends_properly_at_shutdown(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(default_model_path(), models / "other.gguf")
    args = ("--disable-auth", "--shutdown-grace", "1", "--models-dir", str(models))
    with llmserve(tmp_path, *args) as (process, port):
        sock = open_stream(port, max_tokens=1000)
        load = {"model_name": "other"}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/model/load", json=load, timeout=60)
        assert r.status_code == 200, r.text
        process.send_signal(signal.SIGTERM)  # the stream still runs on the old engine
        body = read_all(sock)
        assert process.wait(timeout=60) == 0
    events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"


@pytest.mark.parametrize("content", [b"not a model at all\n", None])
def test_a_bad_start_up_model_exits_with_a_clear_message(
    tmp_path: Path, content: bytes | None
) -> None:
    bad = tmp_path / "bad.gguf"
    if content is None:  # a valid GGUF that holds no model: only llama.cpp can tell
        writer = GGUFWriter(str(bad), "llama")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    else:
        bad.write_bytes(content)
    command = [sys.executable, "-m", "llmserve", "--port", str(free_port()), "--model", str(bad)]
    result = subprocess.run(
        [*command, "--api-tokens-file", str(tmp_path / "t.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "bad.gguf" in result.stderr
    assert "llmserve: cannot load the model" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_engine_that_dies_and_cannot_be_reloaded_exits_non_zero(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    shutil.copy(default_model_path(), model)
    marker = tmp_path / "fail-now"
    launcher = ("-c", FAILING_ENGINE, str(marker))
    with llmserve(tmp_path, "--disable-auth", "--model", str(model), launcher=launcher) as (
        process,
        port,
    ):
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "Hello", "max_tokens": 4}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
        model.unlink()  # the reload will fail (the running engine keeps its mapping)
        marker.touch()
        failed = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert failed.status_code == 503  # the request in flight is answered
        assert process.wait(timeout=60) != 0
        output = process.stdout.read().decode() if process.stdout else ""
    assert "injected engine failure" in output
    assert "llmserve: the engine of model died" in output
