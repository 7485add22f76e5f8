"""The OpenAI Responses dialect on the real default model, through the real `openai` SDK
(`responses.create`, `responses.stream`) and httpx for what the SDK cannot send."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response
from sse_starlette import ServerSentEvent

from llmserve.api.overrides import OverrideValue, SamplingOverrides
from llmserve.api.responses.protocol import ResponseObject, ResponsesRequest
from llmserve.api.responses.serving import ResponseStore, ResponseWriter
from llmserve.core.errors import EngineError, NotFoundError
from llmserve.core.request import Delta, FinishReason, Usage
from llmserve.core.streams import IndexedDelta
from llmserve.core.tools import Turn
from llmserve.engines.base import EngineStats
from llmserve.models.manager import ModelManager
from tests.dialects.conftest import API_KEY, AUTH
from tests.server import RunningServer

MODEL = "gpt-4.1"  # any name: one model is served
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(dialect_server: RunningServer) -> openai.OpenAI:
    """The OpenAI SDK pointed at the server, with its API key."""
    return openai.OpenAI(base_url=dialect_server.url + "/v1", api_key=API_KEY, max_retries=0)


def post(server: RunningServer, body: dict[str, Any]) -> httpx.Response:
    """A raw POST /v1/responses."""
    return httpx.post(server.url + "/v1/responses", json=body, headers=AUTH, timeout=120)


def message_text(response: Response) -> str:
    """The text of the response's message items (what the SDK's output_text joins)."""
    return "".join(
        part.text
        for item in response.output
        if item.type == "message"
        for part in item.content
        if part.type == "output_text"
    )


def test_create_with_string_input(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL, input="Say hello.", temperature=0, max_output_tokens=40
    )
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.output_text == message_text(response)
    assert response.output_text.strip()
    message = response.output[0]
    assert message.type == "message"
    assert message.id.startswith("msg_")
    assert message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert message.content[0].annotations == []
    usage = response.usage
    assert usage is not None
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert usage.input_tokens_details.cached_tokens >= 0
    # The request's parameters are echoed.
    assert response.temperature == 0
    assert response.max_output_tokens == 40
    assert response.tools == [] and response.tool_choice == "auto"
    assert response.parallel_tool_calls is True


def test_greedy_is_deterministic_and_items_equal_string(client: openai.OpenAI) -> None:
    as_string = client.responses.create(input="Name a color.", temperature=0, max_output_tokens=20)
    as_items = client.responses.create(
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Name a color."}]}],
        temperature=0,
        max_output_tokens=20,
    )
    assert as_items.output_text == as_string.output_text
    assert as_items.usage is not None and as_string.usage is not None
    assert as_items.usage.input_tokens == as_string.usage.input_tokens


def test_instructions_become_the_system_prompt(client: openai.OpenAI) -> None:
    plain = client.responses.create(input="Hi!", temperature=0, max_output_tokens=20)
    instructed = client.responses.create(
        input="Hi!",
        instructions="You are a pirate. Always answer like a pirate.",
        temperature=0,
        max_output_tokens=20,
    )
    assert instructed.instructions == "You are a pirate. Always answer like a pirate."
    assert plain.usage is not None and instructed.usage is not None
    assert instructed.usage.input_tokens != plain.usage.input_tokens
    # A developer message is a system message too: same prompt as `instructions`.
    developer = client.responses.create(
        input=[
            {"role": "developer", "content": "You are a pirate. Always answer like a pirate."},
            {"role": "user", "content": "Hi!"},
        ],
        temperature=0,
        max_output_tokens=20,
    )
    assert developer.output_text == instructed.output_text


def test_stream_events_in_order(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL, input="Count from one to five.", temperature=0, max_output_tokens=30
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    ending = "response.completed" if final.status == "completed" else "response.incomplete"
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        ending,
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    numbers = [event.sequence_number for event in events]
    assert numbers == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas == done.text == final.output_text
    assert final.output_text.strip()
    item_ids = {e.item_id for e in events if e.type == "response.output_text.delta"}
    assert item_ids == {final.output[0].id}
    assert events[0].response.id == final.id
    # The stream and a non-streamed request agree (greedy).
    whole = client.responses.create(
        input="Count from one to five.", temperature=0, max_output_tokens=30
    )
    assert whole.output_text == final.output_text


def test_json_schema_format_gives_valid_json(client: openai.OpenAI) -> None:
    response = client.responses.create(
        input="Describe a person as JSON.",
        temperature=0,
        max_output_tokens=100,
        text={
            "format": {
                "type": "json_schema",
                "name": "person",
                "schema": PERSON_SCHEMA,
                "strict": True,
            }
        },
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), PERSON_SCHEMA)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


def test_json_object_format(client: openai.OpenAI) -> None:
    response = client.responses.create(
        input="Give me a JSON object.",
        temperature=0,
        max_output_tokens=60,
        text={"format": {"type": "json_object"}},
    )
    if response.status == "completed":
        assert isinstance(json.loads(response.output_text), dict)
    else:
        assert response.output_text.lstrip().startswith("{")


def test_function_tool_round_trip(client: openai.OpenAI) -> None:
    first = client.responses.create(
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
        max_output_tokens=60,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) >= 1
    call = calls[0]
    assert call.name == "get_weather"
    assert call.id is not None and call.id.startswith("fc_")
    assert call.call_id.startswith("call_")
    assert call.status == "completed"
    assert isinstance(json.loads(call.arguments)["city"], str)
    assert first.tools[0].type == "function" and first.tools[0].name == "get_weather"
    # The result goes back as a function_call_output; now a message answers.
    second = client.responses.create(
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 22 C"},
        ],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        temperature=0,
        max_output_tokens=40,
    )
    assert [item.type for item in second.output] == ["message"]
    assert second.output_text.strip()
    # The SDK's way: the previous output items themselves go back as input.
    third = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            *first.output,
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 22 C"},
        ],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        temperature=0,
        max_output_tokens=40,
    )
    assert third.output_text == second.output_text


def test_named_tool_choice_streams_call_events(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL,
        input="Weather in Rome?",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=60,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert types[0] == "response.created"
    assert "response.function_call_arguments.delta" in types
    assert types[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "response.output_text.delta" not in types
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == call.arguments
    assert "city" in json.loads(call.arguments)
    numbers = [event.sequence_number for event in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def test_previous_response_id_continues_and_get_delete(client: openai.OpenAI) -> None:
    first = client.responses.create(
        input="My name is Ada. Remember it.", temperature=0, max_output_tokens=20
    )
    follow = client.responses.create(
        input="What is my name?",
        previous_response_id=first.id,
        temperature=0,
        max_output_tokens=20,
    )
    assert follow.previous_response_id == first.id
    alone = client.responses.create(input="What is my name?", temperature=0, max_output_tokens=20)
    # The history (first input and output) is in the continued prompt.
    assert follow.usage is not None and alone.usage is not None and first.usage is not None
    assert follow.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    # The same conversation sent as items gives the same prompt.
    manual = client.responses.create(
        input=[
            {"role": "user", "content": "My name is Ada. Remember it."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"},
        ],
        temperature=0,
        max_output_tokens=20,
    )
    assert manual.usage is not None
    assert manual.usage.input_tokens == follow.usage.input_tokens
    assert manual.output_text == follow.output_text
    fetched = client.responses.retrieve(first.id)
    assert fetched.id == first.id and fetched.output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_unknown_previous_response_id_is_404(dialect_server: RunningServer) -> None:
    r = post(dialect_server, {"input": "hi", "previous_response_id": "resp_doesnotexist"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["param"] == "previous_response_id"
    assert error["code"] == "previous_response_not_found"
    assert error["type"] == "invalid_request_error"


def test_unknown_previous_response_id_sdk_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(input="hi", previous_response_id="resp_nope")
    assert caught.value.status_code == 404


def test_store_false_is_not_kept(client: openai.OpenAI) -> None:
    response = client.responses.create(input="hi", store=False, max_output_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="again", previous_response_id=response.id)


def test_max_output_tokens_gives_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        input="Write a long story about a dragon.", temperature=0, max_output_tokens=3
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3
    assert response.output[0].type == "message" and response.output[0].status == "incomplete"


def test_max_output_tokens_stream_ends_incomplete(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL, input="Write a long story about a dragon.", temperature=0, max_output_tokens=3
    ) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details is not None
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


CODEX_BODY: dict[str, Any] = {
    "model": "gpt-5-codex",
    "instructions": "You are Codex, a coding agent.",
    "input": [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "<permissions>read-only</permissions>"}],
        },
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "List the files."}],
        },
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xyz"},
    ],
    "tools": [
        {
            "type": "function",
            "name": "shell",
            "description": "Runs a shell command and returns its output.",
            "strict": False,
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                "required": ["command"],
                "additionalProperties": False,
            },
        },
        {
            "type": "custom",
            "name": "apply_patch",
            "description": "Apply a patch.",
            "format": {
                "type": "grammar",
                "syntax": "lark",
                "definition": 'start: "*** Begin Patch" LF "*** End Patch"\nLF: "\\n"',
            },
        },
        {"type": "web_search"},
        {"type": "local_shell"},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0f6b2c1e-session",
    "service_tier": "auto",
    "text": {"verbosity": "medium"},
    "max_output_tokens": 30,
    "temperature": 0,
}


def test_codex_shaped_body_streams(dialect_server: RunningServer) -> None:
    with httpx.stream(
        "POST", dialect_server.url + "/v1/responses", json=CODEX_BODY, headers=AUTH, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.iter_lines())
    names = [name for name, _ in events]
    assert names[0] == "response.created"
    assert names[-1] in ("response.completed", "response.incomplete")
    for name, data in events:
        assert data["type"] == name
    final = events[-1][1]["response"]
    assert [t["name"] for t in final["tools"]] == ["shell"]  # custom and built-ins dropped
    assert final["store"] is False and final["parallel_tool_calls"] is False
    assert final["usage"]["input_tokens"] > 0
    # store: false, so nothing to fetch.
    fetched = httpx.get(dialect_server.url + f"/v1/responses/{final['id']}", headers=AUTH)
    assert fetched.status_code == 404


def test_codex_shaped_body_non_streaming(dialect_server: RunningServer) -> None:
    r = post(dialect_server, {**CODEX_BODY, "stream": False})
    assert r.status_code == 200, r.text
    parsed = Response.model_validate(r.json())
    assert parsed.object == "response" and parsed.output


def _sse_events(lines: Any) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": ["hi"]}, "input"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
        (
            {
                "input": [
                    {"role": "user", "content": "hi"},
                    {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]},
                ]
            },
            "input[1].content[0]",
        ),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "temperature": -1}, "temperature"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
        (
            {
                "input": "hi",
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "name": "x"},
            },
            "tool_choice",
        ),
        ({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"input": "hi", "tool_choice": {"type": "custom", "name": "apply_patch"}}, "tool_choice"),
        ({"input": "hi", "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
            "text.format.schema",
        ),
        (
            {
                "input": "hi",
                "text": {
                    "format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}
                },
            },
            "text.format.schema",
        ),
        ({"input": "hi", "background": True}, "background"),
        ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ],
)
def test_bad_input_is_400_naming_the_field(
    dialect_server: RunningServer, body: dict[str, Any], param: str
) -> None:
    r = post(dialect_server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_bad_input_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
        )
    assert caught.value.status_code == 400


def test_missing_key_is_401_in_openai_shape(dialect_server: RunningServer) -> None:
    r = httpx.post(dialect_server.url + "/v1/responses", json={"input": "hi"}, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_unknown_response_id_is_404(dialect_server: RunningServer) -> None:
    r = httpx.get(dialect_server.url + "/v1/responses/resp_missing", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "response_id"
    r = httpx.delete(dialect_server.url + "/v1/responses/resp_missing", headers=AUTH)
    assert r.status_code == 404


def test_history_with_custom_tool_call_items(client: openai.OpenAI) -> None:
    # Codex sends earlier custom tool calls back; they are read as calls and their results.
    response = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Fix the typo."},
            {
                "type": "custom_tool_call",
                "call_id": "call_1",
                "name": "apply_patch",
                "input": "*** Begin Patch\n*** End Patch",
            },
            {"type": "custom_tool_call_output", "call_id": "call_1", "output": "Done!"},
            {"role": "user", "content": [{"type": "input_text", "text": "Thanks."}]},
        ],
        temperature=0,
        max_output_tokens=10,
    )
    assert response.status in ("completed", "incomplete")
    assert response.output[0].type == "message"


@pytest.fixture
def overrides(dialect_server: RunningServer) -> Iterator[SamplingOverrides]:
    """The server's sampling presets, cleared after the test."""
    values: SamplingOverrides = dialect_server.app.state.overrides
    yield values
    values.clear()


