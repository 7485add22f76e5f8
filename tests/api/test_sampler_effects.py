"""Each sampler does what it says, seen through the HTTP API on the real default model.

Every test compares a sampler against a control run in the same test, with fixed seeds, so a
sampler the engine silently dropped fails. Assertions are structural wherever they can be
(never the banned token, every choice equal to greedy, every seed the same output) rather than
thresholds on how different two samples are.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import engine_cases, llamacpp_only
from tests.server import RunningServer

# Greedy decoding repeats " apple," for as long as it is allowed to.
APPLES = "apple, apple, apple, apple, apple,"
APPLE = " apple"
# A high-entropy continuation: seeded samples at temperature 1 differ from greedy and each other.
STORY = "Once upon a time, there was a"
# Fields the openai SDK takes as arguments; every other sampler goes through `extra_body`.
SDK_FIELDS = {"frequency_penalty", "logit_bias", "presence_penalty", "seed", "top_p"}
SEEDS = 8  # choices per seeded request (`n`): choice i samples with seed + i

Pieces = list[str]


def sample(
    client: openai.OpenAI,
    prompt: str,
    *,
    n: int = 1,
    max_tokens: int = 16,
    temperature: float = 0.0,
    **fields: Any,
) -> list[Pieces]:
    """The token pieces of each choice of one /v1/completions request."""
    named = {key: value for key, value in fields.items() if key in SDK_FIELDS}
    extra = {key: value for key, value in fields.items() if key not in SDK_FIELDS}
    completion = client.completions.create(
        model="default",
        prompt=prompt,
        n=n,
        max_tokens=max_tokens,
        temperature=temperature,
        logprobs=0,
        extra_body=extra,
        **named,
    )
    choices = sorted(completion.choices, key=lambda choice: choice.index)
    assert len(choices) == n
    assert all(choice.logprobs is not None for choice in choices)
    return [list(choice.logprobs.tokens or []) for choice in choices]  # type: ignore[union-attr]


def greedy(client: openai.OpenAI, prompt: str, **fields: Any) -> Pieces:
    """The one greedy continuation of `prompt`."""
    return sample(client, prompt, **fields)[0]


def token_id(server: RunningServer, piece: str) -> int:
    """The id of the single token `piece` is."""
    body = {"prompt": piece, "add_special_tokens": False}
    tokens = httpx.post(server.url + "/tokenize", json=body, timeout=30).json()["tokens"]
    assert len(tokens) == 1, (piece, tokens)
    return int(tokens[0])


@pytest.fixture(scope="module")
def apple(real_server: RunningServer) -> int:
    """The id of " apple", the token greedy decoding repeats after APPLES."""
    return token_id(real_server, APPLE)


@pytest.fixture
def repeating(client: openai.OpenAI) -> Pieces:
    """Greedy APPLES without any penalty: each test's control run."""
    control = greedy(client, APPLES)
    assert control.count(APPLE) >= len(control) // 2 - 1, control  # the prompt invites repeats
    return control


# -- repetition: penalties and DRY -----------------------------------------------------------

PENALTIES = {
    "presence_penalty": {"presence_penalty": 2.0},
    "frequency_penalty": {"frequency_penalty": 1.0},
    "repetition_penalty": {"repetition_penalty": 1.5},
    "dry": {"dry_multiplier": 0.8},
}


@pytest.mark.parametrize("penalty", engine_cases(PENALTIES, {"dry"}))
def test_penalty_cuts_repeats(
    client: openai.OpenAI, repeating: Pieces, penalty: dict[str, float]
) -> None:
    penalized = greedy(client, APPLES, **penalty)
    assert penalized.count(APPLE) <= repeating.count(APPLE) // 2, penalized


def test_neutral_penalties_change_nothing(client: openai.OpenAI, repeating: Pieces) -> None:
    neutral = {
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "dry_multiplier": 0.0,
    }
    assert greedy(client, APPLES, **neutral) == repeating


DRY_EXEMPTIONS = {
    # "," breaks every repeated run into single tokens, shorter than dry_allowed_length.
    "sequence_breakers": {"dry_sequence_breakers": [","]},
    # Repeats up to 20 tokens long are allowed; the prompt's run is shorter.
    "allowed_length": {"dry_allowed_length": 20},
    # Three tokens back hold no earlier occurrence of a run to extend.
    "range": {"dry_range": 3},
}


@llamacpp_only
@pytest.mark.parametrize("exemption", DRY_EXEMPTIONS.values(), ids=DRY_EXEMPTIONS.keys())
def test_dry_settings_decide_what_counts_as_a_repeat(
    client: openai.OpenAI, repeating: Pieces, exemption: dict[str, object]
) -> None:
    penalized = greedy(client, APPLES, dry_multiplier=0.8)
    exempted = greedy(client, APPLES, dry_multiplier=0.8, **exemption)
    assert penalized.count(APPLE) <= repeating.count(APPLE) // 2, penalized
    assert exempted.count(APPLE) > repeating.count(APPLE) // 2, exempted


