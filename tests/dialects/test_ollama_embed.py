"""Ollama's /api/embed and /api/embeddings, and `/` for browsers, on the real default model."""

from __future__ import annotations

import math

import httpx
import ollama
import pytest

from tests.dialects.conftest import API_KEY, AUTH
from tests.server import RunningServer


@pytest.fixture(scope="module")
def client(dialect_server: RunningServer) -> ollama.Client:
    return ollama.Client(host=dialect_server.url, headers={"Authorization": f"Bearer {API_KEY}"})


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embed_returns_normalized_vectors_in_order(client: ollama.Client) -> None:
    texts = ["The cat sat on the mat.", "A kitten was resting on the rug.", "Revenue rose."]
    answer = client.embed(model="smol", input=texts)
    vectors = [list(v) for v in answer.embeddings]
    assert len(vectors) == 3 and len({len(v) for v in vectors}) == 1
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert answer.prompt_eval_count is not None and answer.prompt_eval_count > 10
    again = client.embed(model="smol", input=texts[0])
    assert list(again.embeddings[0]) == vectors[0]  # deterministic, alone or in a batch


def test_legacy_embeddings_is_the_unnormalized_vector(client: ollama.Client) -> None:
    legacy = list(client.embeddings(model="smol", prompt="The cat sat on the mat.").embedding)
    norm = math.sqrt(sum(x * x for x in legacy))
    assert abs(norm - 1) > 1e-3  # raw, as Ollama's older route answers
    (normalized,) = client.embed(model="smol", input="The cat sat on the mat.").embeddings
    assert cosine(legacy, list(normalized)) > 0.9999


def test_embed_truncates_unless_told_not_to(dialect_server: RunningServer) -> None:
    url = dialect_server.url + "/api/embed"
    long_text = "word " * 5000
    cut = httpx.post(url, json={"input": long_text}, headers=AUTH, timeout=300)
    assert cut.status_code == 200, cut.text
    refused = httpx.post(url, json={"input": long_text, "truncate": False}, headers=AUTH)
    assert refused.status_code == 400
    assert "error" in refused.json() and "truncate" in refused.json()["error"]
    for body in ({"input": [""]}, {"input": []}, {"input": "x", "dimensions": 8}):
        bad = httpx.post(url, json=body, headers=AUTH, timeout=60)
        assert bad.status_code == 400, body
        assert isinstance(bad.json()["error"], str)  # Ollama's error shape


def test_a_browser_asking_for_root_is_sent_to_the_ui(dialect_server: RunningServer) -> None:
    browser = httpx.get(dialect_server.url + "/", headers={"Accept": "text/html,*/*"})
    assert browser.status_code == 307 and browser.headers["location"] == "/ui"
    assert httpx.get(dialect_server.url + "/").text == "Ollama is running"
