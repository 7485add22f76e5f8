"""Structured output on the real default model: JSON schema, JSON object, regex, choice, GBNF."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from llmserve.models.manager import ModelManager
from tests.conftest import engine_cases, llamacpp_only
from tests.server import RunningServer

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 2},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "pets", "home"],
}
DESCRIBE = [{"role": "user", "content": "Describe a made-up person as JSON."}]
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


def post(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json=body, timeout=300)


def sse_text(server: RunningServer, path: str, body: dict[str, Any]) -> str:
    """The text of a streamed response, from raw SSE lines."""
    parts = []
    with httpx.stream(
        "POST", f"{server.url}/v1/{path}", json=body | {"stream": True}, timeout=300
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def test_twenty_seeded_json_schema_requests_validate(client: openai.OpenAI) -> None:
    def one(seed: int) -> tuple[str | None, str | None]:
        r = client.chat.completions.create(
            model="m",
            messages=DESCRIBE,  # type: ignore[arg-type]
            response_format=SCHEMA_FORMAT,  # type: ignore[arg-type]
            max_tokens=96,
            temperature=0.9,
            seed=seed,
        )
        return r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(20)))
    for content, finish_reason in results:
        assert finish_reason == "stop", content
        assert content is not None
        jsonschema.validate(json.loads(content), PERSON)
    assert len({content for content, _ in results}) > 1  # the seeds did vary the output


def test_json_schema_streamed(real_server: RunningServer) -> None:
    body = {"messages": DESCRIBE, "response_format": SCHEMA_FORMAT, "max_tokens": 96, "seed": 3}
    jsonschema.validate(json.loads(sse_text(real_server, "chat/completions", body)), PERSON)


# SmolLM2 Q4_1's greedy object closes within 48 tokens; dequantized to bf16 on vLLM it writes
# digits until max_tokens. json_object itself is served on both (test_vllm_engine.py).
@llamacpp_only
def test_json_object(client: openai.OpenAI, real_server: RunningServer) -> None:
    ask = 'Return a JSON object with the keys "city" and "country" for Paris.'
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": ask}],
        response_format={"type": "json_object"},
        max_tokens=48,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    body = {"prompt": "A JSON object with a name:", "max_tokens": 48, "temperature": 0}
    text = sse_text(real_server, "completions", body | {"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(text), dict)


class City(BaseModel):
    name: str
    country: str
    population: int = Field(ge=0)  # instructor-style bounds become an integer range


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model="m",
        messages=[{"role": "user", "content": "Describe Paris."}],
        response_format=City,
        max_tokens=64,
        temperature=0,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City)
    assert parsed.name


@pytest.mark.parametrize("stream", [False, True])
def test_guided_choice(real_server: RunningServer, stream: bool) -> None:
    choices = ["positive", "negative", "neutral"]
    chat = {"messages": [{"role": "user", "content": "I love it! Sentiment?"}], "max_tokens": 8}
    completion = {"prompt": "Review: great film. Sentiment:", "max_tokens": 8}
    for path, body in (("chat/completions", chat), ("completions", completion)):
        body |= {"guided_choice": choices, "temperature": 0}
        text = sse_text(real_server, path, body) if stream else _text(post(real_server, path, body))
        assert text in choices


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return str(choice["text"] if "text" in choice else choice["message"]["content"])


@pytest.mark.parametrize("stream", [False, True])
def test_regex_fields(real_server: RunningServer, stream: bool) -> None:
    pattern = r"\d{3}-\d{4}"
    cases: list[tuple[str, dict[str, Any]]] = [
        ("completions", {"prompt": "Call me at", "guided_regex": pattern}),
        (
            "chat/completions",
            {
                "messages": [{"role": "user", "content": "A phone number?"}],
                "regex_pattern": pattern,
            },
        ),  # regex_pattern: TabbyAPI's name
    ]
    for path, body in cases:
        body |= {"max_tokens": 16, "seed": 1}
        text = sse_text(real_server, path, body) if stream else _text(post(real_server, path, body))
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize(
    ("field", "path"),
    [
        ("grammar", "chat/completions"),
        ("guided_grammar", "completions"),
        ("grammar_string", "chat/completions"),
    ],
)
def test_gbnf_fields(real_server: RunningServer, field: str, path: str) -> None:
    gbnf = 'root ::= ("yes" | "no") "!"'
    body: dict[str, Any] = {field: gbnf, "max_tokens": 6, "temperature": 0}
    if path == "completions":
        body["prompt"] = "Is water wet? Answer:"
    else:
        body["messages"] = [{"role": "user", "content": "Is water wet?"}]
    assert _text(post(real_server, path, body)) in ("yes!", "no!")
    assert sse_text(real_server, path, body) in ("yes!", "no!")


def test_schema_fields_of_vllm_and_tabbyapi(real_server: RunningServer) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for field, value in (("guided_json", json.dumps(schema)), ("json_schema", schema)):
        body = {"prompt": "Is it ok? JSON:", "max_tokens": 12, "temperature": 0, field: value}
        jsonschema.validate(json.loads(_text(post(real_server, "completions", body))), schema)


# Each case: the body, the field the 400 names, and what its message says on each engine
# (llama.cpp: llmserve's GBNF compiler; vLLM: its structured-output backend).
CANNOT_ENFORCE = {
    "number-minimum": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "object", "properties": {"n": {"type": "number", "minimum": 1}}}}}},
        "response_format.json_schema.schema",
        ("`minimum` on a number (integers only) (at #/properties/n)",),
    ),
    "unique-items": (
        {"guided_json": {"type": "array", "uniqueItems": True}},
        "guided_json",
        ("`uniqueItems`", "not supported"),
    ),
    "lookbehind": (
        {"guided_regex": r"(?<=a)b"}, "guided_regex", ("lookahead/lookbehind", "not supported"),
    ),
    "bad-gbnf": ({"guided_grammar": "root ::= ("}, "guided_grammar", ("not valid GBNF", "rammar")),
    "no-choice": ({"guided_choice": []}, "guided_choice", ("at least one",)),
    "two": ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", ("at most one",)),
    "no-schema": (
        {"response_format": {"type": "json_schema"}}, "response_format.json_schema", ("needs",),
    ),
}  # fmt: skip


# vLLM's backend enforces `minimum` on numbers, which llmserve's GBNF compiler cannot.
@pytest.mark.parametrize(
    ("body", "param", "named"), engine_cases(CANNOT_ENFORCE, {"number-minimum"})
)
def test_constraints_it_cannot_enforce_are_400(
    real_server: RunningServer, body: dict[str, Any], param: str, named: tuple[str, ...]
) -> None:
    for path, base in (
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("completions", {"prompt": "hi"}),
    ):
        r = post(real_server, path, base | body | {"max_tokens": 4})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param
        assert any(fragment in error["message"] for fragment in named), error["message"]


def test_text_response_format_is_unconstrained(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Say hi."}],
        response_format={"type": "text"},
        max_tokens=4,
    )
    assert r.choices[0].message.content


def test_grammar_left_with_no_token_fails_the_request_not_the_engine(
    real_server: RunningServer,
) -> None:
    models: ModelManager = real_server.app.state.models
    token_ids = models.loaded()[0].engine.tokenize("a", False)
    body = {
        "prompt": "Say a:",
        "grammar": 'root ::= "a"',
        "banned_tokens": token_ids,
        "max_tokens": 4,
    }
    r = post(real_server, "completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "grammar"
    assert post(real_server, "completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200
