"""The KoboldAI API on the real default model, over HTTP as SillyTavern and KoboldAI Lite use it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from llmserve.api.kobold.serving import KoboldServing
from tests.conftest import llamacpp_only
from tests.dialects.conftest import AUTH
from tests.server import RunningServer

COUNTING = "1, 2, 3, 4,"  # greedy: " 5, 6, 7, 8, 9, ..."
STORY = "Once upon a time"
HI_CHAT = (  # greedy: a short greeting, then EOS well before 32 tokens
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
)

# What SillyTavern's Kobold backend posts (its UI-only fields included), plus KoboldCpp's extras.
SILLYTAVERN: dict[str, Any] = {
    "prompt": "Alice is a friendly baker.\nUser: Hi Alice, what are you baking today?\nAlice:",
    "gui_settings": False,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5],
    "max_context_length": 1024,
    "max_length": 24,
    "rep_pen": 1.1,
    "rep_pen_range": 320,
    "rep_pen_slope": 1,
    "temperature": 0.7,
    "tfs": 1,
    "top_a": 0,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.05,
    "typical": 1,
    **{f"s{i + 1}": s for i, s in enumerate([6, 0, 1, 3, 4, 2, 5])},
    "use_story": False,
    "use_memory": False,
    "use_authors_note": False,
    "use_world_info": False,
    "singleline": False,
    "stop_sequence": ["\nUser:", "\nAlice:"],
    "trim_stop": True,
    "streaming": False,
    "can_abort": True,
    "mirostat": 0,
    "mirostat_tau": 5,
    "mirostat_eta": 0.1,
    "use_default_badwordsids": False,
    "bypass_eos": False,
    "banned_tokens": [],
    "logit_bias": {},
    "grammar": "",
    "sampler_seed": 1234,
    "dynatemp_range": 0,
    "dynatemp_exponent": 1,
    "smoothing_factor": 0,
    "api_server": "http://127.0.0.1:5001/api",
    "quiet": True,
}


def post(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def generate(server: RunningServer, **fields: Any) -> dict[str, Any]:
    r = post(server, "/api/v1/generate", fields)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 1
    return dict(results[0])


def greedy(server: RunningServer, prompt: str, max_length: int = 16, **fields: Any) -> str:
    return str(
        generate(server, prompt=prompt, max_length=max_length, temperature=0, **fields)["text"]
    )


def token_ids(server: RunningServer, text: str, special: bool = True) -> list[int]:
    data = post(server, "/api/extra/tokencount", {"prompt": text, "special": special}).json()
    assert data["value"] == len(data["ids"])
    return list(data["ids"])


def stream_events(server: RunningServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The `data` of every event, after checking each is `event: message`."""
    with httpx.stream(
        "POST", server.url + "/api/extra/generate/stream", json=body, timeout=120
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for block in raw.strip().split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue  # a keep-alive comment
        assert lines[0] == "event: message", block
        assert lines[1].startswith("data: ")
        events.append(json.loads(lines[1][len("data: ") :]))
    return events


def bad_input(r: httpx.Response, field: str) -> None:
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail["type"] == "bad_input"
    assert field in detail["msg"]


# ---- SillyTavern ----


def test_sillytavern_payload(dialect_server: RunningServer) -> None:
    body = {**SILLYTAVERN, "genkey": "KCPP1001"}
    result = generate(dialect_server, **body)
    assert isinstance(result["text"], str) and result["text"]
    assert result["finish_reason"] in ("stop", "length")
    assert 0 < result["completion_tokens"] <= 24
    assert "\nUser:" not in result["text"] and "\nAlice:" not in result["text"]
    # The same seed again: the same text (seeded sampling is reproducible).
    assert generate(dialect_server, **body)["text"] == result["text"]
    check = post(dialect_server, "/api/extra/generate/check", {"genkey": "KCPP1001"})
    assert check.json() == {"results": [{"text": ""}]}  # finished: its genkey is gone


def test_sillytavern_payload_streaming(dialect_server: RunningServer) -> None:
    expected = generate(dialect_server, **SILLYTAVERN)
    events = stream_events(dialect_server, {**SILLYTAVERN, "streaming": True, "genkey": "KCPP1002"})
    assert all(e["finish_reason"] is None for e in events[:-1])
    assert events[-1] == {"token": "", "finish_reason": expected["finish_reason"]}
    assert "".join(e["token"] for e in events) == expected["text"]


# ---- each field's effect ----


def test_max_length_and_bypass_eos(dialect_server: RunningServer) -> None:
    plain = generate(dialect_server, prompt=HI_CHAT, max_length=32, temperature=0)
    assert plain["finish_reason"] == "stop" and plain["completion_tokens"] < 32
    for flag in ("bypass_eos", "use_default_badwordsids"):
        forced = generate(
            dialect_server, prompt=HI_CHAT, max_length=32, temperature=0, **{flag: True}
        )
        assert forced["finish_reason"] == "length", flag
        assert forced["completion_tokens"] == 32, flag
        assert forced["text"].startswith(plain["text"]), flag


def test_stop_sequence_with_and_without_trim_stop(dialect_server: RunningServer) -> None:
    free = greedy(dialect_server, COUNTING)
    assert " 8" in free
    trimmed = generate(
        dialect_server, prompt=COUNTING, max_length=16, temperature=0, stop_sequence=[" 8"]
    )
    assert trimmed["text"] == free[: free.index(" 8")]
    assert trimmed["finish_reason"] == "stop"
    kept = greedy(dialect_server, COUNTING, stop_sequence=[" 8"], trim_stop=False)
    assert kept == free[: free.index(" 8")] + " 8"


def test_singleline(dialect_server: RunningServer) -> None:
    prompt = "Name: Alice\nAge: 30\nName: Bob\nAge:"
    free = greedy(dialect_server, prompt)
    assert "\n" in free
    assert greedy(dialect_server, prompt, singleline=True) == free.split("\n")[0]


def test_max_context_length_keeps_the_end_of_the_prompt(dialect_server: RunningServer) -> None:
    prompt = "The numbers go on and on. " * 20 + COUNTING
    ids = token_ids(dialect_server, prompt)
    keep, max_length = 12, 8
    expected = httpx.post(
        dialect_server.url + "/v1/completions",
        json={"prompt": ids[-keep:], "max_tokens": max_length, "temperature": 0},
        headers=AUTH,
        timeout=120,
    ).json()["choices"][0]["text"]
    result = generate(
        dialect_server,
        prompt=prompt,
        max_context_length=keep + max_length,
        max_length=max_length,
        temperature=0,
    )
    assert result["prompt_tokens"] == keep
    assert result["text"] == expected
    too_small = post(
        dialect_server,
        "/api/v1/generate",
        {"prompt": prompt, "max_context_length": 8, "max_length": 8},
    )
    bad_input(too_small, "max_length")


def test_memory_is_prepended(dialect_server: RunningServer) -> None:
    joined = greedy(dialect_server, COUNTING)
    assert greedy(dialect_server, " 3, 4,", memory="1, 2,") == joined


def hot(server: RunningServer, seed: int, **fields: Any) -> str:
    """16 tokens of STORY sampled at temperature 1.5 with `sampler_seed`."""
    body = {"prompt": STORY, "max_length": 16, "temperature": 1.5, "sampler_seed": seed}
    return str(generate(server, **{**body, **fields})["text"])


def test_sampler_seed(dialect_server: RunningServer) -> None:
    # Hot sampling depends on the seed, and only on it; -1 means a fresh random seed each time.
    assert hot(dialect_server, 1) == hot(dialect_server, 1) != hot(dialect_server, 2)
    assert len({hot(dialect_server, -1) for _ in range(3)}) > 1
    # Temperature 0 is greedy: the seed no longer matters.
    assert hot(dialect_server, 1, temperature=0) == hot(dialect_server, 2, temperature=0)


@pytest.mark.parametrize(
    ("fields", "is_greedy"),
    [
        ({"top_k": 1}, True),
        ({"top_p": 0.01}, True),
        ({"min_p": 1.0}, True),
        pytest.param(
            {"mirostat": 2, "mirostat_tau": 0.01, "mirostat_eta": 0.1},
            True,
            marks=llamacpp_only,
            id="mirostat",
        ),
    ],
    ids=["top_k", "top_p", "min_p", "mirostat"],
)
def test_truncation_samplers_make_sampling_seed_independent(
    dialect_server: RunningServer, fields: dict[str, Any], is_greedy: bool
) -> None:
    # Keeping a single candidate per step makes the seed irrelevant (see test_sampler_seed).
    first = hot(dialect_server, 1, **fields)
    assert first == hot(dialect_server, 2, **fields)
    if is_greedy:
        assert first == greedy(dialect_server, STORY)


@llamacpp_only
def test_typical_narrows_hot_sampling(dialect_server: RunningServer) -> None:
    # Locally typical sampling keeps the tokens nearest the entropy until their mass reaches p:
    # at temperature 1.5 that can be several tokens (how many depends on the CPU's kernels),
    # so the seed may still matter; what must hold is that it changes what is sampled.
    narrowed = hot(dialect_server, 1, typical=0.01)
    assert narrowed == hot(dialect_server, 1, typical=0.01)
    assert narrowed != hot(dialect_server, 1)


@llamacpp_only
def test_mirostat_tau_matters(dialect_server: RunningServer) -> None:
    low, high = ({"mirostat": 2, "mirostat_tau": tau} for tau in (0.01, 10.0))
    assert hot(dialect_server, 7, **low) == greedy(dialect_server, STORY)
    assert hot(dialect_server, 7, **high) != greedy(dialect_server, STORY)


def test_rep_pen_and_rep_pen_range(dialect_server: RunningServer) -> None:
    plain = greedy(dialect_server, STORY, max_length=24)
    penalized = greedy(dialect_server, STORY, max_length=24, rep_pen=1.5, rep_pen_range=64)
    assert penalized != plain
    # 0 means the whole context, the same as a range as long as the context.
    whole = greedy(dialect_server, STORY, max_length=24, rep_pen=1.5, rep_pen_range=0)
    assert whole == greedy(dialect_server, STORY, max_length=24, rep_pen=1.5, rep_pen_range=2048)
    assert whole != plain


def test_banned_tokens_as_strings_or_ids(dialect_server: RunningServer) -> None:
    assert greedy(dialect_server, COUNTING).startswith(" 5")
    [five] = token_ids(dialect_server, "5", special=False)
    by_string = greedy(dialect_server, COUNTING, banned_tokens=["5"])
    assert by_string == greedy(dialect_server, COUNTING, banned_tokens=[five])
    assert "5" not in by_string


def test_logit_bias(dialect_server: RunningServer) -> None:
    [nine] = token_ids(dialect_server, "9", special=False)
    text = greedy(dialect_server, COUNTING, max_length=4, logit_bias={str(nine): 100})
    assert set(text) == {"9"}


def test_grammar_is_enforced(dialect_server: RunningServer) -> None:
    text = greedy(dialect_server, HI_CHAT, max_length=8, grammar='root ::= "yes" | "no"')
    assert text in ("yes", "no")
    bad_input(
        post(dialect_server, "/api/v1/generate", {"prompt": "x", "grammar": "root ::= ("}),
        "grammar",
    )


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"top_a": 1.5}, "top_a"),
        ({"tfs": -0.1}, "tfs"),
        ({"rep_pen": 1.2, "rep_pen_slope": -0.7}, "rep_pen_slope"),
        ({"dynatemp_range": -0.5}, "dynatemp_range"),
    ],
)
def test_kobold_samplers_out_of_range_get_400(
    dialect_server: RunningServer, fields: dict[str, Any], name: str
) -> None:
    bad_input(post(dialect_server, "/api/v1/generate", {"prompt": "x", **fields}), name)


