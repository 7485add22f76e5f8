"""Hostile bodies on every dialect (fake engine): raw bytes in, a 400 in the dialect's shape.

Lone surrogates, non-finite numbers, invalid UTF-8 and deep nesting are refused while the body
is parsed, naming the JSON path of the offending value; reserved `chat_template_kwargs` keys are
refused before rendering.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from llmserve.api.http import MAX_JSON_DEPTH, LenientJSONRoute
from tests.server import RunningServer

JSON = {"content-type": "application/json"}
CHAT = '"messages": [{"role": "user", "content": "hi"}]'

# (route, raw body, the JSON path the answer must name)
SURROGATES = [
    ("/v1/completions", r'{"prompt": "a\ud800b"}', "prompt"),
    ("/v1/completions", r'{"prompt": ["ok", "\udfff"]}', "prompt.1"),
    (
        "/v1/chat/completions",
        r'{"messages": [{"role": "user", "content": "\ud800"}]}',
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}',
        "messages.0.content.0.text",
    ),
    (
        "/v1/chat/completions",
        "{" + CHAT + r', "tools": [{"type": "function", "function": {"name": "f", '
        r'"parameters": {"type": "object", "properties": {"x": {"type": "string", '
        r'"description": "\ud800"}}}}}]}',
        "tools.0.function.parameters.properties.x.description",
    ),
    ("/v1/chat/completions", "{" + CHAT + r', "unknown": {"deep": ["\ud800"]}}', "unknown.deep.0"),
    ("/v1/token/encode", r'{"text": "\ud800"}', "text"),
    ("/tokenize", r'{"prompt": "\ud800"}', "prompt"),
    ("/tokenize", r'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages.0.content"),
    ("/api/v1/generate", r'{"prompt": "\ud800"}', "prompt"),
    ("/api/v1/generate", r'{"prompt": "hi", "banned_tokens": ["\udbff"]}', "banned_tokens.0"),
    ("/api/extra/generate/stream", r'{"prompt": "\ud800"}', "prompt"),
    ("/api/extra/tokencount", r'{"prompt": "\ud800"}', "prompt"),
    ("/inference", r'{"prompt": "\ud800"}', "prompt"),
    ("/inference", r'{"prompt": "hi", "stop": ["\ud800"]}', "stop.0"),
]

NON_FINITE = [
    ("/v1/completions", '{"prompt": "hi", "temperature": Infinity}', "temperature"),
    ("/v1/completions", '{"prompt": "hi", "top_p": NaN}', "top_p"),
    ("/v1/chat/completions", "{" + CHAT + ', "temperature": -Infinity}', "temperature"),
    ("/v1/chat/completions", "{" + CHAT + ', "presence_penalty": 1e999}', "presence_penalty"),
    ("/v1/chat/completions", "{" + CHAT + ', "logit_bias": {"5": NaN}}', "logit_bias.5"),
    ("/api/v1/generate", '{"prompt": "hi", "temperature": NaN}', "temperature"),
    ("/api/v1/generate", '{"prompt": "hi", "rep_pen": Infinity}', "rep_pen"),
    ("/inference", '{"prompt": "hi", "temperature": -1e400}', "temperature"),
    ("/tokenize", '{"prompt": "hi", "unknown": [1, NaN]}', "unknown.1"),
]

MAIN_ROUTES = [
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/token/encode",
    "/tokenize",
    "/api/v1/generate",
    "/api/extra/tokencount",
    "/inference",
]


def post_raw(server: RunningServer, path: str, body: bytes | str) -> httpx.Response:
    raw = body.encode() if isinstance(body, str) else body
    return httpx.post(server.url + path, content=raw, headers=JSON, timeout=30)


def assert_refused(response: httpx.Response, path: str, param: str | None) -> str:
    """A 400 in the dialect's own shape naming `param`; returns the message."""
    assert response.status_code == 400, response.text
    if path.startswith("/api/"):  # Kobold: {"detail": {"msg", "type"}}, no param field
        detail = response.json()["detail"]
        assert detail["type"] == "bad_input"
        if param is not None:
            assert detail["msg"].startswith(param + " ")
        return str(detail["msg"])
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    return str(error["message"])


