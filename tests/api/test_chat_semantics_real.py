"""Chat semantics llama.cpp's own server tests check, on the real model: text parts joined,
the final assistant message continued, context errors naming the chat's fields, and one shape
for the first stream chunk."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.server import RunningServer

SYSTEM = (  # what the model's template writes when no system message is given
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)
QUESTION = "What is the capital of France?"
PREFILL = "The capital of France is"
PREFILLED_PROMPT = (
    f"{SYSTEM}<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{PREFILL}"
)
PREFILLED = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": PREFILL}]
GREEDY = {"max_tokens": 8, "temperature": 0}


def post(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def chat(server: RunningServer, **body: Any) -> dict[str, Any]:
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def tokens(server: RunningServer, **body: Any) -> list[int]:
    r = post(server, "/tokenize", body)
    assert r.status_code == 200, r.text
    return list(r.json()["tokens"])


def error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    return dict(r.json()["error"])


# ---- item 19: text parts are joined with a newline ----


def test_text_parts_are_joined_with_a_newline(real_server: RunningServer) -> None:
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book"}]
    as_parts = tokens(real_server, messages=[{"role": "user", "content": parts}])
    joined = tokens(real_server, messages=[{"role": "user", "content": "What is\nthe best book"}])
    glued = tokens(real_server, messages=[{"role": "user", "content": "What isthe best book"}])
    assert as_parts == joined != glued
    rendered = post(real_server, "/detokenize", {"tokens": as_parts}).json()["prompt"]
    assert "<|im_start|>user\nWhat is\nthe best book<|im_end|>" in rendered
    # The chat route renders the same prompt.
    usage = chat(real_server, messages=[{"role": "user", "content": parts}], **GREEDY)["usage"]
    assert usage["prompt_tokens"] == len(as_parts)


# ---- item 20: the final assistant message is continued ----


def completion_of(server: RunningServer, prompt: str) -> tuple[str, int]:
    r = post(server, "/v1/completions", {"prompt": prompt, **GREEDY})
    assert r.status_code == 200, r.text
    data = r.json()
    return data["choices"][0]["text"], data["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    "flags", [{"continue_final_message": True}, {}], ids=["explicit", "as-llama.cpp"]
)
def test_final_assistant_message_is_continued(
    real_server: RunningServer, flags: dict[str, Any]
) -> None:
    # The prompt ends with the assistant's partial text: no end of turn, no new turn. The same
    # tokens as that prompt sent to /v1/completions, so the same greedy continuation.
    expected_text, expected_prompt_tokens = completion_of(real_server, PREFILLED_PROMPT)
    data = chat(real_server, messages=PREFILLED, **GREEDY, **flags)
    assert data["usage"]["prompt_tokens"] == expected_prompt_tokens
    assert data["choices"][0]["message"]["content"] == expected_text
    streamed = post(
        real_server, "/v1/chat/completions", {"messages": PREFILLED, "stream": True, **GREEDY}
    )
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line[6:7] == "{"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == expected_text


def test_a_flag_can_open_a_new_turn_after_the_assistant(real_server: RunningServer) -> None:
    closed = f"{PREFILLED_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    _, new_turn_tokens = completion_of(real_server, closed)
    for flags in ({"continue_final_message": False}, {"add_generation_prompt": True}):
        usage = chat(real_server, messages=PREFILLED, **GREEDY, **flags)["usage"]
        assert usage["prompt_tokens"] == new_turn_tokens, flags


def test_continuing_an_empty_or_repeated_assistant_message(real_server: RunningServer) -> None:
    # The cut is after the *final* message's text, even when that text occurs earlier too.
    messages = [
        {"role": "user", "content": PREFILL},
        {"role": "assistant", "content": PREFILL},
    ]
    prompt = f"{SYSTEM}<|im_start|>user\n{PREFILL}<|im_end|>\n<|im_start|>assistant\n{PREFILL}"
    text, prompt_tokens = completion_of(real_server, prompt)
    data = chat(real_server, messages=messages, continue_final_message=True, **GREEDY)
    assert data["usage"]["prompt_tokens"] == prompt_tokens
    assert data["choices"][0]["message"]["content"] == text
    empty = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ""}]
    _, opened = completion_of(
        real_server, f"{SYSTEM}<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    usage = chat(real_server, messages=empty, continue_final_message=True, **GREEDY)["usage"]
    assert usage["prompt_tokens"] == opened


def test_tokenize_renders_a_chat_as_chat_would(real_server: RunningServer) -> None:
    # vLLM's /tokenize with messages gives the tokens the chat route would prefill, prefill too.
    prefilled = tokens(real_server, prompt=PREFILLED_PROMPT)
    assert tokens(real_server, messages=PREFILLED) == prefilled
    assert tokens(real_server, messages=PREFILLED, continue_final_message=True) == prefilled
    closed = tokens(real_server, prompt=f"{PREFILLED_PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    assert tokens(real_server, messages=PREFILLED, add_generation_prompt=True) == closed
    both = {"messages": PREFILLED, "continue_final_message": True, "add_generation_prompt": True}
    assert error(post(real_server, "/tokenize", both))["param"] == "continue_final_message"
    # TabbyAPI's encode takes messages as `text` and keeps opening a new turn.
    encoded = post(real_server, "/v1/token/encode", {"text": PREFILLED})
    assert encoded.status_code == 200, encoded.text
    assert encoded.json()["tokens"] == closed
    assert post(real_server, "/v1/token/encode", {"text": []}).status_code == 200


def test_contradictory_continuation_flags_are_a_400(real_server: RunningServer) -> None:
    both = {"messages": PREFILLED, "continue_final_message": True, "add_generation_prompt": True}
    assert error(post(real_server, "/v1/chat/completions", both))["param"] == (
        "continue_final_message"
    )
    user_last = {
        "messages": [{"role": "user", "content": QUESTION}],
        "continue_final_message": True,
    }
    assert error(post(real_server, "/v1/chat/completions", user_last))["param"] == (
        "continue_final_message"
    )


# ---- item 21: context errors name the chat's fields ----


def test_chat_context_errors_name_messages_or_the_limit(real_server: RunningServer) -> None:
    huge = [{"role": "user", "content": "hello " * 3000}]
    for limit in ({}, {"max_tokens": 10}):
        e = error(post(real_server, "/v1/chat/completions", {"messages": huge, **limit}))
        assert e["code"] == "context_length_exceeded" and e["param"] == "messages", limit
    fits = [{"role": "user", "content": "hello " * 1000}]
    for name in ("max_tokens", "max_completion_tokens"):
        e = error(post(real_server, "/v1/chat/completions", {"messages": fits, name: 1500}))
        assert e["code"] == "context_length_exceeded" and e["param"] == name


def test_completion_prompt_alone_too_long_blames_the_prompt(real_server: RunningServer) -> None:
    e = error(post(real_server, "/v1/completions", {"prompt": "hello " * 3000, "max_tokens": 10}))
    assert e["code"] == "context_length_exceeded" and e["param"] == "prompt"
    e = error(post(real_server, "/v1/completions", {"prompt": "hello " * 1000, "max_tokens": 1500}))
    assert e["param"] == "max_tokens"


# ---- item 22: the first stream chunk has one shape, tools or not ----

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.mark.parametrize("tools", [None, [WEATHER]], ids=["no-tools", "tools"])
def test_first_stream_chunk_is_role_and_empty_content(
    real_server: RunningServer, tools: list[dict[str, Any]] | None
) -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "stream": True,
        **GREEDY,
    }
    if tools:
        body["tools"] = tools
    r = post(real_server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line[6:7] == "{"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