@llamacpp_only
def test_penalty_range_bounds_what_is_penalized(client: openai.OpenAI, repeating: Pieces) -> None:
    # Looking back one token, only the "," just written is penalized, never " apple".
    short = greedy(client, APPLES, repetition_penalty=1.5, penalty_range=1)
    assert short.count(APPLE) > repeating.count(APPLE) // 2, short


# -- logit bias and banned tokens ------------------------------------------------------------


def test_negative_logit_bias_removes_the_greedy_token(
    client: openai.OpenAI, repeating: Pieces, apple: int
) -> None:
    assert repeating[0] == APPLE
    biased = greedy(client, APPLES, logit_bias={str(apple): -100})
    assert biased[0] != APPLE and APPLE not in biased, biased


def test_positive_logit_bias_forces_a_token(
    client: openai.OpenAI, real_server: RunningServer, repeating: Pieces
) -> None:
    banana = token_id(real_server, " banana")
    assert " banana" not in repeating
    forced = sample(
        client, APPLES, n=4, max_tokens=6, temperature=1.0, seed=3, logit_bias={str(banana): 100}
    )
    assert forced == [[" banana"] * 6] * 4


def test_banned_tokens_never_appear(client: openai.OpenAI, apple: int) -> None:
    control = sample(client, APPLES, n=SEEDS, max_tokens=6, temperature=1.0, seed=11)
    banned = sample(
        client, APPLES, n=SEEDS, max_tokens=6, temperature=1.0, seed=11, banned_tokens=[apple]
    )
    assert any(APPLE in choice for choice in control), control
    assert not any(APPLE in choice for choice in banned), banned


# -- truncation and the pick -----------------------------------------------------------------


def first_tokens(choices: list[Pieces]) -> list[str]:
    """The first token of every choice."""
    return [choice[0] for choice in choices]


@llamacpp_only
def test_xtc_excludes_the_top_choice(client: openai.OpenAI) -> None:
    """XTC at probability 1 cuts every token above the threshold but the least likely one."""
    seeded = {"n": SEEDS, "max_tokens": 1, "temperature": 1.0, "seed": 0}
    control = sample(client, APPLES, **seeded)
    off = sample(client, APPLES, xtc_probability=0.0, xtc_threshold=0.02, **seeded)
    xtc = sample(client, APPLES, xtc_probability=1.0, xtc_threshold=0.02, **seeded)
    assert APPLE in first_tokens(control), control  # " apple" has p ~0.6 here
    assert off == control
    assert APPLE not in first_tokens(xtc), xtc


@llamacpp_only
def test_top_n_sigma_keeps_only_the_top_tokens(client: openai.OpenAI, repeating: Pieces) -> None:
    """At temperature 2 samples scatter; one sigma below the top logit only " apple" is left."""
    seeded = {"n": SEEDS, "max_tokens": 1, "temperature": 2.0, "seed": 0}
    control = first_tokens(sample(client, APPLES, **seeded))
    narrowed = first_tokens(sample(client, APPLES, top_n_sigma=1.0, **seeded))
    assert len(set(control)) > 1, control
    assert narrowed == [repeating[0]] * SEEDS


ONE_CANDIDATE = {
    "top_k": {"top_k": 1},
    "top_p": {"top_p": 0.001},
    "min_p": {"min_p": 1.0},
    # Mirostat keeps the tokens less surprising than mu (2 * tau to start): only the top one.
    "mirostat_v1": {"mirostat_mode": 1, "mirostat_tau": 0.01},
    "mirostat_v2": {"mirostat_mode": 2, "mirostat_tau": 0.01},
}


@pytest.mark.parametrize("truncation", engine_cases(ONE_CANDIDATE, {"mirostat_v1", "mirostat_v2"}))
def test_truncation_to_one_candidate_equals_greedy(
    client: openai.OpenAI, truncation: dict[str, object]
) -> None:
    reference = greedy(client, STORY, max_tokens=10)
    seeded = {"n": 4, "max_tokens": 10, "temperature": 1.0, "seed": 0}
    control = sample(client, STORY, **seeded)
    truncated = sample(client, STORY, **seeded, **truncation)
    assert control != [reference] * 4, control
    assert truncated == [reference] * 4, truncated


@llamacpp_only
def test_typical_p_collapses_every_seed_to_one_continuation(client: openai.OpenAI) -> None:
    """A tiny typical_p keeps one token per step (the one nearest the entropy): seeds agree."""
    seeded = {"n": 4, "max_tokens": 10, "temperature": 1.0, "seed": 0}
    control = sample(client, STORY, **seeded)
    neutral = sample(client, STORY, typical_p=1.0, **seeded)
    typical = sample(client, STORY, typical_p=0.001, **seeded)
    assert len({tuple(choice) for choice in control}) > 1, control
    assert neutral == control
    assert len({tuple(choice) for choice in typical}) == 1, typical


def test_temperature_zero_ignores_the_seed(client: openai.OpenAI) -> None:
    runs = [sample(client, STORY, n=3, max_tokens=10, seed=seed) for seed in (1, 2)]
    unseeded = greedy(client, STORY, max_tokens=10)
    assert runs[0] == runs[1] == [unseeded] * 3
    assert sample(client, STORY, n=3, max_tokens=10, temperature=1.0, seed=1) != runs[0]


