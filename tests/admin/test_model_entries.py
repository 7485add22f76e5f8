"""Per-model settings and per-key rules: a model's preset and LoRAs, admin routes on a named model,
who may load or use which model, in each dialect's error shape.

Real models (copies of the bundled GGUF) through the real engine, real HTTP clients. The per-key
allow-list is auth's to set; here a test middleware sets it from a header, as auth will.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.middleware import Middleware

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.errors import InvalidRequestError, NotFoundError
from llmserve.models.defaults import default_model_path
from llmserve.models.leases import Receive, Scope, Send, restrict_models
from tests.lora_file import write_lora
from tests.server import RunningServer, serve

API_KEY = "entries-api-key"
ADMIN_KEY = "entries-admin-key"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"x-admin-key": ADMIN_KEY}
ALLOW = "x-test-allowed-models"  # the test middleware's header: comma-separated model names
STORY = "Once upon a time"


class AllowListFromHeader:
    """Innermost middleware: restrict the request to the models its test header names."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Record the allow-list in the request's scope (LeaseScope, outside, opened it)."""
        value = dict(scope.get("headers", [])).get(ALLOW.encode())
        if scope["type"] == "http" and value is not None:
            restrict_models(value.decode().split(","))
        await self.app(scope, receive, send)


def write_home(root: Path) -> Path:
    (root / "models").mkdir()
    for name in ("p-a", "p-b", "p-l", "p-c"):
        shutil.copy(default_model_path(), root / "models" / f"{name}.gguf")
    write_lora(root / "loras" / "smol-lora.gguf")
    (root / "presets").mkdir()
    (root / "presets" / "short.yml").write_text(
        yaml.safe_dump({"max_tokens": {"override": 2, "force": True}})
    )
    (root / "presets" / "bad.yml").write_text(yaml.safe_dump({"temperature": -3}))
    (root / "templates").mkdir()
    (root / "templates" / "plain.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    (root / "api_tokens.yml").write_text(
        yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY})
    )
    return root


def settings_for(home: Path, models: list[dict[str, Any]]) -> Settings:
    return Settings(
        models=models,  # type: ignore[arg-type]
        models_dir=home / "models",
        loras_dir=home / "loras",
        sampler_overrides_dir=home / "presets",
        templates_dir=home / "templates",
        api_tokens_file=home / "api_tokens.yml",
        max_loaded_models=3,
        ctx_size=512,
        parallel=2,
        threads=2,
    )


MODELS: list[dict[str, Any]] = [
    {"id": "p-a"},
    {"id": "p-b", "preset": "short", "autoload": True, "aliases": ["bee"]},
    {"id": "p-l", "loras": ["smol-lora"], "autoload": True},
]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_home(tmp_path_factory.mktemp("entries"))


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[RunningServer]:
    app = create_app(settings_for(home, MODELS))
    app.user_middleware.append(Middleware(AllowListFromHeader))  # innermost: inside LeaseScope
    with serve(app) as running:
        yield running


def post(
    server: RunningServer, path: str, body: object, headers: dict[str, str] = API
) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=300)


def get(server: RunningServer, path: str, headers: dict[str, str] = API) -> httpx.Response:
    return httpx.get(server.url + path, headers=headers, timeout=60)


def chat_text(server: RunningServer, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return str(r.json()["choices"][0]["message"]["content"])


def completion_tokens(server: RunningServer, model: str) -> int:
    body = {"model": model, "prompt": STORY, "max_tokens": 10, "ignore_eos": True}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["completion_tokens"])


def lora_state(server: RunningServer, model: str | None) -> tuple[str, dict[str, object]]:
    query = f"?model={model}" if model else ""
    r = get(server, "/v1/loras" + query, ADMIN)
    assert r.status_code == 200, r.text
    listing = r.json()
    return listing["model"], {c["id"]: c["scaling"] for c in listing["data"] if c["active"]}


# ---- item 1: a model's preset and LoRAs ----


