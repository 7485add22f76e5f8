"""A list of prompts on /v1/completions (as lm-eval sends) reaches the engine as one batch.

Issue 11 item 10: prompt i + 1 used to be submitted only after prompt i's first token, so 8
prompts took about 8 more engine steps than one prompt. Counted in engine steps, not time.
"""

from __future__ import annotations

import threading
import time

import httpx

from llmserve.engines.base import EngineStats
from llmserve.models.manager import ModelManager
from tests.server import RunningServer

MAX_TOKENS = 16
PROMPTS = 8


def engine_stats(server: RunningServer) -> EngineStats:
    """The real engine's stats, read through the app's model manager."""
    models: ModelManager = server.app.state.models
    return models.loaded()[0].engine.stats()


def wait_idle(server: RunningServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine_stats(server)
        if stats.running == 0 and stats.waiting == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine_stats(server)}")


def test_eight_prompts_decode_together(real_server: RunningServer) -> None:
    wait_idle(real_server)
    body = {
        "model": "x",
        "prompt": [f"Harbour log {i}: the tide" for i in range(PROMPTS)],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    most_running = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most_running
        while not done.is_set():
            most_running = max(most_running, engine_stats(real_server).running)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    before = engine_stats(real_server)
    watcher.start()
    try:
        r = httpx.post(real_server.url + "/v1/completions", json=body, timeout=120)
    finally:
        done.set()
        watcher.join()
    after = engine_stats(real_server)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert sorted(c["index"] for c in choices) == list(range(PROMPTS))
    assert r.json()["usage"]["completion_tokens"] == PROMPTS * MAX_TOKENS
    assert after.generated_tokens_total - before.generated_tokens_total == PROMPTS * MAX_TOKENS
    # Batched: every prompt is admitted within the first step or two, so the request takes
    # about MAX_TOKENS steps. One prompt after another took at least MAX_TOKENS + 7.
    assert after.steps_total - before.steps_total <= MAX_TOKENS + 3
    assert most_running > 1


def test_a_bad_prompt_in_a_list_fails_before_the_first_byte(real_server: RunningServer) -> None:
    """One prompt too long for the context: 400 naming it, and nothing keeps running."""
    wait_idle(real_server)
    context = engine_stats(real_server).kv_cells_total // engine_stats(real_server).total_slots
    too_long = list(range(1000, 1000 + context + 8))
    body = {"model": "x", "prompt": [[1, 2, 3], [4, 5, 6], too_long], "max_tokens": 4}
    for stream in (False, True):
        r = httpx.post(
            real_server.url + "/v1/completions", json={**body, "stream": stream}, timeout=60
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] in {"prompt", "max_tokens"}
    wait_idle(real_server)
    stats = engine_stats(real_server)
    assert stats.free_slots == stats.total_slots
