"""The OpenAI dialect's HTTP layer over a fake engine: shapes, errors, streaming framing, CORS."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server import RunningServer


def post(server: RunningServer, path: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def sse_payloads(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") or line.startswith(":") for line in lines), lines
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def test_completion_shape(fake_server: RunningServer) -> None:
    r = post(fake_server, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == "fake-model"
    [choice] = body["choices"]
    assert choice["text"] == "alpha beta gamma "
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_chat_shape_matches_lambda_seed(fake_server: RunningServer) -> None:
    r = post(
        fake_server,
        "/chat/completions",
        {"model": "405bnmfp8", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"  # the model that really answered
    [choice] = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "alpha beta ",
        "refusal": None,
        "tool_calls": [],
    }
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    assert "stop_reason" in choice
    assert set(body["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_stop_string_and_stop_reason(fake_server: RunningServer) -> None:
    r = post(fake_server, "/v1/completions", {"prompt": "x", "max_tokens": 8, "stop": ["mma"]})
    [choice] = r.json()["choices"]
    assert choice["text"] == "alpha beta ga"
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "mma"


def test_prompt_forms(fake_server: RunningServer) -> None:
    for prompt, count in [("ab", 1), (["a", "b"], 2), ([97, 98], 1), ([[97], [98, 99]], 2)]:
        r = post(fake_server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "n": 2})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == list(range(2 * count))


def test_null_means_default_and_unknown_fields_ignored(fake_server: RunningServer) -> None:
    body = {
        "prompt": "a",
        "max_tokens": 2,
        "temperature": None,
        "top_p": None,
        "stop": None,
        "n": None,
        "seed": None,
        "some_vendor_field": {"x": 1},
    }
    r = post(fake_server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "alpha beta "


def test_max_completion_tokens_wins(fake_server: RunningServer) -> None:
    body = {
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 5,
        "max_completion_tokens": 1,
    }
    r = post(fake_server, "/v1/chat/completions", body)
    assert r.json()["choices"][0]["message"]["content"] == "alpha "


def test_chat_stream_framing_and_usage(fake_server: RunningServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = post(fake_server, "/v1/chat/completions", body)
    payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "alpha beta gamma "
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_completion_stream(fake_server: RunningServer) -> None:
    r = post(fake_server, "/v1/completions", {"prompt": "a", "max_tokens": 2, "stream": True})
    payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    texts = [json.loads(p)["choices"][0]["text"] for p in payloads[:-1]]
    assert "".join(texts) == "alpha beta "


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "temperature": -1}, "temperature"),
        ({"prompt": "a", "top_p": 2}, "top_p"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "max_tokens": -5}, "max_tokens"),
        ({"prompt": "a", "logprobs": 50}, "logprobs"),
        ({"prompt": "a", "top_a": 1.5}, "top_a"),
        ({"max_tokens": 1}, "prompt"),
    ],
)
def test_bad_completion_input_names_param(
    fake_server: RunningServer, body: dict, param: str
) -> None:
    r = post(fake_server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert "detail" not in r.json()


def test_bad_chat_input(fake_server: RunningServer) -> None:
    for body, param in [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ]:
        r = post(fake_server, "/v1/chat/completions", body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


def test_completions_body_on_chat_endpoint_points_to_completions(
    fake_server: RunningServer,
) -> None:
    r = post(fake_server, "/v1/chat/completions", {"model": "m", "prompt": "San Francisco is a"})
    assert r.status_code == 400
    assert "/v1/completions" in r.json()["error"]["message"]


def test_malformed_json_is_400(fake_server: RunningServer) -> None:
    r = httpx.post(
        fake_server.url + "/v1/completions",
        content=b'{"prompt": "a",',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_raw_newline_inside_json_string_is_accepted(fake_server: RunningServer) -> None:
    raw = b'{"prompt": "line one\nline two\ttabbed", "max_tokens": 1}'
    r = httpx.post(
        fake_server.url + "/v1/completions",
        content=raw,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len("line one\nline two\ttabbed")


def test_models_routes(fake_server: RunningServer) -> None:
    for path in ("/v1/models", "/models"):
        data = httpx.get(fake_server.url + path).json()
        assert data["object"] == "list"
        assert [m["id"] for m in data["data"]] == ["fake-model", "fake-alias"]
    card = httpx.get(fake_server.url + "/v1/models/fake-alias").json()
    assert card["id"] == "fake-alias" and card["object"] == "model"
    missing = httpx.get(fake_server.url + "/v1/models/gpt-3.5-turbo")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_unknown_route_is_openai_shaped_404(fake_server: RunningServer) -> None:
    r = httpx.get(fake_server.url + "/v1/nothing-here")
    assert r.status_code == 404
    assert "error" in r.json()


def test_health(fake_server: RunningServer) -> None:
    assert httpx.get(fake_server.url + "/health").status_code == 200


def test_cors_preflight_and_simple_request(fake_server: RunningServer) -> None:
    origin = "http://127.0.0.1:5173"
    r = httpx.options(
        fake_server.url + "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )
    assert r.status_code == 200
    # Auth is off here: loopback origins only, each echoed (tests/api/test_hosts.py has more).
    assert r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.get(fake_server.url + "/v1/models", headers={"Origin": origin})
    assert r.headers["access-control-allow-origin"] == origin


def test_context_length_exceeded_before_stream(fake_server: RunningServer) -> None:
    body = {"prompt": "a" * 200, "max_tokens": 100, "stream": True}
    r = post(fake_server, "/v1/completions", body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "200" in error["message"] and "100" in error["message"]


def test_body_too_large_is_413(fake_server: RunningServer) -> None:
    big = {"prompt": "a" * (9 << 20)}
    r = post(fake_server, "/v1/completions", big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(
        fake_server.url + "/v1/completions",
        content=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413


def test_request_id_echoed_or_generated(fake_server: RunningServer) -> None:
    r = httpx.get(fake_server.url + "/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = httpx.get(fake_server.url + "/v1/models").headers["x-request-id"]
    assert len(generated) == 32


def test_metrics_exposition(fake_server: RunningServer) -> None:
    post(fake_server, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    text = httpx.get(fake_server.url + "/metrics").text
    assert 'llmserve_requests_total{dialect="openai",route="/v1/completions",status="200"}' in text
    assert 'llmserve_tokens_total{kind="completion"}' in text
    assert "llmserve_time_to_first_token_seconds_count" in text
    assert "llmserve_inter_token_latency_seconds_bucket" in text
    for gauge in (
        "queue_depth",
        "running_sequences",
        "kv_cache_usage_ratio",
        "prefix_cache_hit_ratio",
    ):
        assert f'llmserve_{gauge}{{model="fake-model"}}' in text


def test_engine_failure_is_a_500_in_openai_shape(fake_server: RunningServer) -> None:
    r = post(fake_server, "/v1/completions", {"prompt": "fail-now", "max_tokens": 3})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error"
    assert (
        post(fake_server, "/v1/completions", {"prompt": "ok", "max_tokens": 1}).status_code == 200
    )


def test_engine_failure_mid_stream_is_a_final_error_event(fake_server: RunningServer) -> None:
    body = {"prompt": "fail-later", "max_tokens": 5, "stream": True}
    payloads = sse_payloads(post(fake_server, "/v1/completions", body))
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == "engine_error"
    assert json.loads(payloads[0])["choices"][0]["text"] == "alpha "


def test_invalid_utf8_and_wrong_content_type(fake_server: RunningServer) -> None:
    r = httpx.post(
        fake_server.url + "/v1/completions",
        content=b'{"prompt": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(
        fake_server.url + "/v1/completions",
        content=b"prompt=hi",
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(fake_server.url + "/v1/completions", data={"prompt": "hi"})
    assert r.status_code == 400 and "error" in r.json()


def test_wrong_types_name_the_field(fake_server: RunningServer) -> None:
    for body, param in [
        ({"prompt": "a", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "a", "stop": 5}, "stop"),
        ({"prompt": {"text": "a"}}, "prompt"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ]:
        r = post(fake_server, "/v1/completions", body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"].split(".")[0] == param, r.json()


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank", "/v1/score"])
def test_rerank_routes_are_a_clear_400(fake_server: RunningServer, path: str) -> None:
    r = httpx.post(fake_server.url + path, json={"query": "q", "documents": ["a", "b"]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "unsupported_endpoint"
    assert "embeddings" in r.json()["error"]["message"]


def test_image_parts_are_a_400_naming_the_content(fake_server: RunningServer) -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    r = httpx.post(fake_server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages.0.content"
    assert "'image_url'" in error["message"] and "only text parts" in error["message"]