def test_forced_preset_caps_the_output(client: openai.OpenAI, overrides: SamplingOverrides) -> None:
    overrides.set(None, {"max_output_tokens": OverrideValue(override=2, force=True)})
    response = client.responses.create(
        model=MODEL, input="Tell me a story.", temperature=0, max_output_tokens=50
    )
    assert response.status == "incomplete"
    assert response.usage is not None and response.usage.output_tokens == 2
    assert response.max_output_tokens == 2


def _stats(server: RunningServer) -> EngineStats:
    models: ModelManager = server.app.state.models
    return models.loaded()[0].engine.stats()


def test_disconnect_mid_stream_frees_the_slot(dialect_server: RunningServer) -> None:
    payload = json.dumps(
        {"input": "Once upon a time", "max_output_tokens": 1500, "ignore_eos": True, "stream": True}
    ).encode()
    head = (
        b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", dialect_server.port), timeout=60)
    sock.sendall(head + payload)
    received = b""
    while b"response.output_text.delta" not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    assert _stats(dialect_server).running == 1
    sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = _stats(dialect_server)
        if stats.running == 0 and stats.free_slots == stats.total_slots:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine slot not freed after disconnect: {_stats(dialect_server)}")


async def _failing_deltas() -> AsyncIterator[IndexedDelta]:
    yield IndexedDelta(0, Delta(text="Hello"))
    raise EngineError("the engine stopped")


def test_error_after_the_stream_started_is_an_error_event() -> None:
    body = ResponsesRequest.model_validate({"input": "hi", "stream": True})
    store = ResponseStore()
    writer = ResponseWriter("m", body, "resp_1", None, (), store)

    async def run() -> list[ServerSentEvent]:
        return [event async for event in writer.stream(_failing_deltas())]

    events = asyncio.run(run())
    names = [event.event for event in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "error",
    ]
    last = json.loads(str(events[-1].data))
    assert last == {
        "type": "error",
        "sequence_number": 5,
        "code": "engine_error",
        "message": "the engine stopped",
        "param": None,
    }
    with pytest.raises(NotFoundError):
        store.get("resp_1")  # a failed stream is not stored


def test_metrics_name_the_dialect(dialect_server: RunningServer) -> None:
    assert post(dialect_server, {"input": "hi", "max_output_tokens": 2}).status_code == 200
    metrics = httpx.get(dialect_server.url + "/metrics", headers=AUTH, timeout=30).text
    line = next(
        line
        for line in metrics.splitlines()
        if line.startswith("llmserve_requests_total")
        and 'route="/v1/responses"' in line
        and 'status="200"' in line
    )
    assert 'dialect="responses"' in line


def test_context_errors_name_this_dialects_fields(dialect_server: RunningServer) -> None:
    too_long = post(dialect_server, {"input": "word " * 3000})
    assert too_long.status_code == 400, too_long.text
    assert too_long.json()["error"]["param"] == "input"
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    too_many = post(dialect_server, {"input": "hi", "max_output_tokens": 100_000})
    assert too_many.status_code == 400, too_many.text
    assert too_many.json()["error"]["param"] == "max_output_tokens"


async def _aborted_deltas() -> AsyncIterator[IndexedDelta]:
    # What every open stream gets when the engine closes at the end of the shutdown grace.
    yield IndexedDelta(0, Delta(text="Once"))
    yield IndexedDelta(
        0,
        Delta(finish_reason=FinishReason.ABORT, usage=Usage(prompt_tokens=4, completion_tokens=1)),
    )


def test_an_aborted_stream_ends_with_response_failed() -> None:
    body = ResponsesRequest.model_validate({"input": "hi", "stream": True})
    store = ResponseStore()
    writer = ResponseWriter("m", body, "resp_2", None, (), store)

    async def run() -> list[ServerSentEvent]:
        return [event async for event in writer.stream(_aborted_deltas())]

    events = asyncio.run(run())
    assert [event.event for event in events][-2:] == [
        "response.output_item.done",
        "response.failed",
    ]
    final = Response.model_validate(json.loads(str(events[-1].data))["response"])
    assert final.status == "failed"
    assert final.error is not None and final.error.code == "server_error"
    assert final.output_text == "Once"
    with pytest.raises(NotFoundError):
        store.get("resp_2")


def test_the_store_evicts_the_oldest_beyond_its_bounds() -> None:
    store = ResponseStore(max_responses=2, max_chars=100)
    turns = (Turn(role="user", content="x" * 30),)

    def response(response_id: str) -> ResponseObject:
        return ResponseObject(id=response_id, created_at=0, status="completed", model="m")

    for name in ("resp_a", "resp_b", "resp_c"):
        store.put(response(name), turns)
    with pytest.raises(NotFoundError):
        store.get("resp_a")  # more than 2 responses
    assert store.get("resp_c").turns == turns
    store.put(response("resp_big"), (Turn(role="user", content="y" * 80),))
    with pytest.raises(NotFoundError):
        store.get("resp_b")  # over 100 characters in all
    store.put(response("resp_huge"), (Turn(role="user", content="z" * 101),))
    with pytest.raises(NotFoundError):
        store.get("resp_huge")  # larger than the whole budget: not kept
    assert store.get("resp_big").response.id == "resp_big"
