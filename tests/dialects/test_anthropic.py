"""The Anthropic Messages dialect through the official `anthropic` SDK, httpx and raw sockets."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import pytest

from llmserve.api.anthropic.serving import (
    MessageWriter,
    anthropic_error_response,
    stop_reason_of,
    strip_billing_header,
    with_pings,
)
from llmserve.api.overrides import OverrideValue, SamplingOverrides
from llmserve.core.errors import (
    EngineError,
    LLMServeError,
    QueueFullError,
    ServiceUnavailableError,
)
from llmserve.core.request import Delta, FinishReason, Usage
from llmserve.engines.base import EngineStats
from llmserve.models.manager import ModelManager
from tests.conftest import PREFIX_CACHE_SLACK
from tests.dialects.conftest import API_KEY
from tests.server import RunningServer

HELLO = [{"role": "user", "content": "Say hello."}]
# Newer SDKs dropped the sampling arguments from `create` (Claude's newest models refuse them);
# clients that still send them (Claude Code does not) put them in the body.
GREEDY = {"temperature": 0}
BILLING = "x-anthropic-billing-header: cc_version=2.1.3.abc; cc_entrypoint=cli; cch=12345;"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def client(dialect_server: RunningServer) -> anthropic.Anthropic:
    """The SDK as Claude Code's setup points it: the server root, the key as x-api-key."""
    return anthropic.Anthropic(base_url=dialect_server.url, api_key=API_KEY, max_retries=0)


def sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of an SSE body, in order."""
    events = []
    for frame in response.text.split("\n\n"):
        lines = [line for line in frame.splitlines() if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def post(server: RunningServer, body: dict[str, Any], path: str = "/v1/messages") -> httpx.Response:
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


# ---- generation through the SDK ---------------------------------------------------------------


def test_create(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=20,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
        metadata={"user_id": "u-1"},
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 0 < message.usage.output_tokens <= 20
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 5
    assert message.usage.cache_creation_input_tokens == 0


def test_greedy_is_deterministic_and_sampling_fields_are_served(
    client: anthropic.Anthropic,
) -> None:
    def text(**fields: Any) -> str:
        message = client.messages.create(
            model="x", max_tokens=12, messages=HELLO, extra_body=fields
        )
        return "".join(block.text for block in message.content if block.type == "text")

    greedy = text(temperature=0)
    assert greedy == text(temperature=0)
    assert text(temperature=0.7, top_k=1, top_p=0.5) == greedy  # top_k 1 is greedy
    assert len({text(temperature=2.0) for _ in range(4)}) > 1  # temperature is applied


def test_stream_event_order(dialect_server: RunningServer) -> None:
    body = {"model": "x", "max_tokens": 16, "temperature": 0, "messages": HELLO, "stream": True}
    response = post(dialect_server, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["id"].startswith("msg_") and start["usage"]["output_tokens"] == 0
    assert events[2][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert 0 < delta["usage"]["output_tokens"] <= 16
    # Streamed and non-streamed greedy answers are the same text.
    whole = post(dialect_server, {**body, "stream": False}).json()
    assert whole["content"][0]["text"] == text


def test_sdk_stream(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="x", max_tokens=16, extra_body=GREEDY, messages=HELLO
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces and final.content[0].type == "text"
    assert final.content[0].text == "".join(pieces)
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens > 0


def test_system_blocks_and_system_messages(client: anthropic.Anthropic) -> None:
    system = "You are a pirate. Answer in one short sentence."

    def answer(**fields: Any) -> tuple[str, int]:
        message = client.messages.create(model="x", max_tokens=16, extra_body=GREEDY, **fields)
        counted = client.messages.count_tokens(model="x", **fields)
        return message.content[0].text, counted.input_tokens

    plain = answer(messages=HELLO, system=system)
    as_blocks = answer(
        messages=HELLO,
        system=[
            {"type": "text", "text": BILLING},
            {"type": "text", "text": system, "cache_control": {"type": "ephemeral"}},
        ],
    )
    in_messages = answer(messages=[{"role": "system", "content": system}, *HELLO])
    assert as_blocks == plain  # the billing line is stripped, cache_control ignored
    assert in_messages == plain  # a leading system message is the system prompt
    without = answer(messages=HELLO)
    assert without[1] != plain[1]  # the system prompt is really in the prompt


def test_billing_header_is_stripped() -> None:
    assert strip_billing_header(f"{BILLING}\nYou are Claude Code.") == "You are Claude Code."
    assert strip_billing_header(BILLING) == ""
    assert strip_billing_header("no header here") == "no header here"


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    free = client.messages.create(model="x", max_tokens=20, extra_body=GREEDY, messages=HELLO)
    text = free.content[0].text
    words = [w for w in text.split() if len(w) > 2]
    assert len(words) >= 2, text
    stop = words[1]
    cut = client.messages.create(
        model="x", max_tokens=20, extra_body=GREEDY, messages=HELLO, stop_sequences=[stop]
    )
    assert cut.stop_reason == "stop_sequence"
    assert cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]


def test_max_tokens(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="x", max_tokens=3, extra_body=GREEDY, messages=[{"role": "user", "content": "Count."}]
    )
    assert message.stop_reason == "max_tokens"
    assert message.stop_sequence is None
    assert message.usage.output_tokens == 3


def test_assistant_prefill_is_continued(client: anthropic.Anthropic) -> None:
    prefill = "The first three letters of the alphabet are"
    message = client.messages.create(
        model="x",
        max_tokens=8,
        extra_body=GREEDY,
        messages=[*HELLO, {"role": "assistant", "content": prefill}],
    )
    assert message.content[0].text  # the continuation only, not the prefill again
    assert not message.content[0].text.startswith(prefill)


# ---- tools ------------------------------------------------------------------------------------


def test_tool_use_round_trip(client: anthropic.Anthropic) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    message = client.messages.create(
        model="x",
        max_tokens=60,
        extra_body=GREEDY,
        messages=[question],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "any"},
    )
    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["tool_use"]
    call = message.content[0]
    assert call.type == "tool_use"
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    assert isinstance(call.input, dict) and isinstance(call.input["city"], str)

    answer = client.messages.create(
        model="x",
        max_tokens=30,
        extra_body=GREEDY,
        tools=[WEATHER_TOOL],
        messages=[
            question,
            {"role": "assistant", "content": [call.model_dump()]},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": call.id,
                        "content": [{"type": "text", "text": "Sunny, 24 degrees Celsius."}],
                    }
                ],
            },
        ],
        tool_choice={"type": "none"},
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in answer.content] == ["text"]
    assert answer.content[0].text.strip()


def test_named_tool_streams_input_json(dialect_server: RunningServer) -> None:
    body = {
        "model": "x",
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": "Weather in Rome?"}],
        "tools": [WEATHER_TOOL, {**WEATHER_TOOL, "name": "get_time"}],
        "tool_choice": {"type": "tool", "name": "get_time"},
    }
    events = sse_events(post(dialect_server, body))
    starts = [data for name, data in events if name == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["tool_use"]
    block = starts[0]["content_block"]
    assert block["name"] == "get_time" and block["input"] == {} and block["id"].startswith("toolu_")
    partial = "".join(
        data["delta"]["partial_json"]
        for name, data in events
        if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta"
    )
    assert isinstance(json.loads(partial)["city"], str)
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_sdk_stream_tool_use(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="x",
        max_tokens=60,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    call = final.content[0]
    assert call.type == "tool_use" and isinstance(call.input, dict)
    assert isinstance(call.input["city"], str)


def test_server_tools_are_ignored_and_forcing_them_is_refused(
    client: anthropic.Anthropic,
) -> None:
    server_tool = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}
    message = client.messages.create(
        model="x",
        max_tokens=5,
        messages=HELLO,
        tools=[server_tool],
    )
    assert message.content[0].type == "text"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model="x",
            max_tokens=5,
            messages=HELLO,
            tools=[server_tool],
            tool_choice={"type": "any"},
        )


# ---- usage and caching ------------------------------------------------------------------------


def test_count_tokens_matches_usage(client: anthropic.Anthropic) -> None:
    fields: dict[str, Any] = {
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "tools": [WEATHER_TOOL],
    }
    counted = client.messages.count_tokens(model="x", **fields)
    message = client.messages.create(model="x", max_tokens=5, extra_body=GREEDY, **fields)
    usage = message.usage
    # Anthropic's input_tokens excludes tokens read from the cache: together they are the prompt.
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    assert counted.input_tokens > 30  # the tool prompt is counted too


def test_repeated_long_prompt_reads_the_cache(client: anthropic.Anthropic) -> None:
    system = "You answer questions about gardening. " * 60
    first = client.messages.create(
        model="x", max_tokens=3, system=system, messages=[{"role": "user", "content": "Hi"}]
    )
    again = client.messages.create(
        model="x", max_tokens=3, system=system, messages=[{"role": "user", "content": "Hello"}]
    )
    total = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert total > 300
    assert (again.usage.cache_read_input_tokens or 0) > 300 - PREFIX_CACHE_SLACK
    assert again.usage.input_tokens < 30 + PREFIX_CACHE_SLACK  # only the new tail was prefilled


def claude_code_body(billing: str) -> dict[str, Any]:
    """A request shaped as Claude Code sends it (abridged), with its per-request billing line."""
    ephemeral = {"type": "ephemeral"}
    return {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 4,
        "stream": True,
        "metadata": {"user_id": "user_abc_account_def_session_1"},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": []},
        "system": [
            {"type": "text", "text": billing},
            {"type": "text", "text": "You are Claude Code. " * 80, "cache_control": ephemeral},
        ],
        "tools": [{**WEATHER_TOOL, "cache_control": ephemeral}],
        "messages": [
            {"role": "system", "content": "Environment: a test machine."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi", "cache_control": ephemeral}],
            },
        ],
    }


def test_claude_code_request_and_its_prefix_cache(dialect_server: RunningServer) -> None:
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    }

    def usage(billing: str) -> dict[str, int]:
        response = httpx.post(
            dialect_server.url + "/v1/messages?beta=true",
            json=claude_code_body(billing),
            headers=headers,
            timeout=120,
        )
        assert response.status_code == 200, response.text
        events = sse_events(response)
        assert events[-1][0] == "message_stop"
        return dict(events[-2][1]["usage"])

    usage(BILLING)
    # The next request's billing line differs (as each of Claude Code's does): the rest is cached.
    again = usage(BILLING.replace("cch=12345", "cch=67890"))
    assert again["cache_read_input_tokens"] > 300 - PREFIX_CACHE_SLACK
    assert again["input_tokens"] < 20 + PREFIX_CACHE_SLACK


# ---- presets ----------------------------------------------------------------------------------


@pytest.fixture
def overrides(dialect_server: RunningServer) -> Iterator[SamplingOverrides]:
    """The server's sampling presets, cleared after the test."""
    values: SamplingOverrides = dialect_server.app.state.overrides
    yield values
    values.clear()


