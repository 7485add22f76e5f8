"""Tool calling on the real default model (ChatML: no tool support in the template)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai

from tests.server import RunningServer, sse_chunks

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
CLOCK: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 24}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY: dict[str, Any] = {"model": "m", "max_tokens": 48, "temperature": 0}


def test_required_yields_a_parseable_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, CLOCK],  # type: ignore[list-item]
        tool_choice="required",
        **GREEDY,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) >= 1
    for call in calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
        assert isinstance(json.loads(call.function.arguments), dict)  # type: ignore[union-attr]


def test_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, CLOCK],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        **GREEDY,
    )
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "get_time"  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert set(arguments) == {"zone"} and isinstance(arguments["zone"], str)


def test_streamed_call_reassembles_to_the_same_call(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "messages": ASK,
        "tools": [WEATHER, CLOCK],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        **GREEDY,
    }
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls or []
    with client.chat.completions.stream(**args) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed] == [  # type: ignore[union-attr]
        (c.function.name, c.function.arguments)  # type: ignore[union-attr]
        for c in whole
    ]
    assert len(whole) == 1


def test_stream_chunks_have_openai_shape(real_server: RunningServer) -> None:
    body = {
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": "required",
        "stream": True,
        "max_tokens": 48,
        "temperature": 0,
    }
    chunks = sse_chunks(f"{real_server.url}/v1/chat/completions", body, timeout=300)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}  # as without tools
    calls = [entry for d in deltas for entry in d.get("tool_calls", [])]
    assert calls[0]["index"] == 0 and calls[0]["type"] == "function"
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all(set(c) == {"index", "function"} for c in calls[1:])
    arguments = "".join(c["function"].get("arguments", "") for c in calls)
    assert set(json.loads(arguments)) == {"city", "unit"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(d.get("content") for d in deltas)


def test_auto_answers_in_text_or_a_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        **GREEDY,
    )
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_tool_results_render_and_get_an_answer(client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 21}'},
    ]
    with_result = client.chat.completions.create(
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        **GREEDY | {"max_tokens": 24},
    )
    assert with_result.choices[0].message.content
    assert with_result.choices[0].message.tool_calls in (None, [])
    without = client.chat.completions.create(
        messages=ASK,  # type: ignore[arg-type]
        **GREEDY | {"max_tokens": 1},
    )
    assert with_result.usage is not None and without.usage is not None
    assert with_result.usage.prompt_tokens > without.usage.prompt_tokens + 20


def test_several_choices_each_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        n=2,
        seed=5,
        model="m",
        max_tokens=48,
    )
    assert [c.finish_reason for c in r.choices] == ["tool_calls", "tool_calls"]


def test_tool_choice_errors(real_server: RunningServer) -> None:
    url = f"{real_server.url}/v1/chat/completions"
    cases = [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_choice": ["a"]}, "tool_choice"),
    ]  # fmt: skip
    for extra, param in cases:
        r = httpx.post(url, json={"messages": ASK, "max_tokens": 4} | extra, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