def test_same_seed_same_sample_other_seed_other_sample(client: openai.OpenAI) -> None:
    first = sample(client, STORY, max_tokens=10, temperature=1.0, seed=21)
    again = sample(client, STORY, max_tokens=10, temperature=1.0, seed=21)
    others = [sample(client, STORY, max_tokens=10, temperature=1.0, seed=s)[0] for s in (22, 23)]
    assert first == again
    assert any(other != first[0] for other in others), others


# -- when to stop ----------------------------------------------------------------------------

SKY = [{"role": "user", "content": "Answer with one word: what color is the sky?"}]


def test_min_tokens_prevents_early_eos(client: openai.OpenAI) -> None:
    natural = client.chat.completions.create(
        model="default", messages=SKY, max_tokens=40, temperature=0.0
    )
    held = client.chat.completions.create(
        model="default", messages=SKY, max_tokens=40, temperature=0.0, extra_body={"min_tokens": 20}
    )
    assert natural.usage is not None and held.usage is not None
    assert natural.choices[0].finish_reason == "stop"
    assert natural.usage.completion_tokens < 20
    assert held.usage.completion_tokens >= 20


def test_stop_token_ids_end_generation(client: openai.OpenAI, real_server: RunningServer) -> None:
    control = client.completions.create(
        model="default", prompt=STORY, max_tokens=10, temperature=0.0, logprobs=0
    )
    pieces = list(control.choices[0].logprobs.tokens or [])  # type: ignore[union-attr]
    assert control.choices[0].finish_reason == "length"
    stop_at = 3  # the fourth generated token
    stopper = token_id(real_server, pieces[stop_at])
    assert pieces.index(pieces[stop_at]) == stop_at  # it does not occur earlier
    stopped = client.completions.create(
        model="default",
        prompt=STORY,
        max_tokens=10,
        temperature=0.0,
        extra_body={"stop_token_ids": [stopper]},
    )
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text in ("".join(pieces[:stop_at]), "".join(pieces[: stop_at + 1]))


# -- Kobold ----------------------------------------------------------------------------------


def kobold(server: RunningServer, prompt: str, **fields: object) -> str:
    """The text of one /api/v1/generate, 16 tokens at most."""
    body = {"prompt": prompt, "max_length": 16, **fields}
    response = httpx.post(server.url + "/api/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["results"][0]["text"])


@llamacpp_only
def test_kobold_rep_pen_and_its_range(real_server: RunningServer) -> None:
    control = kobold(real_server, APPLES, temperature=0.0)
    penalized = kobold(real_server, APPLES, temperature=0.0, rep_pen=1.5)
    one_back = kobold(real_server, APPLES, temperature=0.0, rep_pen=1.5, rep_pen_range=1)
    assert control.count("apple") >= 6, control
    assert penalized.count("apple") <= control.count("apple") // 2, penalized
    assert one_back == control


def test_kobold_top_k_one_equals_greedy(real_server: RunningServer) -> None:
    reference = kobold(real_server, STORY, temperature=0.0)
    for seed in (0, 1, 3):
        assert kobold(real_server, STORY, temperature=1.0, sampler_seed=seed, top_k=1) == reference
    sampled = [kobold(real_server, STORY, temperature=1.0, sampler_seed=s) for s in (0, 1, 3)]
    assert sampled != [reference] * 3, sampled


def test_kobold_sampler_seed_reproduces(real_server: RunningServer) -> None:
    first = kobold(real_server, STORY, temperature=1.0, sampler_seed=7)
    assert kobold(real_server, STORY, temperature=1.0, sampler_seed=7) == first
    others = {kobold(real_server, STORY, temperature=1.0, sampler_seed=s) for s in (8, 9)}
    assert others != {first}, others
    unseeded = {kobold(real_server, STORY, temperature=1.0, sampler_seed=-1) for _ in range(3)}
    assert len(unseeded) > 1, unseeded  # -1 is a fresh random seed each time


@llamacpp_only
def test_kobold_mirostat_and_typical(real_server: RunningServer) -> None:
    reference = kobold(real_server, STORY, temperature=0.0)
    mirostat = {"temperature": 1.0, "mirostat": 2, "mirostat_tau": 0.01}
    assert [kobold(real_server, STORY, sampler_seed=s, **mirostat) for s in (0, 1)] == [
        reference
    ] * 2
    typical = {
        kobold(real_server, STORY, temperature=1.0, sampler_seed=s, typical=0.001)
        for s in (0, 1, 3)
    }
    assert len(typical) == 1, typical


def test_kobold_banned_tokens_by_text(real_server: RunningServer) -> None:
    control = kobold(real_server, APPLES, temperature=0.0)
    banned = kobold(real_server, APPLES, temperature=0.0, banned_tokens=[APPLE])
    assert control.startswith(APPLE)
    assert APPLE not in banned, banned
