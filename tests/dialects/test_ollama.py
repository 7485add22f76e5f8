"""Ollama's native API: the real `ollama` client (and httpx) against llmserve.

Generation goes through the bundled model on the real engine (the dialect tests' session
server, key YOUR_API_KEY); auth switches, error shapes and body limits run on the fake engine.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
import yaml

from llmserve.api.ollama.protocol import keep_alive_is_zero
from llmserve.api.ollama.serving import tagged, untagged
from llmserve.api.overrides import OverrideValue, SamplingOverrides
from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.errors import EngineError
from llmserve.core.request import Delta, FinishReason, GenerationRequest, Usage
from llmserve.core.templates import load_template
from llmserve.models.manager import ModelManager
from tests.conftest import TEST_ENGINE, TEST_SETTINGS, llamacpp_only
from tests.dialects.conftest import API_KEY, AUTH
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve

FAKE_KEY = "ollama-key"
ADMIN_KEY = "ollama-admin"
SAY_HI = [{"role": "user", "content": "Say hi"}]
GREEDY = {"temperature": 0, "num_predict": 4}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def client(dialect_server: RunningServer) -> ollama.Client:
    """The official client with the server's key as a Bearer header."""
    return ollama.Client(host=dialect_server.url, headers=AUTH)


@pytest.fixture(scope="module")
def model_name(client: ollama.Client) -> str:
    """The served model's name as /api/tags lists it (`id:latest`)."""
    name = client.list().models[0].model
    assert name is not None
    return name


def final_of(chunks: list[Any]) -> Any:
    assert chunks and chunks[-1].done is True
    assert all(chunk.done is False for chunk in chunks[:-1])
    return chunks[-1]


def assert_timings(final: Any, eval_count: int | None = None) -> None:
    assert final.prompt_eval_count > 0
    if eval_count is not None:
        assert final.eval_count == eval_count
    for name in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, name), int) and getattr(final, name) > 0, name
    assert isinstance(final.load_duration, int) and final.load_duration >= 0
    assert final.total_duration >= final.eval_duration


# ---- probes, open without a key ----


