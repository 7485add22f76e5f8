"""Grammars and schemas too big or too deep for llama.cpp are 400s (issue 11: 1 and 25)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from llmserve.core import limits
from tests.server import RunningServer

CRASHING_DEPTH = 60_000  # nested groups that overflowed llama.cpp's recursive parser: SIGSEGV


def nested_gbnf(depth: int) -> str:
    return "root ::= " + "(" * depth + '"a"' + ")" * depth


def deep_schema_text(levels: int) -> str:
    # json.dumps would itself recurse too deeply: the text is written out directly.
    opening = '{"type": "object", "required": ["a"], "properties": {"a": '
    return opening * levels + '{"type": "string"}' + "}}" * levels


def nested_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def post(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def assert_still_serving(server: RunningServer) -> None:
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] >= 1


def openai_error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("field", ["grammar", "guided_grammar", "grammar_string"])
def test_the_crashing_grammar_is_a_400_and_the_server_lives(
    real_server: RunningServer, field: str
) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, field: nested_gbnf(CRASHING_DEPTH)}
    error = openai_error(post(real_server, "/v1/completions", body))
    assert (error["code"], error["param"]) == ("invalid_grammar", field)
    assert_still_serving(real_server)


def test_a_deep_grammar_within_the_size_limit_is_a_400_naming_the_depth(
    real_server: RunningServer,
) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "grammar": nested_gbnf(30_000)}
    error = openai_error(post(real_server, "/v1/completions", body))
    assert error["code"] == "invalid_grammar"
    assert str(limits.MAX_GRAMMAR_DEPTH) in error["message"]
    assert_still_serving(real_server)


def test_a_120_kb_grammar_is_a_400_naming_the_size(real_server: RunningServer) -> None:
    grammar = "root ::= " + " | ".join(f'"word{i}"' for i in range(12_000))
    assert len(grammar) > 120_000
    messages = [{"role": "user", "content": "Hi"}]
    body = {"messages": messages, "max_tokens": 2, "grammar": grammar}
    error = openai_error(post(real_server, "/v1/chat/completions", body))
    assert error["code"] == "invalid_grammar"
    assert str(limits.MAX_GRAMMAR_BYTES) in error["message"]
    assert_still_serving(real_server)


def test_kobold_crashing_grammar_is_a_400_in_koboldcpp_shape(real_server: RunningServer) -> None:
    body = {"prompt": "Hi", "max_length": 2, "grammar": nested_gbnf(CRASHING_DEPTH)}
    r = post(real_server, "/api/v1/generate", body)
    assert r.status_code == 400
    assert r.json()["detail"]["type"] == "bad_input"
    assert "grammar" in r.json()["detail"]["msg"]
    assert_still_serving(real_server)


def test_a_grammar_at_the_depth_limit_still_generates(real_server: RunningServer) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "grammar": nested_gbnf(limits.MAX_GRAMMAR_DEPTH)}
    r = post(real_server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "a"


@pytest.mark.parametrize(
    "pattern", ["((a{1,1000}){1,1000}){1,1000}", "(a{0,40}){0,40}", "(x?){0,500}"]
)
def test_regex_bombs_are_400s(real_server: RunningServer, pattern: str) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "guided_regex": pattern}
    error = openai_error(post(real_server, "/v1/completions", body))
    assert error["param"] == "guided_regex"
    assert_still_serving(real_server)


def test_schema_nested_5000_levels_as_text_is_a_400(real_server: RunningServer) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "guided_json": deep_schema_text(5000)}
    error = openai_error(post(real_server, "/v1/completions", body))
    assert (error["code"], error["param"]) == ("unsupported_schema", "guided_json")
    assert str(limits.MAX_SCHEMA_DEPTH) in error["message"]


def raw_body(body_text: str) -> dict[str, Any]:
    return {"content": body_text, "headers": {"content-type": "application/json"}}


def post_response_format(server: RunningServer, schema_text: str) -> dict[str, Any]:
    # Written as text: json.dumps could not even produce the deepest of these.
    text = (
        '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "response_format": '
        '{"type": "json_schema", "json_schema": {"name": "deep", "schema": ' + schema_text + "}}}"
    )
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, **raw_body(text))
    return openai_error(r)


def test_deep_response_format_schema_is_a_400_naming_the_depth(
    real_server: RunningServer,
) -> None:
    error = post_response_format(real_server, deep_schema_text(40))
    assert (error["code"], error["param"]) == (
        "unsupported_schema",
        "response_format.json_schema.schema",
    )
    assert str(limits.MAX_SCHEMA_DEPTH) in error["message"]


def test_response_format_schema_nested_5000_levels_is_a_400(real_server: RunningServer) -> None:
    error = post_response_format(real_server, deep_schema_text(5000))
    # Past the body's own depth bound the HTTP layer refuses it before any route sees it.
    assert error["code"] in ("unsupported_schema", "json_too_deep")
    assert "deep" in error["message"]
    assert_still_serving(real_server)


def test_deep_tool_schema_through_the_openai_sdk_is_a_400(client: openai.OpenAI) -> None:
    tool: Any = {
        "type": "function",
        "function": {"name": "deep", "parameters": nested_schema(40)},
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Hi"}],
            tools=[tool],
            max_tokens=2,
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "unsupported_schema"
    assert error["param"] == "tools[0].function.parameters"


def test_a_moderately_nested_schema_still_generates_valid_json(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="default",
        prompt="JSON:",
        max_tokens=120,
        temperature=0,
        extra_body={"guided_json": nested_schema(5)},
    )
    value = json.loads(response.choices[0].text)
    for _ in range(5):
        value = value["a"]
    assert isinstance(value, str)