def test_a_models_preset_applies_to_its_requests_in_every_dialect(server: RunningServer) -> None:
    assert completion_tokens(server, "p-b") == 2  # short.yml forces max_tokens: 2
    assert completion_tokens(server, "bee") == 2  # by its alias too
    assert completion_tokens(server, "p-a") == 10  # the other model has no preset
    # Dialects that apply presets after picking the model (Anthropic, Ollama) see it too.
    messages = {"model": "p-b", "max_tokens": 10, "messages": [{"role": "user", "content": STORY}]}
    anthropic = post(server, "/v1/messages", messages)
    assert anthropic.status_code == 200, anthropic.text
    assert anthropic.json()["usage"]["output_tokens"] <= 2
    generate = {"model": "p-b", "prompt": STORY, "stream": False, "options": {"num_predict": 10}}
    ollama = post(server, "/api/generate", generate)
    assert ollama.status_code == 200, ollama.text
    assert ollama.json()["eval_count"] <= 2


def test_a_models_loras_are_applied_when_it_loads(server: RunningServer) -> None:
    assert chat_text(server, "p-l") != chat_text(server, "p-a")  # same weights, one adapter
    assert lora_state(server, "p-l") == ("p-l", {"smol-lora": 1.0})
    assert lora_state(server, None) == ("p-a", {})  # the list says whose adapters these are
    listing = get(server, "/v1/loras?model=p-l").json()
    assert listing["model"] == "p-l"
    assert [(c["id"], c["active"]) for c in listing["data"]] == [("smol-lora", True)]


# ---- item 2: admin LoRA and template routes on a named model ----


def test_lora_routes_act_on_the_named_model(server: RunningServer) -> None:
    base = chat_text(server, "p-a")
    chat_text(server, "p-l")  # loaded (autoload), with its configured adapter
    assert post(server, "/v1/lora/unload", {"model": "p-l"}, ADMIN).status_code == 200
    assert lora_state(server, "p-l") == ("p-l", {})
    assert chat_text(server, "p-l") == base  # without the adapter it is p-a's twin
    load = {"model": "p-l", "loras": [{"name": "smol-lora", "scaling": 1.0}]}
    assert post(server, "/v1/lora/load", load, ADMIN).status_code == 200
    assert lora_state(server, "p-l") == ("p-l", {"smol-lora": 1.0})
    assert lora_state(server, "p-a") == ("p-a", {})
    assert chat_text(server, "p-l") != base
    assert chat_text(server, "p-a") == base
    missing = post(server, "/v1/lora/load", {**load, "model": "nope"}, ADMIN)
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "model"
    unknown_lora = post(server, "/v1/lora/load", {"model": "p-l", "loras": [{"name": "x"}]}, ADMIN)
    assert unknown_lora.status_code == 404
    assert lora_state(server, "p-l") == ("p-l", {"smol-lora": 1.0})


def tokens(server: RunningServer, model: str) -> list[int]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    r = post(server, "/tokenize", body)
    assert r.status_code == 200, r.text
    return list(r.json()["tokens"])


def active_template(server: RunningServer, model: str) -> str:
    listing = get(server, f"/v1/templates?model={model}").json()
    assert listing["model"] == model and listing["data"] == ["plain"]
    return str(listing["active"])


def test_template_routes_act_on_the_named_model(server: RunningServer) -> None:
    own = tokens(server, "p-a")
    assert tokens(server, "p-b") == own
    switch = {"name": "plain", "model": "bee"}
    assert post(server, "/v1/template/switch", switch, ADMIN).status_code == 200
    plain = tokens(server, "p-b")
    text = post(server, "/detokenize", {"model": "p-b", "tokens": plain}).json()["prompt"]
    assert text == "user: hi\nassistant:"
    assert tokens(server, "p-a") == own  # the other model keeps its template
    assert active_template(server, "p-b") == "file:plain.jinja"
    assert active_template(server, "p-a") == "gguf"
    assert get(server, "/v1/templates").json()["model"] == "p-a"  # default: the default model
    assert post(server, "/v1/template/unload", {"model": "p-b"}, ADMIN).status_code == 200
    assert tokens(server, "p-b") == own
    missing = post(server, "/v1/template/switch", {"name": "plain", "model": "p-c"}, ADMIN)
    assert missing.status_code == 404  # p-c is not loaded


# ---- item 3: who may load a model ----