@pytest.mark.parametrize(("path", "body", "param"), SURROGATES)
def test_lone_surrogates_are_refused_naming_the_field(
    fake_server: RunningServer, path: str, body: str, param: str
) -> None:
    assert_refused(post_raw(fake_server, path, body), path, param)


def test_a_surrogate_pair_is_text(fake_server: RunningServer) -> None:
    r = post_raw(fake_server, "/tokenize", r'{"prompt": "\ud83d\ude00"}')
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == [0x1F600]  # the fake engine's tokens are code points


def test_a_surrogate_in_a_field_name_is_refused(fake_server: RunningServer) -> None:
    body = "{" + CHAT + r', "extra": {"\ud800": 1}}'
    message = assert_refused(post_raw(fake_server, "/v1/chat/completions", body), "", "extra")
    assert "field name" in message


@pytest.mark.parametrize(("path", "body", "param"), NON_FINITE)
def test_non_finite_numbers_are_refused_naming_the_field(
    fake_server: RunningServer, path: str, body: str, param: str
) -> None:
    assert_refused(post_raw(fake_server, path, body), path, param)


@pytest.mark.parametrize("path", MAIN_ROUTES)
def test_invalid_utf8_is_a_client_error(fake_server: RunningServer, path: str) -> None:
    body = b'{"prompt": "caf\xe9 \xff", "text": "x", "messages": []}'
    message = assert_refused(post_raw(fake_server, path, body), path, None)
    assert "UTF-8" in message


@pytest.mark.parametrize("path", MAIN_ROUTES)
def test_a_body_nested_1e5_levels_is_refused(fake_server: RunningServer, path: str) -> None:
    message = assert_refused(post_raw(fake_server, path, "[" * 100_000), path, None)
    assert str(MAX_JSON_DEPTH) in message


@pytest.mark.parametrize("path", ["/inference", "/v1/completions", "/api/v1/generate"])
def test_an_unknown_field_nested_400_levels_is_refused(
    fake_server: RunningServer, path: str
) -> None:
    body = '{"prompt": "hi", "args": ' + "[" * 400 + "]" * 400 + "}"
    message = assert_refused(post_raw(fake_server, path, body), path, "args")
    assert str(MAX_JSON_DEPTH) in message


@pytest.mark.parametrize("path", ["/inference", "/v1/completions"])
def test_nesting_within_the_limit_is_served(fake_server: RunningServer, path: str) -> None:
    depth = MAX_JSON_DEPTH - 2  # Together echoes `args` into its answer
    body = '{"prompt": "hi", "max_tokens": 2, "args": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    r = post_raw(fake_server, path, body)
    assert r.status_code == 200, r.text


def api_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    """Every APIRoute, looking into included routers (FastAPI keeps them as they were built)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from api_routes(included.routes)


def test_every_route_parses_through_the_checked_parser(fake_server: RunningServer) -> None:
    routes = list(api_routes(fake_server.app.routes))
    assert routes
    assert [r.path for r in routes if not isinstance(r, LenientJSONRoute)] == []


@pytest.mark.parametrize(
    "key",
    ["messages", "add_generation_prompt", "tools", "bos_token", "eos_token", "raise_exception"],
)
def test_reserved_chat_template_kwargs_are_refused(fake_server: RunningServer, key: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {key: "x", "enable_thinking": False},
    }
    r = httpx.post(fake_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert_refused(r, "/v1/chat/completions", f"chat_template_kwargs.{key}")


def test_free_chat_template_kwargs_are_passed(fake_server: RunningServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {"enable_thinking": False},
        "max_tokens": 2,
    }
    r = httpx.post(fake_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