def test_presets_apply(client: anthropic.Anthropic, overrides: SamplingOverrides) -> None:
    overrides.set(None, {"max_tokens": OverrideValue(override=2, force=True)})
    message = client.messages.create(model="x", max_tokens=50, messages=HELLO)
    assert message.usage.output_tokens == 2 and message.stop_reason == "max_tokens"


# ---- keys, headers and errors -----------------------------------------------------------------


def test_bearer_key_and_beta_flags(dialect_server: RunningServer) -> None:
    bearer = anthropic.Anthropic(
        base_url=dialect_server.url, auth_token=API_KEY, api_key=None, max_retries=0
    )
    message = bearer.beta.messages.create(  # POST /v1/messages?beta=true, anthropic-beta header
        model="x", max_tokens=3, messages=HELLO, betas=["interleaved-thinking-2025-05-14"]
    )
    assert message.content[0].type == "text"


def test_wrong_key_is_authentication_error(dialect_server: RunningServer) -> None:
    wrong = anthropic.Anthropic(base_url=dialect_server.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model="x", max_tokens=3, messages=HELLO)
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": caught.value.body["error"]["message"]},
    }


def test_unknown_route_is_not_found_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.batches.list()  # GET /v1/messages/batches: not served here
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"


def test_image_block_is_bad_request(client: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="x",
            max_tokens=3,
            messages=[{"role": "user", "content": [image]}],
        )
    body = caught.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert "messages.0.content.0" in body["error"]["message"]
    assert "image" in body["error"]["message"]


def test_missing_max_tokens_is_bad_request(dialect_server: RunningServer) -> None:
    response = post(dialect_server, {"model": "x", "messages": HELLO})
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in error["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_past_the_context_is_a_400_status(
    dialect_server: RunningServer, stream: bool
) -> None:
    body = {
        "model": "x",
        "max_tokens": 5,
        "stream": stream,
        "system": "garden " * 3000,  # past the test server's 2,048-token context
        "messages": HELLO,
    }
    response = post(dialect_server, body)
    assert response.status_code == 400  # a status even when streaming: no 200 then an error
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "context length" in error["error"]["message"]