# ---- genkey: check and abort with several generations in flight ----


def test_abort_by_genkey_stops_only_that_generation(dialect_server: RunningServer) -> None:
    async def main() -> tuple[str, dict[str, Any], httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=dialect_server.url, timeout=120) as client:
            base = {"prompt": STORY, "temperature": 0, "bypass_eos": True}
            long = asyncio.create_task(
                client.post("/api/v1/generate", json={**base, "max_length": 512, "genkey": "A"})
            )
            short = asyncio.create_task(
                client.post("/api/v1/generate", json={**base, "max_length": 16, "genkey": "B"})
            )
            partial = await _wait_for_text(client, "A", long)
            duplicate = await client.post("/api/v1/generate", json={**base, "genkey": "A"})
            abort = await client.post("/api/extra/abort", json={"genkey": "A"})
            return partial, abort.json(), duplicate, await long, await short

    partial, abort, duplicate, long, short = asyncio.run(main())
    assert abort == {"success": "true", "done": "true"}
    bad_input(duplicate, "genkey")
    aborted = long.json()["results"][0]
    assert aborted["text"].startswith(partial)
    assert aborted["finish_reason"] == "stop"
    assert aborted["completion_tokens"] < 512
    finished = short.json()["results"][0]
    assert finished["finish_reason"] == "length" and finished["completion_tokens"] == 16
    serving: KoboldServing = dialect_server.app.state.kobold
    assert serving.generations == {}
    assert post(dialect_server, "/api/extra/abort", {"genkey": "A"}).json()["success"] == "false"


