"""What only the vLLM engine does: samplers it lacks are 400s by name, greedy n, its stats.

Runs in the vLLM half (LLMSERVE_TEST_ENGINE=vllm); on llama.cpp the module skips.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from llmserve.engines.base import EngineStats
from llmserve.models.manager import ModelManager
from tests.conftest import TEST_ENGINE, TEST_SETTINGS
from tests.server import RunningServer

pytestmark = pytest.mark.skipif(TEST_ENGINE != "vllm", reason="tests of the vLLM engine")

# Samplers vLLM has no equivalent of: each request field, and the field the 400 names.
LACKING = {
    "tfs": ({"tfs": 0.9}, "tfs"),
    "top_a": ({"top_a": 0.2}, "top_a"),
    "rep_pen_slope": ({"rep_pen_slope": 0.5}, "repetition_penalty_slope"),
    "typical_p": ({"typical_p": 0.5}, "typical_p"),
    "dry": ({"dry_multiplier": 0.8}, "dry"),
    "xtc": ({"xtc_probability": 0.5}, "xtc_probability"),
    "mirostat": ({"mirostat_mode": 2}, "mirostat"),
    "dynatemp": ({"dynatemp_range": 0.5}, "dynatemp_range"),
    "top_n_sigma": ({"top_n_sigma": 1.0}, "top_n_sigma"),
}


def stats(server: RunningServer) -> EngineStats:
    """The engine's stats through the app's model manager."""
    models: ModelManager = server.app.state.models
    return models.loaded()[0].engine.stats()


def complete(server: RunningServer, **body: Any) -> httpx.Response:
    """POST /v1/completions with a short prompt and `body` on top."""
    payload = {"prompt": "Once upon a time", "max_tokens": 8} | body
    return httpx.post(server.url + "/v1/completions", json=payload, timeout=120)


@pytest.mark.parametrize(("body", "param"), LACKING.values(), ids=LACKING.keys())
def test_samplers_vllm_lacks_are_400_naming_them(
    real_server: RunningServer, body: dict[str, Any], param: str
) -> None:
    r = complete(real_server, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, "unsupported_parameter")


def test_samplers_it_has_are_served(real_server: RunningServer) -> None:
    body = {"top_k": 5, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1, "seed": 7}
    body |= {"presence_penalty": 0.5, "frequency_penalty": 0.5, "min_tokens": 4}
    r = complete(real_server, temperature=0.8, **body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8


def test_embeddings_are_refused_by_name(real_server: RunningServer) -> None:
    r = httpx.post(real_server.url + "/v1/embeddings", json={"input": "hi"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "unsupported_parameter"


def test_greedy_n_gives_n_equal_choices(client: openai.OpenAI) -> None:
    r = client.completions.create(model="x", prompt="Hello", max_tokens=6, temperature=0, n=3)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and len(set(texts)) == 1 and texts[0]
    assert r.usage is not None and r.usage.completion_tokens == 18


def test_sampled_n_gives_n_choices(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="x", prompt="Hello", max_tokens=6, temperature=1.0, n=3, seed=3
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage is not None and r.usage.completion_tokens == 18


def test_model_card_and_stats_come_from_vllm(real_server: RunningServer) -> None:
    before = stats(real_server)
    assert complete(real_server, max_tokens=5, ignore_eos=True).status_code == 200
    deadline = time.monotonic() + 30
    after = stats(real_server)
    while after.running and time.monotonic() < deadline:
        time.sleep(0.05)
        after = stats(real_server)
    assert after.generated_tokens_total - before.generated_tokens_total == 5
    assert after.prompt_tokens_total > before.prompt_tokens_total
    assert after.total_slots == TEST_SETTINGS["parallel"]
    assert after.kv_cells_total > TEST_SETTINGS["ctx_size"] and after.alive
    models: ModelManager = real_server.app.state.models
    info = models.loaded()[0].engine.info
    assert info.description == "llama 135M BF16" and info.context_length == 2048
    card = httpx.get(real_server.url + "/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == info.id


def test_prefix_cache_hits_are_counted(real_server: RunningServer) -> None:
    prompt = "A long shared system prompt about apples and pears. " * 20
    for _ in range(2):
        assert complete(real_server, prompt=prompt, max_tokens=2).status_code == 200
    r = complete(real_server, prompt=prompt, max_tokens=2)
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
