"""Responses validate against the official OpenAI description (shared/specs/openai-openapi.yaml)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from tests.server import RunningServer

SPEC = Path(__file__).resolve().parents[3] / "shared" / "specs" / "openai-openapi.yaml"


@cache
def components() -> dict[str, Any]:
    return dict(_nullable_to_json_schema(yaml.safe_load(SPEC.read_text())["components"]))


def _nullable_to_json_schema(node: Any) -> Any:
    """The spec still uses OpenAPI 3.0's `nullable: true` in places; JSON Schema spells it null."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable_to_json_schema(value) for key, value in node.items()}
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def validate(instance: Any, schema_name: str) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": components()}
    jsonschema.Draft202012Validator(schema).validate(instance)


pytestmark = pytest.mark.skipif(not SPEC.is_file(), reason="shared/specs is not beside the repo")

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}


def post(server: RunningServer, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_completion_matches_spec(real_server: RunningServer) -> None:
    validate(post(real_server, "/v1/chat/completions", CHAT), "CreateChatCompletionResponse")
    with_logprobs = {**CHAT, "logprobs": True, "top_logprobs": 2, "n": 2}
    validate(
        post(real_server, "/v1/chat/completions", with_logprobs), "CreateChatCompletionResponse"
    )


def test_chat_stream_chunks_match_spec(real_server: RunningServer) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
    with httpx.stream("POST", real_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        payloads = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    for payload in payloads[:-1]:
        validate(yaml.safe_load(payload), "CreateChatCompletionStreamResponse")


def test_completion_matches_spec(real_server: RunningServer) -> None:
    # Not with `echo`: its first prompt token has logprob null, as OpenAI's legacy API and
    # lm-eval expect, which the published schema does not allow (tests/api/test_logprobs.py).
    body = {"prompt": ["Hello", "Bye"], "max_tokens": 4, "logprobs": 2, "n": 2, "temperature": 0}
    validate(post(real_server, "/v1/completions", body), "CreateCompletionResponse")
    stream_body = {**body, "stream": True}
    with httpx.stream(
        "POST", real_server.url + "/v1/completions", json=stream_body, timeout=60
    ) as r:
        payloads = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    # The spec has no chunk schema for completions and requires finish_reason, which only the
    # last chunk of each choice has; validate those.
    finals = [json.loads(p) for p in payloads[:-1] if json.loads(p)["choices"][0]["finish_reason"]]
    assert len(finals) == 4
    for chunk in finals:
        validate(chunk, "CreateCompletionResponse")


def test_models_match_spec(real_server: RunningServer) -> None:
    listing = httpx.get(real_server.url + "/v1/models").json()
    validate(listing, "ListModelsResponse")
    validate(httpx.get(real_server.url + f"/v1/models/{listing['data'][0]['id']}").json(), "Model")
