"""The management API on the real model: permissions, loads, swaps, templates, presets, tokens."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.models.defaults import default_model_path
from tests.conftest import TEST_SETTINGS
from tests.lora_file import write_lora, write_peft_lora
from tests.server import RunningServer, serve, sse_chunks

API_KEY = "api-key-for-tests"
ADMIN_KEY = "admin-key-for-tests"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"x-admin-key": ADMIN_KEY}
HELLO = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("admin")
    models = root / "models"
    (models / "family").mkdir(parents=True)
    shutil.copy(default_model_path(), models / "smol-a.gguf")
    shutil.copy(default_model_path(), models / "family" / "smol-b.gguf")
    (models / "not-gguf.gguf").write_text("this is not a model\n")
    with default_model_path().open("rb") as src:
        (models / "truncated.gguf").write_bytes(src.read(4 << 20))
    write_lora(root / "loras" / "smol-lora.gguf")
    (root / "loras" / "broken.gguf").write_text("not an adapter\n")
    write_peft_lora(root / "loras" / "peft-folder")  # vLLM's kind: listed, refused by llama.cpp
    (root / "templates").mkdir()
    (root / "templates" / "plain.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    (root / "presets").mkdir()
    (root / "presets" / "short.yml").write_text(
        yaml.safe_dump({"max_tokens": {"override": 2, "force": True}})
    )
    (root / "api_tokens.yml").write_text(
        yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY})
    )
    return root


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[RunningServer]:
    settings = Settings(
        model=str(home / "models" / "smol-a.gguf"),
        models_dir=home / "models",
        loras_dir=home / "loras",
        templates_dir=home / "templates",
        sampler_overrides_dir=home / "presets",
        api_tokens_file=home / "api_tokens.yml",
        **TEST_SETTINGS,
    )
    with serve(create_app(settings)) as running:
        yield running


def get(server: RunningServer, path: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(server.url + path, headers=headers, timeout=120)


def post(server: RunningServer, path: str, body: object, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def chat_model(server: RunningServer) -> str:
    r = post(server, "/v1/chat/completions", HELLO, API)
    assert r.status_code == 200, r.text
    return str(r.json()["model"])


ADMIN_ROUTES = [
    ("/v1/model/unload", {}),
    ("/v1/model/load", {"model_name": "smol-a"}),
    ("/v1/lora/load", {"loras": [{"name": "x"}]}),
    ("/v1/lora/unload", {}),
    ("/v1/sampling/override/switch", {"preset": "short"}),
    ("/v1/sampling/override/unload", {}),
    ("/v1/template/switch", {"name": "plain"}),
    ("/v1/template/unload", {}),
]


@pytest.mark.parametrize(("path", "body"), ADMIN_ROUTES)
def test_admin_routes_need_the_admin_key(server: RunningServer, path: str, body: dict) -> None:
    assert post(server, path, body, {}).status_code == 401
    assert post(server, path, body, {"Authorization": "Bearer wrong"}).status_code == 401
    forbidden = post(server, path, body, API)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["type"] == "permission_error"


@pytest.mark.parametrize("path", ["/v1/model", "/v1/loras", "/v1/templates", "/tokenizer_info"])
def test_info_routes_need_an_api_key(server: RunningServer, path: str) -> None:
    assert get(server, path, {}).status_code == 401
    assert get(server, path, API).status_code == 200
    assert get(server, path, ADMIN).status_code == 200


def test_model_listing_depends_on_the_key(server: RunningServer) -> None:
    api_view = get(server, "/v1/models", API).json()["data"]
    assert [m["id"] for m in api_view] == ["smol-a"]
    admin_view = {m["id"]: m["loaded"] for m in get(server, "/v1/models", ADMIN).json()["data"]}
    assert admin_view == {"smol-a": True, "smol-b": False, "not-gguf": False, "truncated": False}


def test_model_card(server: RunningServer) -> None:
    card = get(server, "/v1/model", API).json()
    assert card["id"] == "smol-a"
    assert card["path"].endswith("smol-a.gguf")
    assert card["context_length"] == TEST_SETTINGS["ctx_size"]
    assert card["parameters"] > 100_000_000
    assert card["quantization"] == "Q4_1"
    assert card["chat_template_source"] == "gguf"


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("not-gguf", 400, "invalid_model_file"),
        ("truncated", 400, "invalid_model_file"),
        ("missing", 404, "not_found"),
        ("../models/smol-a", 400, None),
        ("/etc/passwd", 400, None),
    ],
)
def test_bad_loads_are_refused_and_the_old_model_keeps_serving(
    server: RunningServer, name: str, status: int, code: str | None
) -> None:
    r = post(server, "/v1/model/load", {"model_name": name}, ADMIN)
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code
    assert chat_model(server) == "smol-a"


def test_swap_while_another_client_streams(server: RunningServer) -> None:
    chunks: list[dict] = []

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 120, "ignore_eos": True, "stream": True}
        chunks.extend(sse_chunks(server.url + "/v1/completions", body, API, timeout=120))

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        r = post(server, "/v1/model/load", {"model_name": "smol-b", "max_seq_len": 1024}, ADMIN)
        assert r.status_code == 200, r.text
        assert chat_model(server) == "smol-b"
    finally:
        streamer.join(timeout=120)
    assert chunks[0]["model"] == "smol-a"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 100
    assert get(server, "/v1/model", API).json()["context_length"] == 1024


def test_streamed_load_reports_progress(server: RunningServer) -> None:
    body = {"model_name": "smol-a", "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/model/load", json=body, headers=ADMIN, timeout=120
    ) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    stages = [json.loads(e) for e in events[:-1]]
    assert [s["stage"] for s in stages] == ["validating", "loading", "ready"]
    assert stages[-1]["progress"] == 1.0 and stages[-1]["status"] == "finished"
    assert chat_model(server) == "smol-a"


def test_unload_then_requests_get_503_then_load(server: RunningServer) -> None:
    assert post(server, "/v1/model/unload", {}, ADMIN).json()["status"] == "unloaded"
    r = post(server, "/v1/chat/completions", HELLO, API)
    assert r.status_code == 503
    assert r.headers["retry-after"]
    assert httpx.get(server.url + "/health").status_code == 503
    assert post(server, "/v1/model/load", {"model_name": "smol-a"}, ADMIN).status_code == 200
    assert chat_model(server) == "smol-a"
    assert httpx.get(server.url + "/health").status_code == 200


def test_template_switch_and_unload(server: RunningServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    own = post(server, "/tokenize", body, API).json()["tokens"]
    listed = get(server, "/v1/templates", API).json()
    assert listed["data"] == ["plain"] and listed["active"] == "gguf"
    assert post(server, "/v1/template/switch", {"name": "plain"}, ADMIN).status_code == 200
    plain = post(server, "/tokenize", body, API).json()["tokens"]
    text = post(server, "/detokenize", {"tokens": plain}, API).json()["prompt"]
    assert text == "user: hi\nassistant:"
    assert post(server, "/v1/template/switch", {"name": "../etc/passwd"}, ADMIN).status_code == 400
    assert post(server, "/v1/template/unload", {}, ADMIN).status_code == 200
    assert post(server, "/tokenize", body, API).json()["tokens"] == own


def test_sampling_presets(server: RunningServer) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": True}

    def completion_tokens() -> int:
        return int(post(server, "/v1/completions", body, API).json()["usage"]["completion_tokens"])

    assert completion_tokens() == 10
    assert (
        post(server, "/v1/sampling/override/switch", {"preset": "short"}, ADMIN).status_code == 200
    )
    assert get(server, "/v1/sampling/overrides", API).json()["selected_preset"] == "short"
    assert completion_tokens() == 2  # forced
    inline = {"overrides": {"max_tokens": {"override": 3}}}
    assert post(server, "/v1/sampling/override/switch", inline, ADMIN).status_code == 200
    assert completion_tokens() == 10  # a default the request may change
    assert (
        int(
            post(server, "/v1/completions", {"prompt": "Hi", "ignore_eos": True}, API).json()[
                "usage"
            ]["completion_tokens"]
        )
        == 3
    )
    bad = {"overrides": {"temperature": {"override": -3}}}
    assert post(server, "/v1/sampling/override/switch", bad, ADMIN).status_code == 400
    assert post(server, "/v1/sampling/override/unload", {}, ADMIN).status_code == 200
    assert completion_tokens() == 10


def test_token_routes(server: RunningServer) -> None:
    encoded = post(server, "/v1/token/encode", {"text": "Hello world"}, API).json()
    assert encoded["length"] == len(encoded["tokens"]) > 0
    decoded = post(server, "/v1/token/decode", {"tokens": encoded["tokens"]}, API).json()
    assert decoded["text"].strip() == "Hello world"
    tokenized = post(
        server, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False}, API
    ).json()
    assert tokenized["count"] == len(tokenized["tokens"])
    assert tokenized["max_model_len"] == TEST_SETTINGS["ctx_size"]
    assert (
        post(server, "/detokenize", {"tokens": tokenized["tokens"]}, API).json()["prompt"]
        == "Hello world"
    )
    assert post(server, "/detokenize", {"tokens": [10**9]}, API).status_code == 400
    info = get(server, "/tokenizer_info", API).json()
    assert info["eos_token"] == "<|im_end|>" and info["eos_token_id"] == 2
    assert "im_start" in info["chat_template"]


def chat_text(server: RunningServer) -> str:
    r = post(server, "/v1/chat/completions", HELLO, API)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def lora_listing(server: RunningServer, headers: dict[str, str]) -> dict[str, tuple[bool, float]]:
    cards = get(server, "/v1/loras", headers).json()["data"]
    return {c["id"]: (c["active"], c["scaling"]) for c in cards}


def test_lora_load_list_and_unload(server: RunningServer) -> None:
    original = chat_text(server)
    inactive = (False, None)
    assert lora_listing(server, ADMIN) == dict.fromkeys(
        ["broken", "peft-folder", "smol-lora"], inactive
    )
    assert lora_listing(server, API) == {}
    load = {"loras": [{"name": "smol-lora", "scaling": 1.0}]}
    assert post(server, "/v1/lora/load", load, ADMIN).status_code == 200
    adapted = chat_text(server)
    assert adapted != original
    assert lora_listing(server, API) == {"smol-lora": (True, 1.0)}
    assert lora_listing(server, ADMIN)["smol-lora"] == (True, 1.0)
    refused = post(server, "/v1/lora/load", {"loras": [{"name": "broken"}]}, ADMIN)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "loras"
    assert post(server, "/v1/lora/load", {"loras": [{"name": "nope"}]}, ADMIN).status_code == 404
    folder = post(server, "/v1/lora/load", {"loras": [{"name": "peft-folder"}]}, ADMIN)
    assert folder.status_code == 400 and "GGUF" in folder.json()["error"]["message"]
    assert lora_listing(server, API) == {"smol-lora": (True, 1.0)}
    assert chat_text(server) == adapted
    assert post(server, "/v1/lora/unload", {}, ADMIN).json()["status"] == "unloaded"
    assert lora_listing(server, API) == {}
    assert chat_text(server) == original


def test_load_too_large_for_memory_is_refused(server: RunningServer) -> None:
    body = {"model_name": "smol-b", "max_seq_len": 1 << 20, "parallel": 256}
    r = post(server, "/v1/model/load", body, ADMIN)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "insufficient_memory"
    assert "MiB" in r.json()["error"]["message"]
    assert chat_model(server) == "smol-a"


def test_a_file_of_models_dir_loads_by_name_with_the_admin_key(home: Path) -> None:
    settings = Settings(
        model=str(home / "models" / "smol-a.gguf"),
        models_dir=home / "models",
        api_tokens_file=home / "api_tokens.yml",
        **TEST_SETTINGS,
    )
    with serve(create_app(settings)) as running:
        body = {**HELLO, "model": "smol-b"}
        # Loading a model is the admin's to decide (files of models_dir are never autoload).
        assert post(running, "/v1/chat/completions", body, API).status_code == 403
        r = post(running, "/v1/chat/completions", body, ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "smol-b"
        # A name that is not in the folder is still served by the loaded model.
        assert (
            post(running, "/v1/chat/completions", {**HELLO, "model": "gpt-4"}, API).json()["model"]
            == "smol-b"
        )
