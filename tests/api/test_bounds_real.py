"""Request sizes on the real engine: windows clamped to the context, lists bounded (#11: 0, 7)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.core import limits
from tests.conftest import llamacpp_only
from tests.server import RunningServer

MEMORY_GROWTH_LIMIT_MB = 200  # 2**30-token windows grew the server by 4 GB (penalties), 8 GB (DRY)
STATUS = Path("/proc/self/status")


def status_mb(field: str) -> int:
    """A VmRSS-style field of this process (the server runs in a thread of it), in MB."""
    found = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    assert found is not None
    return int(found.group(1)) // 1024


def reset_peak_rss() -> None:
    """Make VmHWM (peak RSS) start again from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def post(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def peak_growth_mb(server: RunningServer, path: str, body: dict[str, Any]) -> int:
    """How far the process's peak RSS rose above its RSS while serving one request (200 OK)."""
    before = status_mb("VmRSS")
    reset_peak_rss()
    response = post(server, path, body)
    assert response.status_code == 200, response.text
    return status_mb("VmHWM") - before


HUGE_WINDOWS = {
    "prompt": "The cat sat on the mat. The cat sat on the",
    "max_tokens": 4,
    "repetition_penalty": 1.2,
    "frequency_penalty": 0.5,
    "penalty_range": 2**30,
    "dry_multiplier": 0.8,
    "dry_range": 2**30,
}


@llamacpp_only  # DRY
@pytest.mark.parametrize("window", [2**30, 2**40])
def test_huge_penalty_and_dry_windows_do_not_allocate(
    real_server: RunningServer, window: int
) -> None:
    body = {**HUGE_WINDOWS, "penalty_range": window, "dry_range": window}
    post(real_server, "/v1/completions", {**body, "penalty_range": 64, "dry_range": 64})  # warm
    growth = peak_growth_mb(real_server, "/v1/completions", body)
    assert growth < MEMORY_GROWTH_LIMIT_MB


def test_huge_kobold_rep_pen_range_does_not_allocate(real_server: RunningServer) -> None:
    body = {"prompt": HUGE_WINDOWS["prompt"], "max_length": 4, "rep_pen": 1.2}
    post(real_server, "/api/v1/generate", {**body, "rep_pen_range": 64})  # warm up
    growth = peak_growth_mb(real_server, "/api/v1/generate", {**body, "rep_pen_range": 2**30})
    assert growth < MEMORY_GROWTH_LIMIT_MB


TOO_MUCH = [
    ("stop", [f"stop{i}" for i in range(limits.MAX_STOP_STRINGS + 1)]),
    ("stop", ["x" * (limits.MAX_STOP_LENGTH + 1)]),
    ("dry_sequence_breakers", [f"b{i}" for i in range(1000)]),
    ("dry_sequence_breakers", ["y" * (limits.MAX_DRY_BREAKER_LENGTH + 1)]),
    ("logit_bias", {str(i): 1.0 for i in range(limits.MAX_LOGIT_BIAS + 1)}),
    ("logit_bias", {"42": 150.0}),
    ("logit_bias", {"42": -100.5}),
    ("banned_tokens", list(range(limits.MAX_BANNED_TOKENS + 1))),
    ("stop_token_ids", list(range(limits.MAX_STOP_TOKEN_IDS + 1))),
]


@pytest.mark.parametrize(("field", "value"), TOO_MUCH)
def test_openai_fields_past_their_bound_are_400(
    real_server: RunningServer, field: str, value: Any
) -> None:
    body = {"prompt": "Hello", "max_tokens": 2, "dry_multiplier": 0.8, field: value}
    r = post(real_server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", field)


def test_chat_stop_past_its_bound_is_400(real_server: RunningServer) -> None:
    stops = [f"stop{i}" for i in range(limits.MAX_STOP_STRINGS + 1)]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stop": stops}
    r = post(real_server, "/v1/chat/completions", body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "stop"


@llamacpp_only  # sends DRY settings
def test_bounds_are_generous_enough_for_real_clients(real_server: RunningServer) -> None:
    body = {
        "prompt": "Hello",
        "max_tokens": 3,
        "stop": [f"\nUser{i}:" for i in range(limits.MAX_STOP_STRINGS)],
        "dry_multiplier": 0.8,
        "dry_sequence_breakers": ["\n", ":", '"', "*", "<|im_end|>"],
        "logit_bias": {"42": -100, "43": 100},
        "banned_tokens": [1, 2, 3],
    }
    r = post(real_server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stop_sequence", [f"stop{i}" for i in range(limits.MAX_STOP_STRINGS + 1)]),
        ("logit_bias", {"42": 101.0}),
        ("banned_tokens", list(range(limits.MAX_BANNED_TOKENS + 1))),
    ],
)
def test_kobold_fields_past_their_bound_are_400_in_koboldcpp_shape(
    real_server: RunningServer, field: str, value: Any
) -> None:
    r = post(real_server, "/api/v1/generate", {"prompt": "Hello", "max_length": 2, field: value})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert set(detail) == {"msg", "type"}
    assert detail["type"] == "bad_input"


def test_long_stop_strings_still_stop(real_server: RunningServer) -> None:
    """Held-back prefixes of long stop strings do not swallow text or miss a short stop."""
    body = {"prompt": "Count: 1, 2, 3, 4,", "max_tokens": 40, "temperature": 0}
    plain = post(real_server, "/v1/completions", body).json()["choices"][0]["text"]
    cut = plain[len(plain) // 2 :][:3]
    length = limits.MAX_STOP_LENGTH
    long_stops = [cut[0] + "z" * (length - 1)]  # its first character is held back, then let go
    long_stops += [str(i % 10) * length for i in range(limits.MAX_STOP_STRINGS - 2)]
    r = post(real_server, "/v1/completions", {**body, "stop": [*long_stops, cut]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == plain[: plain.index(cut)]
