"""The OpenAI API on the real default model through the real engine, with the openai SDK."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai

from llmserve.models.manager import ModelManager
from tests.server import RunningServer

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def test_chat_sync(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="gpt-3.5-turbo", messages=HELLO, max_tokens=24)
    assert r.object == "chat.completion"
    assert r.model == "SmolLM2-135M-Instruct.Q4_1"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_is_deterministic_and_stream_matches(client: openai.OpenAI) -> None:
    args = {"model": "any", "messages": HELLO, "max_tokens": 20, "temperature": 0}
    first = client.chat.completions.create(**args).choices[0].message.content
    second = client.chat.completions.create(**args).choices[0].message.content
    assert first == second
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(**args, stream=True)
        if chunk.choices
    )
    assert streamed == first


def test_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="x",
            messages=HELLO,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_stop_and_length(client: openai.OpenAI) -> None:
    r = client.completions.create(model="x", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert r.usage is not None and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    stop = text.strip()[:2]
    stopped = client.completions.create(
        model="x", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop]
    )
    assert stop not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_async_concurrent_requests(real_server: RunningServer) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0)
        async with client:
            results = await asyncio.gather(
                *[
                    client.completions.create(
                        model="x", prompt=f"Story {i}:", max_tokens=10, temperature=0
                    )
                    for i in range(4)
                ]
            )
        return [r.choices[0].text for r in results]

    texts = asyncio.run(main())
    assert len(texts) == 4 and all(texts)


def test_async_stream(real_server: RunningServer) -> None:
    async def main() -> str:
        client = openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0)
        async with client:
            stream = await client.chat.completions.create(
                model="x", messages=HELLO, max_tokens=10, temperature=0, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(main())


def _stats(real_server: RunningServer):  # type: ignore[no-untyped-def]
    models: ModelManager = real_server.app.state.models
    return models.loaded()[0].engine.stats()


def _wait_idle(real_server: RunningServer, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = _stats(real_server)
        if stats.running == 0 and stats.free_slots == stats.total_slots:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle after disconnect: {_stats(real_server)}")


def _raw_post(real_server: RunningServer, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", real_server.port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def test_streaming_disconnect_frees_slot(real_server: RunningServer) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    sock = _raw_post(real_server, body)
    received = b""
    while b"data:" not in received:  # headers may arrive before the first event
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    assert _stats(real_server).running == 1
    sock.close()
    _wait_idle(real_server)


def test_non_streaming_disconnect_frees_slot(real_server: RunningServer) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
    sock = _raw_post(real_server, body)
    deadline = time.monotonic() + 10
    while _stats(real_server).running == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _stats(real_server).running == 1
    sock.close()
    _wait_idle(real_server)


def test_health_and_models(real_server: RunningServer) -> None:
    assert httpx.get(real_server.url + "/health").json() == {"status": "ok"}
    models = httpx.get(real_server.url + "/v1/models").json()["data"]
    assert models[0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    assert models[0]["max_model_len"] == 2048


def test_penalty_range_minus_one_means_whole_context(client: openai.OpenAI) -> None:
    args = {"model": "x", "prompt": "a a a a a a a a", "max_tokens": 12, "temperature": 0}
    plain = client.completions.create(**args).choices[0].text
    penalized = (
        client.completions.create(
            **args, extra_body={"repetition_penalty": 3.0, "repetition_penalty_range": -1}
        )
        .choices[0]
        .text
    )
    off = (
        client.completions.create(
            **args, extra_body={"repetition_penalty": 3.0, "repetition_penalty_range": 0}
        )
        .choices[0]
        .text
    )
    assert penalized != plain
    assert off == plain
