"""`/health?model=ID`, and requests to a model whose engine died while it is reloaded.

Real models (copies of the bundled GGUF) through the real engine, with httpx; the fake engine only
where a load must be held open to be seen `loading`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmserve.api.ops import model_health
from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.engines.base import Engine
from llmserve.engines.llamacpp.engine import LlamaCppEngine
from llmserve.engines.registry import EngineRegistry
from llmserve.models import manager as manager_module
from llmserve.models.defaults import default_model_path
from llmserve.models.manager import LoadedModel, LoadSource, ModelManager
from tests.api.test_engine_neutral import EchoFactory, EchoSettings
from tests.server import RunningServer, serve

API_KEY = "health-api-key"
ADMIN_KEY = "health-admin-key"
API = {"Authorization": f"Bearer {API_KEY}"}
HELLO = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("health")
    models = home / "models"
    models.mkdir()
    for name in ("h-a", "h-b", "h-file"):
        shutil.copy(default_model_path(), models / f"{name}.gguf")
    (models / "broken.gguf").write_text("this is not a model\n")
    (home / "api_tokens.yml").write_text(
        yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY})
    )
    configured = [
        {"id": "h-a"},
        {"id": "h-b", "autoload": True},
        {"id": "h-c", "path": str(models / "h-b.gguf")},  # loadable by the admin key only
        {"id": "h-broken", "path": str(models / "broken.gguf"), "autoload": True},
    ]
    settings = Settings(
        models=configured,  # type: ignore[arg-type]
        models_dir=models,
        api_tokens_file=home / "api_tokens.yml",
        max_loaded_models=3,
        ctx_size=512,
        parallel=2,
        threads=2,
    )
    with serve(create_app(settings)) as running:
        yield running


def health(server: RunningServer, model: str | None = None) -> httpx.Response:
    params = {"model": model} if model is not None else None
    return httpx.get(server.url + "/health", params=params, timeout=30)  # no key: it is open


def chat(server: RunningServer, model: str) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions",
        json={**HELLO, "model": model},
        headers=API,
        timeout=300,
    )


def settle(condition: Callable[[], bool], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_health_of_one_model(server: RunningServer) -> None:
    assert health(server, "h-a").json() == {"status": "ok", "model": "h-a", "state": "loaded"}
    for loadable in ("h-b", "h-c"):  # configured, not loaded: they can be loaded
        r = health(server, loadable)
        assert (r.status_code, r.json()["state"]) == (200, "available")
    # Names no request could be served by, and files of models_dir only the admin key sees.
    for unknown in ("nope", "h-file"):
        r = health(server, unknown)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
    assert chat(server, "h-b").status_code == 200
    assert health(server, "h-b:latest").json()["state"] == "loaded"
    broken = chat(server, "h-broken")
    assert broken.status_code == 400, broken.text
    r = health(server, "h-broken")
    assert (r.status_code, r.json()) == (
        503,
        {"status": "unavailable", "model": "h-broken", "state": "failed"},
    )
    assert health(server).status_code == 200  # the server itself still serves


def test_one_configured_model_answers_health_for_every_name(real_server: RunningServer) -> None:
    r = httpx.get(real_server.url + "/health", params={"model": "gpt-4"}, timeout=30)
    assert (r.status_code, r.json()["state"]) == (200, "loaded")


# ---- a dead engine: wait for its reload, or 503 with Retry-After ----


def real_engine(engine: Engine) -> LlamaCppEngine:
    """The llama.cpp engine inside the app's wrappers (metrics, deadline)."""
    while not isinstance(engine, LlamaCppEngine):
        engine = engine.inner  # type: ignore[attr-defined]
    return engine


def crash(model: LoadedModel) -> None:
    def fail() -> None:
        raise RuntimeError("simulated engine crash")

    real_engine(model.engine)._runner.step = fail  # type: ignore[method-assign]


@dataclasses.dataclass
class Gate:
    """Holds the reloads of a dead engine (at their file check) until opened; may fail one."""

    check: Callable[[LoadSource], Any]
    opened: threading.Event = dataclasses.field(default_factory=threading.Event)
    fail_next: bool = False
    calls: int = 0

    async def __call__(self, source: LoadSource) -> int:
        self.calls += 1
        await asyncio.to_thread(self.opened.wait)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated reload failure")
        result: int = await self.check(source)
        return result