def test_root_banner_head_and_version_are_open(dialect_server: RunningServer) -> None:
    r = httpx.get(dialect_server.url + "/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert r.headers["content-type"].startswith("text/plain")
    head = httpx.head(dialect_server.url + "/")
    assert head.status_code == 200 and head.content == b""
    version = httpx.get(dialect_server.url + "/api/version")
    assert version.status_code == 200 and set(version.json()) == {"version"}
    parts = tuple(int(p) for p in version.json()["version"].split("."))
    assert len(parts) == 3 and parts >= (0, 6, 4)  # VS Code Copilot refuses older


# ---- models ----


def test_list_show_and_ps(client: ollama.Client, model_name: str) -> None:
    listed = client.list().models
    assert model_name.endswith(":latest")
    entry = listed[0]
    assert entry.size and entry.size > 0 and entry.digest and len(entry.digest) == 64
    assert entry.details is not None and entry.details.format == "gguf"
    # vLLM serves the bundled GGUF dequantized to bfloat16 (an HF folder).
    quantization = "BF16" if TEST_ENGINE == "vllm" else "Q4_1"
    assert entry.details.family == "llama" and entry.details.quantization_level == quantization
    assert entry.details.parameter_size and entry.details.parameter_size.endswith("M")

    shown = client.show(model_name)
    assert shown.modelinfo is not None
    arch = shown.modelinfo["general.architecture"]
    assert shown.modelinfo[f"{arch}.context_length"] == TEST_SETTINGS["ctx_size"]
    assert shown.capabilities is not None
    assert {"completion", "tools"} <= set(shown.capabilities)
    assert shown.template and "im_start" in shown.template

    running = client.ps().models
    assert [m.model for m in running] == [model_name]
    assert running[0].context_length == TEST_SETTINGS["ctx_size"]
    assert running[0].size and running[0].size > 0 and running[0].expires_at is not None


def test_model_latest_and_bare_names_are_served(client: ollama.Client, model_name: str) -> None:
    bare = model_name.removesuffix(":latest")
    for name in (model_name, bare):
        r = client.chat(model=name, messages=SAY_HI, options={"num_predict": 1})
        assert r.model == name  # Ollama echoes the name the client used
        assert r.done and r.eval_count == 1


def test_pull_of_a_served_model_succeeds_and_others_fail(
    client: ollama.Client, model_name: str
) -> None:
    assert client.pull(model_name).status == "success"
    assert [p.status for p in client.pull(model_name, stream=True)] == ["success"]
    with pytest.raises(ollama.ResponseError) as raised:
        client.pull("llama3.2:3b")
    assert raised.value.status_code == 404
    assert "does not download" in raised.value.error and model_name in raised.value.error


# ---- chat and generate ----


def test_chat_stream_and_not_agree_under_greedy_decoding(
    client: ollama.Client, model_name: str
) -> None:
    whole = client.chat(model=model_name, messages=SAY_HI, options=GREEDY)
    assert whole.done is True and whole.done_reason == "length"
    assert whole.message.role == "assistant" and whole.message.content
    assert_timings(whole, eval_count=4)

    chunks = list(client.chat(model=model_name, messages=SAY_HI, options=GREEDY, stream=True))
    final = final_of(chunks)
    assert final.done_reason == "length" and final.message.content == ""
    assert_timings(final, eval_count=4)
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert all(c.model == model_name and c.created_at for c in chunks)


def test_chat_streams_ndjson_by_default(dialect_server: RunningServer, model_name: str) -> None:
    body = {"model": model_name, "messages": SAY_HI, "options": GREEDY}
    # As Ollama's own curl examples: no Content-Type of JSON, no `stream` field.
    r = httpx.post(dialect_server.url + "/api/chat", content=json.dumps(body), headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) >= 2 and lines[-1]["done"] is True and lines[-1]["eval_count"] == 4
    assert all(set(line) == {"model", "created_at", "message", "done"} for line in lines[:-1])


def test_generate_stream_and_not(client: ollama.Client, model_name: str) -> None:
    whole = client.generate(model=model_name, prompt="Why is the sky blue?", options=GREEDY)
    assert whole.done is True and whole.done_reason == "length" and whole.response
    assert_timings(whole, eval_count=4)
    assert whole.context and len(whole.context) == whole.prompt_eval_count + 4

    chunks = list(
        client.generate(
            model=model_name, prompt="Why is the sky blue?", options=GREEDY, stream=True
        )
    )
    final = final_of(chunks)
    assert final.done_reason == "length" and final.response == ""
    assert "".join(c.response for c in chunks) == whole.response

    raw = client.generate(
        model=model_name, prompt="The sky is", raw=True, options={"num_predict": 2}
    )
    assert raw.prompt_eval_count is not None and raw.prompt_eval_count < 8  # no template


def test_generate_with_an_empty_prompt_loads(client: ollama.Client, model_name: str) -> None:
    loaded = client.generate(model=model_name)
    assert loaded.done is True and loaded.done_reason == "load" and loaded.response == ""
    # keep_alive 0 without the admin key is accepted; the model stays loaded.
    kept = client.generate(model=model_name, keep_alive=0)
    assert kept.done_reason == "load"
    assert [m.model for m in client.ps().models] == [model_name]


def test_num_predict_limits_and_minus_one_is_unlimited(
    client: ollama.Client, model_name: str
) -> None:
    two = client.generate(model=model_name, prompt="Count: 1, 2,", options={"num_predict": 2})
    assert two.eval_count == 2 and two.done_reason == "length"
    # -1 (Ollama's default) and a huge num_ctx (clamped to the server's) are not refused.
    free = client.chat(
        model=model_name,
        messages=[{"role": "user", "content": "Say OK."}],
        options={"num_predict": -1, "num_ctx": 10**6, "temperature": 0, "stop": [" ", "\n", "."]},
    )
    assert free.done is True and free.done_reason in ("stop", "length")
    # A num_ctx below the server's bounds prompt plus answer.
    small = {"num_ctx": 8, "num_predict": 100}
    bounded = client.generate(model=model_name, prompt="Hello", raw=True, options=small)
    assert bounded.prompt_eval_count is not None and bounded.eval_count is not None
    assert bounded.prompt_eval_count + bounded.eval_count <= 8
    # num_predict past the context is cut to what fits, not refused.
    much = {"num_predict": 10**6, "stop": [" ", "\n", "."], "temperature": 0}
    fitted = client.generate(model=model_name, prompt="Say OK.", options=much)
    assert fitted.done is True


def test_seed_with_temperature_is_deterministic(client: ollama.Client, model_name: str) -> None:
    options = {"temperature": 1.0, "seed": 1234, "num_predict": 6, "top_k": 0, "top_p": 1.0}
    texts = {
        client.generate(model=model_name, prompt="Once upon a time", options=options).response
        for _ in range(2)
    }
    assert len(texts) == 1 and texts != {""}


def test_unknown_options_are_ignored(client: ollama.Client, model_name: str) -> None:
    options = {
        "num_predict": 1,
        "num_gpu": 99,
        "use_mmap": True,
        "tfs_z": 1.0,
        "penalize_newline": 1,
    }
    r = client.generate(model=model_name, prompt="Hi", options=options)
    assert r.done and r.eval_count == 1


def test_format_json_and_schema_give_valid_json(client: ollama.Client, model_name: str) -> None:
    prompt = [{"role": "user", "content": 'Reply with the JSON object {"ok": true}.'}]
    r = client.chat(
        model=model_name,
        messages=prompt,
        format="json",
        options={"temperature": 0, "num_predict": 40},
    )
    assert r.done_reason == "stop", r.message.content
    assert isinstance(json.loads(r.message.content or ""), dict)
    schema = {
        "type": "object",
        "properties": {"age": {"type": "integer"}},
        "required": ["age"],
        "additionalProperties": False,
    }
    ask = [{"role": "user", "content": "How old is a cat that was born 3 years ago? JSON."}]
    typed = client.chat(
        model=model_name, messages=ask, format=schema, options={"temperature": 0, "num_predict": 20}
    )
    value = json.loads(typed.message.content or "")
    assert set(value) == {"age"} and isinstance(value["age"], int)


# Asserts what SmolLM2 Q4_1 chooses greedily (to call the tool); the bf16 weights vLLM serves
# answer in text. The tool path itself runs on both engines (tests/structured/test_tools_real.py).
@llamacpp_only
def test_tool_call_round_trip(client: ollama.Client, model_name: str) -> None:
    # One earlier exchange shows the tiny model the pattern; arguments travel as objects.
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What is the weather in Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 25 C"},
        {"role": "assistant", "content": "It is sunny in Rome, 25 C."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    options = {"temperature": 0, "num_predict": 30}
    r = client.chat(model=model_name, messages=messages, tools=[WEATHER_TOOL], options=options)
    assert r.done_reason == "stop" and r.message.content == ""
    calls = r.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments, dict)
    assert calls[0].function.arguments == {"city": "Paris"}

    messages.append(r.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_name": "get_weather", "content": "rainy, 12 C"})
    answer = client.chat(model=model_name, messages=messages, tools=[WEATHER_TOOL], options=options)
    assert answer.done and not answer.message.tool_calls and answer.message.content

    streamed = list(
        client.chat(
            model=model_name,
            messages=messages[:5],
            tools=[WEATHER_TOOL],
            options=options,
            stream=True,
        )
    )
    final_of(streamed)
    streamed_calls = [call for c in streamed for call in c.message.tool_calls or []]
    assert [c.function.arguments for c in streamed_calls] == [{"city": "Paris"}]


def test_think_is_accepted(client: ollama.Client, model_name: str) -> None:
    r = client.chat(model=model_name, messages=SAY_HI, think=False, options={"num_predict": 1})
    assert r.done and r.eval_count == 1


def test_presets_apply_to_ollama_options(
    dialect_server: RunningServer, client: ollama.Client, model_name: str
) -> None:
    overrides: SamplingOverrides = dialect_server.app.state.overrides
    overrides.set(None, {"max_tokens": OverrideValue(override=2, force=True)})
    try:
        r = client.generate(model=model_name, prompt="Hello", options={"num_predict": 9})
    finally:
        overrides.clear()
    assert r.eval_count == 2 and r.done_reason == "length"


def test_a_stream_left_early_frees_its_engine_slot(
    dialect_server: RunningServer, model_name: str
) -> None:
    body = {"model": model_name, "prompt": "Tell a long story.", "options": {"num_predict": 1500}}
    with httpx.stream("POST", dialect_server.url + "/api/generate", json=body, headers=AUTH) as r:
        first = json.loads(next(r.iter_lines()))
        assert first["done"] is False
    engine = dialect_server.app.state.models.loaded()[0].engine
    deadline = time.monotonic() + 30
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats().running == 0


# ---- errors on the real server ----


def test_bad_input_is_an_ollama_shaped_400(
    dialect_server: RunningServer, client: ollama.Client, model_name: str
) -> None:
    def error(path: str, body: dict[str, Any]) -> str:
        r = httpx.post(dialect_server.url + path, json=body, headers=AUTH)
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"error"}
        return str(r.json()["error"])

    chat = {"model": model_name, "stream": False}
    assert "images" in error("/api/chat", {**chat, "messages": [{**SAY_HI[0], "images": ["aGk="]}]})
    assert "images" in error("/api/generate", {**chat, "prompt": "x", "images": ["aGk="]})
    assert "template" in error(
        "/api/generate", {**chat, "prompt": "x", "template": "{{ .Prompt }}"}
    )
    assert "suffix" in error("/api/generate", {**chat, "prompt": "x", "suffix": "y"})
    bad = error("/api/chat", {**chat, "messages": SAY_HI, "options": {"temperature": -1}})
    assert "options.temperature" in bad
    assert "format" in error("/api/chat", {**chat, "messages": SAY_HI, "format": "yaml"})
    assert "messages" in error("/api/chat", {**chat, "messages": [{"role": "robot"}]})
    for method, path in (("POST", "/api/create"), ("POST", "/api/copy"), ("DELETE", "/api/delete")):
        r = httpx.request(method, dialect_server.url + path, json={"model": "x"}, headers=AUTH)
        assert r.status_code == 400 and "llmserve does not" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as raised:
        client.push(model_name)
    assert raised.value.status_code == 400


def test_keys_are_required_by_default(dialect_server: RunningServer) -> None:
    for method, path in (("GET", "/api/tags"), ("POST", "/api/chat"), ("GET", "/api/ps")):
        r = httpx.request(method, dialect_server.url + path, json={"messages": SAY_HI})
        assert r.status_code == 401 and set(r.json()) == {"error"}
    with pytest.raises(ollama.ResponseError) as raised:
        ollama.Client(host=dialect_server.url).list()
    assert raised.value.status_code == 401
    wrong = ollama.Client(host=dialect_server.url, headers={"Authorization": "Bearer nope"})
    with pytest.raises(ollama.ResponseError):
        wrong.list()
    ok = httpx.get(dialect_server.url + "/api/tags", headers={"x-api-key": API_KEY})
    assert ok.status_code == 200


# ---- the HTTP layer on the fake engine ----


class FailingEngine(FakeEngine):
    """One delta, then a failure: an error after the stream started."""

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        yield Delta(0, "alpha ", (1,))
        raise EngineError("the engine broke")


def fake_server(tmp: Path, engine: FakeEngine, **settings: Any) -> Iterator[RunningServer]:
    config = Settings(api_tokens_file=tmp / "api_tokens.yml", api_key=[FAKE_KEY], **settings)
    manager = ModelManager(config)
    manager.register(engine, ["fake-model", "fake-alias"], load_template(None, "gguf"))
    with serve(create_app(config, manager)) as server:
        yield server


@pytest.fixture(scope="module")
def ollama_open(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`ollama_auth: false`, strict names and a small body limit."""
    yield from fake_server(
        tmp_path_factory.mktemp("ollama-open"),
        FakeEngine(),
        ollama_auth=False,
        strict_model_names=True,
        max_body_bytes=2048,
    )


class AbortedEngine(FakeEngine):
    """One delta, then the end a shutdown or an admin abort gives every running stream."""

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        yield Delta(0, "alpha ", (1,))
        yield Delta(0, "", (), finish_reason=FinishReason.ABORT, usage=Usage(2, 1))


@pytest.fixture(scope="module")
def aborted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """An open server whose generations are all aborted after one word."""
    yield from fake_server(tmp_path_factory.mktemp("aborted"), AbortedEngine(), disable_auth=True)


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """An open server whose engine fails mid-stream."""
    yield from fake_server(tmp_path_factory.mktemp("failing"), FailingEngine(), disable_auth=True)


def test_ollama_auth_false_opens_ollama_alone(ollama_open: RunningServer) -> None:
    client = ollama.Client(host=ollama_open.url)  # no key, as Copilot and Home Assistant
    assert [m.model for m in client.list().models] == ["fake-model:latest", "fake-alias:latest"]
    r = client.chat(model="fake-model", messages=SAY_HI, options={"num_predict": 2})
    assert r.message.content == "alpha beta " and r.eval_count == 2
    openai = httpx.post(ollama_open.url + "/v1/chat/completions", json={"messages": SAY_HI})
    assert openai.status_code == 401 and openai.json()["error"]["type"] == "authentication_error"
    kobold = httpx.post(ollama_open.url + "/api/v1/generate", json={"prompt": "x"})
    assert kobold.status_code == 401 and kobold.json()["detail"]["type"] == "unauthorized"


def test_open_ollama_routes_get_the_browser_guard(ollama_open: RunningServer) -> None:
    rebound = httpx.get(ollama_open.url + "/api/tags", headers={"Host": "attacker.example"})
    assert rebound.status_code == 403 and set(rebound.json()) == {"error"}
    foreign = httpx.post(
        ollama_open.url + "/api/chat",
        json={"model": "fake-model", "messages": SAY_HI},
        headers={"Origin": "https://evil.example"},
    )
    assert foreign.status_code == 403
    assert httpx.get(ollama_open.url + "/", headers={"Host": "attacker.example"}).status_code == 403
    local = httpx.get(ollama_open.url + "/api/tags", headers={"Origin": "http://localhost:3000"})
    assert local.status_code == 200
    assert local.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_names_with_tags_follow_strict_model_names(ollama_open: RunningServer) -> None:
    client = ollama.Client(host=ollama_open.url)
    for name in ("fake-model:latest", "fake-alias", "fake-alias:latest"):
        assert client.generate(model=name, prompt="x", options={"num_predict": 1}).model == name
    with pytest.raises(ollama.ResponseError) as raised:
        client.generate(model="fake-model:7b", prompt="x")
    assert raised.value.status_code == 404 and "fake-model:7b" in raised.value.error
    r = httpx.post(ollama_open.url + "/api/show", json={"model": "nope"})
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_404_413_and_kobold_rows_stay_apart(ollama_open: RunningServer) -> None:
    big = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 4000}]}
    r = httpx.post(ollama_open.url + "/api/chat", json=big)
    assert r.status_code == 413 and set(r.json()) == {"error"}
    r = httpx.post(ollama_open.url + "/api/embed/nothing-here", json={})
    assert r.status_code == 404 and set(r.json()) == {"error"}
    kobold = httpx.get(ollama_open.url + "/api/v1/nope")
    assert kobold.status_code in (401, 404) and "detail" in kobold.json()
    assert httpx.post(ollama_open.url + "/api/extra/generate/stream", json={}).json()["detail"]


def test_metrics_and_access_logs_name_the_dialect(ollama_open: RunningServer) -> None:
    httpx.get(ollama_open.url + "/api/tags")
    text = httpx.get(ollama_open.url + "/metrics", headers={"x-api-key": FAKE_KEY}).text
    assert 'dialect="ollama"' in text


def test_an_error_mid_stream_is_a_last_error_line(failing: RunningServer) -> None:
    body = {"model": "fake-model", "messages": SAY_HI}
    r = httpx.post(failing.url + "/api/chat", json=body)
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert r.status_code == 200 and lines[0]["message"]["content"] == "alpha "
    assert lines[-1] == {"error": "the engine broke"}
    with pytest.raises(ollama.ResponseError, match="the engine broke"):
        list(ollama.Client(host=failing.url).chat(model="fake-model", messages=SAY_HI, stream=True))


def test_an_aborted_generation_ends_with_an_error(aborted: RunningServer) -> None:
    body = {"model": "fake-model", "prompt": "x"}
    lines = [
        json.loads(line)
        for line in httpx.post(aborted.url + "/api/generate", json=body).text.splitlines()
    ]
    assert lines[0]["response"] == "alpha " and "aborted" in lines[-1]["error"]
    whole = httpx.post(aborted.url + "/api/generate", json={**body, "stream": False})
    assert whole.status_code == 503 and "aborted" in whole.json()["error"]


# ---- keep_alive: 0 unloads with the admin key, on the real model ----


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The bundled model with known API and admin keys."""
    tokens = tmp_path_factory.mktemp("ollama-admin") / "api_tokens.yml"
    tokens.write_text(yaml.safe_dump({"api_key": FAKE_KEY, "admin_key": ADMIN_KEY}))
    tokens.chmod(0o600)
    with serve(create_app(Settings(api_tokens_file=tokens, **TEST_SETTINGS))) as server:
        yield server


def test_keep_alive_zero_unloads_with_the_admin_key(admin_server: RunningServer) -> None:
    admin = ollama.Client(host=admin_server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    user = ollama.Client(host=admin_server.url, headers={"Authorization": f"Bearer {FAKE_KEY}"})
    name = user.list().models[0].model
    assert name is not None
    assert user.generate(model=name, keep_alive=0).done_reason == "load"
    assert len(user.ps().models) == 1
    unloaded = admin.generate(model=name, keep_alive="0s")
    assert unloaded.done is True and unloaded.done_reason == "unload"
    assert user.ps().models == []
    assert [m.model for m in user.list().models] == [name]  # still there to load
    again = user.chat(model=name, messages=SAY_HI, options={"num_predict": 1})
    assert again.done and again.eval_count == 1
    assert [m.model for m in user.ps().models] == [name]


# ---- units ----


def test_keep_alive_zero_spellings() -> None:
    for value in (0, 0.0, "0", "0s", "0m", "0.0h", " 0ms "):
        assert keep_alive_is_zero(value), value
    for value in (None, 1, -1, "5m", "-1", "24h", "0x"):
        assert not keep_alive_is_zero(value), value


def test_name_tags() -> None:
    assert tagged("smollm2") == "smollm2:latest" and tagged("x:7b") == "x:7b"
    assert tagged("hf.co/org/model") == "hf.co/org/model:latest"
    assert untagged("smollm2:latest") == "smollm2" and untagged("x:7b") == "x:7b"
    assert untagged(":latest") == ":latest"
