"""KoboldCpp's samplers over HTTP on the real default model: Kobold requests and OpenAI extras.

The formulas themselves are checked on hand-made logits in tests/engine/test_kobold_samplers.py;
here requests shaped as clients send them are served (200 with text), their samplers change
what is generated, and out-of-range values get a 400 naming the field in each dialect's shape.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import httpx
import openai
import pytest

from tests.dialects.conftest import API_KEY
from tests.server import RunningServer

STORY = "Once upon a time, there was a"  # high entropy: seeded samples differ
SEEDS = 8

# A SillyTavern "Default"-style Kobold preset, as its KoboldCpp backend posts it.
SILLYTAVERN_PRESET: dict[str, Any] = {
    "prompt": "Alice is a friendly baker.\nUser: Hi Alice, what are you baking today?\nAlice:",
    "max_context_length": 2048,
    "max_length": 24,
    "rep_pen": 1.1,
    "rep_pen_range": 1024,
    "rep_pen_slope": 0.7,
    "temperature": 0.7,
    "tfs": 0.95,
    "top_a": 0,
    "top_k": 0,
    "top_p": 0.9,
    "min_p": 0,
    "typical": 1,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5],
    "dynatemp_range": 0,
    "dynatemp_exponent": 1,
    "smoothing_factor": 0,
    "mirostat": 0,
    "use_default_badwordsids": False,
    "stop_sequence": ["\nUser:", "\nAlice:"],
    "trim_stop": True,
    "sampler_seed": 42,
    "quiet": True,
    "genkey": "KCPP4242",
}


def kobold(server: RunningServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/api/v1/generate", json=body, timeout=120)


def kobold_text(server: RunningServer, **fields: Any) -> str:
    (text,) = kobold_texts(server, [fields])
    return text


def kobold_texts(server: RunningServer, bodies: list[dict[str, Any]]) -> list[str]:
    """The texts of several generate requests sent at once (the engine batches them)."""

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            posts = [client.post("/api/v1/generate", json=body) for body in bodies]
            return list(await asyncio.gather(*posts))

    texts = []
    for r in asyncio.run(main()):
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        texts.append(str(result["text"]))
    return texts


@pytest.fixture(scope="module")
def client(dialect_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=dialect_server.url + "/v1", api_key=API_KEY, max_retries=0)


# ---- Kobold ----


def test_sillytavern_preset_with_slope_tfs_and_dynatemp_is_served(
    dialect_server: RunningServer,
) -> None:
    result = kobold(dialect_server, SILLYTAVERN_PRESET)
    assert result.status_code == 200, result.text
    (first,) = result.json()["results"]
    assert first["text"].strip()
    assert first["finish_reason"] in ("stop", "length")
    # Seeded: the same request gives the same text.
    again = kobold(dialect_server, {**SILLYTAVERN_PRESET, "genkey": "KCPP4243"})
    assert again.json()["results"][0]["text"] == first["text"]
    with_dynatemp = {**SILLYTAVERN_PRESET, "dynatemp_range": 0.5, "dynatemp_exponent": 1.5}
    assert kobold_text(dialect_server, **with_dynatemp).strip()


def test_sillytavern_preset_streams(dialect_server: RunningServer) -> None:
    with httpx.stream(
        "POST",
        dialect_server.url + "/api/extra/generate/stream",
        json={**SILLYTAVERN_PRESET, "genkey": "KCPP4244"},
        timeout=120,
    ) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert "".join(e["token"] for e in events).strip()
    assert events[-1]["finish_reason"] in ("stop", "length")


def test_tiny_tfs_leaves_sampling_greedy(dialect_server: RunningServer) -> None:
    # z = 0.01 cuts at the first position it may (1): only the likeliest token is left.
    base = {"prompt": STORY, "max_length": 12}
    greedy = kobold_text(dialect_server, **base, temperature=0)
    seeds = range(4)
    sampled = kobold_texts(
        dialect_server, [{**base, "temperature": 1.0, "sampler_seed": s} for s in seeds]
    )
    cut = kobold_texts(
        dialect_server,
        [{**base, "temperature": 1.0, "tfs": 0.01, "sampler_seed": s} for s in seeds],
    )
    assert cut == [greedy] * len(seeds)
    assert any(text != greedy for text in sampled)  # without tfs the same seeds really sample


def test_dynatemp_changes_seeded_samples(dialect_server: RunningServer) -> None:
    base = {"prompt": STORY, "max_length": 16, "temperature": 1.0}
    plain = kobold_texts(dialect_server, [{**base, "sampler_seed": s} for s in range(4)])
    dynamic = kobold_texts(
        dialect_server, [{**base, "sampler_seed": s, "dynatemp_range": 0.9} for s in range(4)]
    )
    assert all(plain) and all(dynamic)
    assert plain != dynamic


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_a", 1.5),
        ("top_a", -0.2),
        ("tfs", 1.2),
        ("rep_pen_slope", -0.7),
        ("rep_pen_slope", 11),
        ("dynatemp_range", -1),
        ("dynatemp_exponent", -2),
    ],
)
def test_kobold_out_of_range_is_400_naming_the_field(
    dialect_server: RunningServer, field: str, value: float
) -> None:
    r = kobold(dialect_server, {**SILLYTAVERN_PRESET, field: value, "genkey": None})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail["type"] == "bad_input"
    assert field in detail["msg"]


@pytest.mark.parametrize("slope", [0, 1, 1.7, 10])
def test_slopes_kobold_reads_as_no_slope_are_served(
    dialect_server: RunningServer, slope: float
) -> None:
    # KoboldCpp reads a slope outside (0, 1] as none; Kobold United presets send 0 and 1.7.
    assert kobold_text(dialect_server, **{**SILLYTAVERN_PRESET, "rep_pen_slope": slope})


# ---- OpenAI extras ----


def completion_logprobs(client: openai.OpenAI, **extra: Any) -> list[list[tuple[float, float]]]:
    """Per choice, per token: (the sampled token's logprob, the likeliest token's logprob)."""
    completion = client.completions.create(
        model="default",
        prompt=STORY,
        n=SEEDS,
        seed=7,
        max_tokens=16,
        temperature=1.0,
        logprobs=1,
        extra_body=extra,
    )
    out = []
    for choice in completion.choices:
        assert choice.logprobs is not None
        lps = choice.logprobs.token_logprobs or []
        tops = choice.logprobs.top_logprobs or []
        out.append([(lp, max(top.values())) for lp, top in zip(lps, tops, strict=True)])
    return out


def test_openai_top_a_keeps_only_tokens_above_a_p_max_squared(client: openai.OpenAI) -> None:
    # top_a = 1: a sampled token has p >= p_max**2, i.e. logprob >= 2 * the top logprob.
    for choice in completion_logprobs(client, top_a=1.0):
        assert all(lp >= 2 * top - 1e-3 for lp, top in choice)
    unconstrained = completion_logprobs(client)
    assert any(lp < 2 * top - 1e-3 for choice in unconstrained for lp, top in choice)


def test_openai_tfs_is_served_and_cuts_the_tail(client: openai.OpenAI) -> None:
    # z = 0.01 leaves one candidate: every seed follows the likeliest token.
    for choice in completion_logprobs(client, tfs=0.01):
        assert all(math.isclose(lp, top, abs_tol=1e-4) for lp, top in choice)
    loose = completion_logprobs(client, tfs=0.99, rep_pen_slope=0.5, repetition_penalty=1.1)
    assert any(not math.isclose(lp, top, abs_tol=1e-4) for choice in loose for lp, top in choice)


@pytest.mark.parametrize(("field", "value"), [("top_a", 2.0), ("tfs", -0.5)])
def test_openai_out_of_range_is_400_naming_the_field(
    client: openai.OpenAI, field: str, value: float
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model="default", prompt="a", max_tokens=1, extra_body={field: value}
        )
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict)
    assert body.get("param") == field or field in str(body)
