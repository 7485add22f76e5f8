"""A real uvicorn server on 127.0.0.1 in a background thread, for tests."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

# A guard against hangs, not a timing: vLLM's engine takes a minute or more to start on a CPU.
START_TIMEOUT = 900.0 if os.environ.get("LLMSERVE_TEST_ENGINE") == "vllm" else 60.0


@dataclass
class RunningServer:
    """Where a test server listens and the app it serves."""

    app: FastAPI
    port: int

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    """A currently free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(
    app: FastAPI,
    wait_ready: bool = True,
    timeout: float = START_TIMEOUT,
    http: type | str = "auto",
) -> Iterator[RunningServer]:
    """Run `app` under uvicorn in a thread until the block exits (`http`: protocol class)."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", http=http
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    running = RunningServer(app, port)
    try:
        _wait(running, wait_ready, timeout)
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _wait(server: RunningServer, wait_ready: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = httpx.get(server.url + "/health", timeout=2).status_code
            if status == 200 or (status == 503 and not wait_ready):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"test server on port {server.port} did not become ready")


def sse_chunks(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 120
) -> list[dict[str, Any]]:
    """POST `body` to `url` and read the stream: the JSON of each `data:` event but [DONE]."""
    chunks = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks
