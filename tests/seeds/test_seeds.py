"""Every request example of the seed documents, replayed byte for byte against llmserve.

The bodies in data/ are copied from ../shared/seeds/ exactly as their curl commands send them:
the `-d '...'` argument as the shell hands it to curl (InstructLab's log excerpt quotes
'InvalidDirectiveHere' inside the single-quoted body, so the shell drops those two quotes).
Seeds that send keys run against a server started with those keys; seeds that send none
(TabbyAPI's curl, the AI Sandbox) run against a server with auth disabled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from llmserve.app import create_app
from llmserve.config import Settings
from tests.conftest import TEST_SETTINGS
from tests.server import RunningServer, serve

DATA = Path(__file__).parent / "data"
SEED_KEYS = ["token-1234", "ansible123!", "API-KEY", "YOUR_API_KEY"]
JSON = {"Content-Type": "application/json"}
CURL_ACCEPT = {"accept": "application/json"}


def body(name: str) -> bytes:
    return (DATA / name).read_bytes()


def curl_data_at_file(name: str) -> bytes:
    """What `curl -d @file` sends: the file with carriage returns and newlines removed."""
    return body(name).replace(b"\r", b"").replace(b"\n", b"")


# Seeds without max_tokens generate up to the rest of the context; 1024 tokens per sequence
# keeps that bounded while fitting every seed's prompt and requested length.
SEED_SETTINGS = {**TEST_SETTINGS, "ctx_size": 1024}


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tokens = tmp_path_factory.mktemp("seeds") / "api_tokens.yml"
    settings = Settings(api_key=SEED_KEYS, api_tokens_file=tokens, **SEED_SETTINGS)
    with serve(create_app(settings)) as server:
        yield server


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tokens = tmp_path_factory.mktemp("seeds-open") / "api_tokens.yml"
    settings = Settings(disable_auth=True, api_tokens_file=tokens, **SEED_SETTINGS)
    with serve(create_app(settings)) as server:
        yield server


def send(server: RunningServer, path: str, content: bytes, key: str | None) -> httpx.Response:
    headers = {**CURL_ACCEPT, **JSON}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(server.url + path, content=content, headers=headers, timeout=600)


def assert_completion(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "text_completion"
    assert {"id", "created", "model", "choices", "usage"} <= set(data)
    choice = data["choices"][0]
    assert isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    return data


def assert_chat(response: httpx.Response) -> dict:
    """The exact response shape the Lambda seed shows."""
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert data["model"] == "SmolLM2-135M-Instruct.Q4_1"
    choice = data["choices"][0]
    assert choice["index"] == 0
    message = choice["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str) and message["content"].strip()
    assert message["tool_calls"] == []
    assert choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    assert "stop_reason" in choice
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    return data


# ---- InstructLab (llama.cpp backend, --api-key) ----


def test_instructlab_completions_with_stop(keyed_server: RunningServer) -> None:
    data = assert_completion(
        send(
            keyed_server,
            "/v1/completions",
            body("instructlab_completions_token1234.json"),
            "token-1234",
        )
    )
    text = data["choices"][0]["text"]
    assert "\n" not in text and "###" not in text


def test_instructlab_chat_with_foreign_model_name(keyed_server: RunningServer) -> None:
    assert_chat(
        send(
            keyed_server, "/v1/chat/completions", body("instructlab_chat_model.json"), "ansible123!"
        )
    )


def test_instructlab_chat_without_model(keyed_server: RunningServer) -> None:
    assert_chat(
        send(
            keyed_server,
            "/v1/chat/completions",
            body("instructlab_chat_no_model.json"),
            "ansible123!",
        )
    )


def test_instructlab_completions_with_raw_newlines(keyed_server: RunningServer) -> None:
    raw = body("instructlab_completions_raw_newlines.json")
    prompt_start = raw.index(b'"prompt": "')
    prompt_end = raw.index(b'",\n  "stop"')
    assert b"\n" in raw[prompt_start:prompt_end], "the raw newline byte must stay inside the string"
    data = assert_completion(send(keyed_server, "/v1/completions", raw, "ansible123!"))
    assert data["usage"]["prompt_tokens"] > 200


# ---- Lambda Chat API (vLLM) ----


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_lambda_chat(keyed_server: RunningServer, path: str) -> None:
    assert_chat(send(keyed_server, path, curl_data_at_file("lambda_messages.json"), "API-KEY"))


def test_lambda_completions_body_sent_to_chat_is_pointed_to_completions(
    keyed_server: RunningServer,
) -> None:
    r = send(
        keyed_server, "/v1/chat/completions", curl_data_at_file("lambda_prompt.json"), "API-KEY"
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert "/v1/completions" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/completions", "/completions"])
def test_lambda_prompt_on_completions(keyed_server: RunningServer, path: str) -> None:
    assert_completion(send(keyed_server, path, curl_data_at_file("lambda_prompt.json"), "API-KEY"))


def test_lambda_models(keyed_server: RunningServer) -> None:
    for path in ("/v1/models", "/models"):
        r = httpx.get(keyed_server.url + path, headers={"Authorization": "Bearer API-KEY"})
        assert r.status_code == 200
        assert r.json()["data"][0]["object"] == "model"


# ---- TabbyAPI (auth disabled, as its curl sends no key) ----


def test_tabby_completions_with_min_p_and_repetition_penalty(open_server: RunningServer) -> None:
    data = assert_completion(
        send(open_server, "/v1/completions", body("tabby_completions.json"), None)
    )
    assert 0 < data["usage"]["completion_tokens"] <= 400


# ---- AI Sandbox (vLLM, no auth) ----


def test_sandbox_curl_chat(open_server: RunningServer) -> None:
    assert_chat(send(open_server, "/v1/chat/completions", body("sandbox_chat.json"), None))


def test_sandbox_openai_sdk(open_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=open_server.url + "/v1", api_key="not-needed", max_retries=0)
    response = client.chat.completions.create(
        model="mistralai/Mistral-7B-Instruct-v0.3",
        messages=[{"role": "user", "content": "Hello!"}],
    )
    assert response.choices[0].message.content


def test_sandbox_browser_fetch(open_server: RunningServer) -> None:
    # JSON.stringify output, sent cross-origin from a page as a browser would.
    payload = (
        b'{"model":"mistralai/Mistral-7B-Instruct-v0.3",'
        b'"messages":[{"role":"user","content":"Hello!"}]}'
    )
    r = httpx.post(
        open_server.url + "/v1/chat/completions",
        content=payload,
        headers={**JSON, "Origin": "http://127.0.0.1:3000"},
        timeout=120,
    )
    # Auth is off: loopback origins are let in (each echoed), others refused.
    assert r.headers["access-control-allow-origin"] == "http://127.0.0.1:3000"
    assert r.json()["choices"][0]["message"]["content"]


def test_sandbox_models_and_health(open_server: RunningServer) -> None:
    models = httpx.get(open_server.url + "/v1/models")
    assert models.status_code == 200 and models.json()["object"] == "list"
    assert httpx.get(open_server.url + "/health").status_code == 200
