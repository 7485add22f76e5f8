"""Logprobs over HTTP on the real model, in the shapes lm-eval and the OpenAI SDK read."""

from __future__ import annotations

import math

import httpx
import openai

from tests.server import RunningServer


def test_lm_eval_loglikelihood_request(real_server: RunningServer) -> None:
    """lm-eval local-completions: token-id prompts, max_tokens 1, echo, logprobs 1."""
    tokens = httpx.post(
        real_server.url + "/tokenize", json={"prompt": "The cat sat on the mat"}
    ).json()["tokens"]
    body = {
        "model": "x",
        "prompt": [tokens, tokens[:3]],
        "max_tokens": 1,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    r = httpx.post(real_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2
    for choice, prompt in zip(choices, [tokens, tokens[:3]], strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1
        assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for position in range(1, len(prompt) + 1):
            top = lp["top_logprobs"][position]
            assert isinstance(top, dict) and top
            assert all(v <= 0 for v in top.values())
            assert lp["token_logprobs"][position] <= max(top.values()) + 1e-4
        # The generated (greedy) token is its own top-1 entry: lm-eval's is_greedy check.
        greedy_logprob = lp["token_logprobs"][-1]
        assert math.isclose(greedy_logprob, max(lp["top_logprobs"][-1].values()), abs_tol=1e-4)
        assert choice["text"].startswith(
            httpx.post(real_server.url + "/detokenize", json={"tokens": prompt}).json()["prompt"]
        )


def test_completion_logprobs_without_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="x", prompt="Hello", max_tokens=5, logprobs=3, temperature=0
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == 5 == len(lp.token_logprobs or [])
    assert all(len(top) >= 3 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and 0 < len(content) <= 6
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-4)  # greedy
        assert entry.bytes is not None


def test_chat_logprobs_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
        stream=True,
    )
    entries = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    assert 0 < len(entries) <= 4