def test_an_api_key_may_not_load_a_model_in_each_dialects_shape(server: RunningServer) -> None:
    # p-c is a file of models_dir, not configured: the admin key alone loads it.
    chat = {"model": "p-c", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    openai = post(server, "/v1/chat/completions", chat)
    assert openai.status_code == 403
    assert openai.json()["error"]["type"] == "permission_error"
    assert "admin key" in openai.json()["error"]["message"]
    anthropic = post(server, "/v1/messages", chat)
    assert anthropic.status_code == 403
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "permission_error"
    ollama = post(server, "/api/chat", {**chat, "stream": False})
    assert ollama.status_code == 403
    assert "admin key" in ollama.json()["error"]
    # Kobold names no model: a key restricted away from the default model is refused there.
    kobold = post(server, "/api/v1/generate", {"prompt": "Hi"}, {**API, ALLOW: "p-b"})
    assert kobold.status_code == 403
    assert kobold.json()["detail"]["type"] == "forbidden"
    assert "may not use model `p-a`" in kobold.json()["detail"]["msg"]
    ids = [m["id"] for m in get(server, "/v1/models").json()["data"]]
    assert "p-c" not in ids
    admin_view = {m["id"]: m["status"] for m in get(server, "/v1/models", ADMIN).json()["data"]}
    assert admin_view.get("p-c") == "available"
    loaded = post(server, "/v1/chat/completions", chat, ADMIN)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["model"] == "p-c"
    assert post(server, "/v1/model/unload", {"model_name": "p-c"}, ADMIN).status_code == 200


# ---- item 6: per-key model allow-lists ----


def test_a_key_restricted_to_some_models_sees_and_uses_only_those(server: RunningServer) -> None:
    chat_text(server, "p-b")  # loaded, so that Ollama's tags list it
    only_b = {**API, ALLOW: "bee"}  # by alias
    ids = {m["id"] for m in get(server, "/v1/models", only_b).json()["data"]}
    assert ids == {"p-b", "bee"}  # its card and its alias's card
    tags = {m["name"] for m in get(server, "/api/tags", only_b).json()["models"]}
    assert tags == {"p-b:latest", "bee:latest"}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    allowed = post(server, "/v1/chat/completions", {**body, "model": "p-b"}, only_b)
    assert allowed.status_code == 200, allowed.text
    for refused in (
        post(server, "/v1/chat/completions", {**body, "model": "p-a"}, only_b),
        post(server, "/v1/chat/completions", body, only_b),  # no model: the default, p-a
    ):
        assert refused.status_code == 403
        assert refused.json()["error"]["message"] == "this key may not use model `p-a`"
    # A model it may not use is not loaded for it either.
    not_loaded = post(server, "/v1/chat/completions", {**body, "model": "p-c"}, only_b)
    assert not_loaded.status_code == 403
    assert "p-c" in not_loaded.json()["error"]["message"]
    assert get(server, "/v1/models/p-a", only_b).status_code == 404
    assert get(server, "/v1/models/p-b", only_b).status_code == 200
    everything = {m["id"] for m in get(server, "/v1/models").json()["data"]}
    assert {"p-a", "p-b"} <= everything


# ---- validation at start ----


@pytest.mark.parametrize(
    ("entry", "error", "words"),
    [
        ({"id": "p-b", "preset": "nope"}, NotFoundError, ["p-b", "preset", "nope"]),
        ({"id": "p-b", "preset": "bad"}, InvalidRequestError, ["p-b", "temperature"]),
        ({"id": "p-l", "loras": [{"name": "gone", "scaling": 0.5}]}, NotFoundError, ["gone"]),
    ],
)
def test_an_unknown_or_invalid_preset_or_lora_is_a_config_error(
    home: Path, entry: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    app = create_app(settings_for(home, [{"id": "p-a"}, entry]))
    with pytest.raises(error) as raised:
        app.state.models.check_entries()
    assert all(word in str(raised.value) for word in words)
    assert getattr(raised.value, "param", None) in ("preset", "loras")
    # Started for real, the server does not serve, and says why.
    with serve(app, wait_ready=False) as running:
        reason = start_failure(running)
        assert all(word in reason for word in words)


def start_failure(server: RunningServer) -> str:
    """Why the server cannot serve, once its start-up load has failed (/health's reason)."""
    for _ in range(600):
        health = httpx.get(server.url + "/health", timeout=30)
        assert health.status_code == 503
        if health.json()["reason"] != "loading":
            return str(health.json()["reason"])
        time.sleep(0.05)
    raise AssertionError("the start-up load neither failed nor finished")