def raw_request(server: RunningServer, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes as they are; return the whole response."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_malformed_json_is_anthropic_shaped_400(dialect_server: RunningServer) -> None:
    body = b'{"model": "x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}'
    head = (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nx-api-key: " + API_KEY.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    response = raw_request(dialect_server, head, body)
    status, _, payload = response.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400")
    error = json.loads(payload)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "JSON" in error["error"]["message"]


def test_oversized_body_is_request_too_large(dialect_server: RunningServer) -> None:
    head = (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nx-api-key: " + API_KEY.encode() + b"\r\n"
        b"Content-Length: 100000000000\r\n\r\n"
    )
    status, _, payload = raw_request(dialect_server, head).partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413")
    assert json.loads(payload)["error"]["type"] == "request_too_large"


def test_metrics_label_the_dialect(
    client: anthropic.Anthropic, dialect_server: RunningServer
) -> None:
    client.messages.count_tokens(model="x", messages=HELLO)
    text = httpx.get(dialect_server.url + "/metrics", headers={"x-api-key": API_KEY}).text
    found = re.findall(r'^llmserve_requests_total\{dialect="(\w+)",route="([^"]*)"', text, re.M)
    assert ("anthropic", "/v1/messages/count_tokens") in found


def test_error_types_by_status() -> None:
    def shape(exc: LLMServeError) -> tuple[int, str]:
        response = anthropic_error_response(exc)
        body = json.loads(bytes(response.body))
        assert body["type"] == "error" and body["error"]["message"] == exc.message
        return response.status_code, body["error"]["type"]

    assert shape(QueueFullError("full")) == (529, "overloaded_error")
    assert shape(EngineError("boom")) == (500, "api_error")
    limited = LLMServeError("slow down")
    limited.status = 429
    assert shape(limited) == (429, "rate_limit_error")
    assert anthropic_error_response(QueueFullError("full")).headers["retry-after"] == "1"


# ---- stream mechanics -------------------------------------------------------------------------


def _stats(server: RunningServer) -> EngineStats:
    models: ModelManager = server.app.state.models
    return models.loaded()[0].engine.stats()


def test_disconnect_mid_stream_frees_the_slot(
    dialect_server: RunningServer, overrides: SamplingOverrides
) -> None:
    overrides.set(None, {"ignore_eos": OverrideValue(override=True, force=True)})
    payload = json.dumps(
        {"model": "x", "max_tokens": 1500, "messages": HELLO, "stream": True}
    ).encode()
    head = (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"x-api-key: " + API_KEY.encode() + b"\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", dialect_server.port), timeout=60)
    sock.sendall(head + payload)
    received = b""
    while b"content_block_delta" not in received:
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


def test_pings_until_the_first_delta() -> None:
    async def main() -> list[Delta | None]:
        release = asyncio.Event()

        async def slow_prefill() -> AsyncIterator[Delta]:
            await release.wait()
            yield Delta(text="hi", finish_reason=FinishReason.STOP, usage=Usage(5, 1))

        stream = slow_prefill()
        first = asyncio.ensure_future(anext(stream))
        seen: list[Delta | None] = []
        async for item in with_pings(first, stream, 0.001):
            seen.append(item)
            if seen.count(None) == 3:
                release.set()  # the prefill ends after three pings
        return seen

    seen = asyncio.run(main())
    assert seen[:3] == [None, None, None]
    assert [d.text for d in seen[3:] if d is not None] == ["hi"]


def test_stop_reasons() -> None:
    length = Delta(finish_reason=FinishReason.LENGTH)
    timed_out = Delta(finish_reason=FinishReason.LENGTH, stop_reason="timeout")
    assert stop_reason_of(length) == ("max_tokens", None)
    assert stop_reason_of(timed_out) == ("max_tokens", None)  # request_timeout
    assert stop_reason_of(Delta(finish_reason=FinishReason.STOP, stop_reason=2)) == (
        "end_turn",
        None,
    )
    stopped = Delta(finish_reason=FinishReason.STOP, stop_reason="\n\n")
    assert stop_reason_of(stopped) == ("stop_sequence", "\n\n")
    with pytest.raises(ServiceUnavailableError):  # shutdown: an overloaded_error, not a reply
        stop_reason_of(Delta(finish_reason=FinishReason.ABORT))


def test_error_mid_stream_is_an_error_event() -> None:
    async def failing() -> AsyncIterator[Delta | None]:
        yield Delta(text="partial")
        raise EngineError("the engine failed")

    async def main() -> list[tuple[str, str]]:
        writer = MessageWriter("m", "msg_1", 4, None)
        return [(str(e.event), str(e.data)) async for e in writer.stream(failing())]

    events = asyncio.run(main())
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert json.loads(events[-1][1]) == {
        "type": "error",
        "error": {"type": "api_error", "message": "the engine failed"},
    }