def crashed(server: RunningServer, name: str) -> LoadedModel:
    """Crash `name`'s engine under a request; the request gets a clean 503, never a 500."""
    manager = server.app.state.models
    model = manager.get(name)
    crash(model)
    r = chat(server, name)
    assert r.status_code == 503, r.text
    assert settle(lambda: model.failed is not None)
    return model


def test_a_request_to_a_failed_model_waits_for_its_reload_or_gets_503(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = server.app.state.models
    assert chat(server, "h-b").status_code == 200
    gate = Gate(manager._check_file)
    monkeypatch.setattr(manager, "_check_file", gate)
    dead = crashed(server, "h-b")
    assert settle(lambda: gate.calls == 1)  # its reload started, and is held
    r = health(server, "h-b")
    assert (r.status_code, r.json()["state"]) == (503, "failed")
    assert health(server).status_code == 200  # h-a still serves

    # Past the bounded wait: 503 with Retry-After, in each dialect's shape.
    monkeypatch.setattr(manager_module, "REVIVE_WAIT_SECONDS", 0.2)
    openai = chat(server, "h-b")
    assert openai.status_code == 503 and openai.headers["retry-after"] == "1"
    assert openai.json()["error"]["type"] == "service_unavailable"
    assert "reloaded" in openai.json()["error"]["message"]
    ollama = httpx.post(
        server.url + "/api/chat",
        json={**HELLO, "model": "h-b", "stream": False},
        headers=API,
        timeout=60,
    )
    assert ollama.status_code == 503 and ollama.headers["retry-after"] == "1"
    assert "reloaded" in ollama.json()["error"]

    # Within it: the request waits for the reload and is answered by the new engine.
    monkeypatch.setattr(manager_module, "REVIVE_WAIT_SECONDS", 60.0)
    answers: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(chat(server, "h-b")))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive()  # still waiting: the reload is held
    gate.opened.set()
    waiting.join(timeout=120)
    assert [r.status_code for r in answers] == [200], answers[0].text if answers else None
    assert answers[0].json()["model"] == "h-b" and answers[0].json()["choices"][0]["message"]
    revived = manager.get("h-b")
    assert revived is not dead and revived.failed is None
    assert health(server, "h-b").json()["state"] == "loaded"


def test_a_reload_that_failed_is_tried_again_by_the_next_request(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = server.app.state.models
    assert chat(server, "h-b").status_code == 200
    gate = Gate(manager._check_file, fail_next=True)
    gate.opened.set()
    monkeypatch.setattr(manager, "_check_file", gate)
    dead = crashed(server, "h-b")
    assert settle(lambda: gate.calls == 1 and "h-b" not in manager._revivals)
    assert manager.get("h-b") is dead  # the first reload failed: still the failed model
    r = chat(server, "h-b")  # starts a second reload and waits for it
    assert r.status_code == 200, r.text
    assert gate.calls == 2
    assert manager.get("h-b") is not dead


# ---- `loading`, seen while a load is held ----


@dataclasses.dataclass
class HeldFactory(EchoFactory):
    """The echo engine, whose loads wait until `release` is set."""

    release: threading.Event = dataclasses.field(default_factory=threading.Event)

    def load(self, settings: EchoSettings, path: Path, model_id: str) -> Engine:
        self.release.wait(timeout=60)
        return super().load(settings, path, model_id)


def test_a_model_being_loaded_is_503_loading(tmp_path: Path) -> None:
    for name in ("x", "y"):
        (tmp_path / f"{name}.echo").write_text("echo\n")
    factory = HeldFactory()
    settings = Settings(
        engine="echo",
        models=[{"id": n, "path": str(tmp_path / f"{n}.echo"), "autoload": True} for n in "xy"],
        models_dir=tmp_path,
        max_loaded_models=2,
    )

    async def scenario() -> list[tuple[int, str]]:
        manager = ModelManager(settings, EngineRegistry([factory]))
        factory.release.set()
        await manager.load_configured()
        factory.release.clear()
        seen = [_health(manager, "y")]
        loading = asyncio.create_task(manager.acquire("y"))
        while manager.loading != "y":
            await asyncio.sleep(0.01)
        seen.append(_health(manager, "y"))
        factory.release.set()
        await loading
        seen.append(_health(manager, "y"))
        await manager.close()
        return seen

    assert asyncio.run(scenario()) == [(200, "available"), (503, "loading"), (200, "loaded")]


def _health(manager: ModelManager, name: str) -> tuple[int, str]:
    response = model_health(manager, name)
    state = json.loads(bytes(response.body))["state"]
    return response.status_code, str(state)
