"""Item 27: keys in query strings or authorization values never reach a log line."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from uvicorn.logging import AccessFormatter

from llmserve.observability import RedactSecrets, redact
from tests.server import free_port

SECRETS = ["s3cret-query-key", "s3cret-key-param", "s3cret-token", "s3cret-access", "s3cret-bearer"]


def test_llmserve_process_logs_no_keys(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "llmserve", "--port", str(port), "--ctx-size", "256"]
    command += ["--parallel", "1", "--disable-auth", "--api-tokens-file", str(tmp_path / "t.yml")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        for path in (
            f"/v1/models?api_key={SECRETS[0]}&limit=2",
            f"/health?key={SECRETS[1]}",
            f"/no/such/route?x=1&token={SECRETS[2]}",
            f"/v1/models?access_token={SECRETS[3]}",
        ):
            assert httpx.get(url + path, headers={"X-Request-Id": "Bearer " + SECRETS[4]})
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    assert '"GET /v1/models?api_key=[REDACTED]&limit=2 HTTP/1.1" 200' in output  # uvicorn's line
    assert "/no/such/route?x=1&token=[REDACTED]" in output
    assert '"route":"unmatched"' in output  # llmserve's own access line is there too
    for secret in SECRETS:
        assert secret not in output, output


def uvicorn_access_record(path: str) -> logging.LogRecord:
    """A record as uvicorn's access logger makes it (AccessFormatter unpacks its args)."""
    args = ("127.0.0.1:5000", "GET", path, "1.1", 200)
    return logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', args, None
    )


def test_filter_keeps_uvicorns_record_shape() -> None:
    record = uvicorn_access_record("/v1/models?key=abc&token=def&monkey=ok")
    assert RedactSecrets().filter(record)
    line = AccessFormatter("%(client_addr)s %(request_line)s %(status_code)s").format(record)
    assert line == (
        "127.0.0.1:5000 GET /v1/models?key=[REDACTED]&token=[REDACTED]&monkey=ok HTTP/1.1 200 OK"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer sk-123", "Authorization: [REDACTED]"),
        ("headers={'x-api-key': 'k-9'}", "headers={'x-api-key': '[REDACTED]'}"),
        ("sent bearer abc.def-ghi", "sent bearer [REDACTED]"),
        ("/x?api-key=1;auth=2#frag", "/x?api-key=[REDACTED];auth=[REDACTED]#frag"),
        ("/x?keyboard=1&turkey=2", "/x?keyboard=1&turkey=2"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