async def _wait_for_text(client: httpx.AsyncClient, genkey: str, task: asyncio.Task[Any]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert not task.done(), "the generation ended before it could be aborted"
        r = await client.post("/api/extra/generate/check", json={"genkey": genkey})
        text = str(r.json()["results"][0]["text"])
        if text:
            return text
        await asyncio.sleep(0.02)
    raise TimeoutError("no text appeared")


# ---- the information routes ----


def test_model_version_and_config_routes(dialect_server: RunningServer) -> None:
    def get(path: str) -> Any:
        r = httpx.get(dialect_server.url + path)
        assert r.status_code == 200, path
        return r.json()

    for prefix in ("/api/v1", "/api/latest"):
        assert get(f"{prefix}/model") == {"result": "SmolLM2-135M-Instruct.Q4_1"}
        assert get(f"{prefix}/info/version") == {"result": "1.2.5"}
        assert get(f"{prefix}/config/max_context_length") == {"value": 2048}
        assert get(f"{prefix}/config/max_length") == {"value": 180}
    assert get("/api/extra/true_max_context_length") == {"value": 2048}
    version = get("/api/extra/version")
    assert version["result"] == "KoboldCpp" and version["protected"] is False
    assert tuple(int(p) for p in version["version"].split(".")) >= (1, 48)


def test_latest_generate_tokencount_and_perf(dialect_server: RunningServer) -> None:
    r = post(
        dialect_server,
        "/api/latest/generate",
        {"prompt": COUNTING, "max_length": 3, "temperature": 0},
    )
    assert r.json()["results"][0]["completion_tokens"] == 3
    perf = httpx.get(dialect_server.url + "/api/extra/perf").json()
    assert perf["last_token_count"] == 3 and perf["stop_reason"] == 0
    assert perf["total_gens"] >= 1 and perf["queue"] == 0 and perf["idle"] == 1
    assert perf["last_process"] >= 0 and perf["last_eval"] >= 0
    assert token_ids(dialect_server, "Hello world") == token_ids(
        dialect_server, "Hello world", special=False
    )


class CountingTokenizer:
    """Just enough of an engine for _banned_ids: counts tokenizer calls."""

    def __init__(self) -> None:
        self.calls = 0

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        self.calls += 1
        return [1, 2]


def test_banned_strings_past_the_bound_stop_tokenizing_early() -> None:
    from llmserve.api.kobold.serving import _banned_ids
    from llmserve.core.errors import InvalidRequestError
    from llmserve.core.limits import MAX_BANNED_TOKENS

    engine = CountingTokenizer()
    with pytest.raises(InvalidRequestError) as refused:
        _banned_ids(engine, ["word"] * 100_000)  # type: ignore[arg-type]
    assert refused.value.param == "banned_tokens"
    assert engine.calls == MAX_BANNED_TOKENS // 2 + 1  # two ids per string: stopped at the bound
    assert _banned_ids(engine, ["word"] * (MAX_BANNED_TOKENS // 2)) == [1, 2] * (  # type: ignore[arg-type]
        MAX_BANNED_TOKENS // 2
    )


def test_too_many_banned_strings_are_a_400_in_koboldcpp_shape(
    dialect_server: RunningServer,
) -> None:
    body = {"prompt": "Hi", "max_length": 2, "banned_tokens": ["word"] * 5000}
    r = httpx.post(dialect_server.url + "/api/v1/generate", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["detail"]["type"] == "bad_input"
    assert "banned_tokens" in r.json()["detail"]["msg"]
