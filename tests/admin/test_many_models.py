"""Several models on one server: loaded on demand by name, least recently used idle ones unloaded.

Real models (copies of the bundled GGUF, told apart by their per-model ctx_size) through the real
engine; a fake engine only where an exact memory estimate must be controlled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.errors import ModelNotFoundError
from llmserve.engines.registry import EngineRegistry
from llmserve.models.defaults import default_model_path
from llmserve.models.manager import ModelManager
from tests.api.test_engine_neutral import EchoFactory, EchoSettings
from tests.server import RunningServer, serve

API_KEY = "many-api-key"
ADMIN_KEY = "many-admin-key"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"x-admin-key": ADMIN_KEY}
CONTEXTS = {"m-a": 256, "m-b": 384, "m-c": 512, "m-d": 640}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("many")
    (home / "models").mkdir()
    for name in CONTEXTS:
        shutil.copy(default_model_path(), home / "models" / f"{name}.gguf")
    (home / "api_tokens.yml").write_text(
        yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY})
    )
    models = [
        {"id": "m-a", "ctx_size": CONTEXTS["m-a"]},
        {"id": "m-b", "ctx_size": CONTEXTS["m-b"], "autoload": True},
        {"id": "m-c", "ctx_size": CONTEXTS["m-c"], "autoload": True, "aliases": ["gamma"]},
        {"id": "m-d", "ctx_size": CONTEXTS["m-d"], "keep_alive": "1s"},
    ]
    settings = Settings(
        models=models,  # type: ignore[arg-type]
        models_dir=home / "models",
        api_tokens_file=home / "api_tokens.yml",
        max_loaded_models=2,
        fallback_model="m-a",
        parallel=2,
        threads=2,
    )
    with serve(create_app(settings)) as running:
        yield running


def chat(server: RunningServer, model: str, headers: dict[str, str] = API) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=300)


def statuses(server: RunningServer, headers: dict[str, str] = ADMIN) -> dict[str, str]:
    data = httpx.get(server.url + "/v1/models", headers=headers, timeout=30).json()["data"]
    return {card["id"]: card["status"] for card in data if card.get("parent") is None}


def test_listing_shows_what_a_key_may_use(server: RunningServer) -> None:
    assert statuses(server, API) == {"m-a": "loaded", "m-b": "available", "m-c": "available"}
    assert statuses(server)["m-d"] == "available"  # the admin sees models only it may load


def test_twelve_clients_naming_three_models_get_the_model_they_named(
    server: RunningServer,
) -> None:
    rng = random.Random(7)
    names = [rng.choice(["m-a", "m-b", "gamma"]) for _ in range(12)]
    results: list[tuple[str, httpx.Response]] = []

    def client(name: str) -> None:
        results.append((name, chat(server, name)))

    threads = [threading.Thread(target=client, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert len(results) == 12
    for name, response in results:
        assert response.status_code == 200, response.text
        expected = "m-c" if name == "gamma" else name
        assert response.json()["model"] == expected
        assert response.json()["choices"][0]["message"]["content"]
    loaded = [name for name, status in statuses(server).items() if status == "loaded"]
    assert len(loaded) <= 2 and "m-a" in loaded  # the limit, and the default stays


def test_the_answering_model_is_the_named_one(server: RunningServer) -> None:
    for name in ("m-c", "m-b"):
        assert chat(server, name).status_code == 200
        card = httpx.get(server.url + f"/v1/models/{name}", headers=API, timeout=30).json()
        assert card["max_model_len"] == CONTEXTS[name]


def test_loading_needs_the_admin_key_unless_autoload(server: RunningServer) -> None:
    refused = chat(server, "m-d")
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert "admin key" in refused.json()["error"]["message"]
    assert chat(server, "m-d", ADMIN).json()["model"] == "m-d"


def test_an_idle_model_past_its_keep_alive_is_unloaded(server: RunningServer) -> None:
    assert chat(server, "m-d", ADMIN).status_code == 200
    deadline = time.monotonic() + 60
    while statuses(server)["m-d"] == "loaded" and time.monotonic() < deadline:
        time.sleep(0.25)
    assert statuses(server)["m-d"] == "available"
    assert statuses(server)["m-a"] == "loaded"  # the default has no keep_alive


def test_unknown_names_go_to_the_fallback_model(server: RunningServer) -> None:
    response = chat(server, "gpt-4")
    assert response.status_code == 200 and response.json()["model"] == "m-a"
    assert chat(server, "m-b:latest").json()["model"] == "m-b"  # Ollama's default tag


def test_admin_unloads_one_model_by_name(server: RunningServer) -> None:
    assert chat(server, "m-b").status_code == 200
    r = httpx.post(
        server.url + "/v1/model/unload", json={"model_name": "m-b"}, headers=ADMIN, timeout=30
    )
    assert r.status_code == 200, r.text
    assert statuses(server)["m-b"] == "available"
    assert statuses(server)["m-a"] == "loaded"


# ---- limits, on engines whose size the test sets ---------------------------------------------


@dataclasses.dataclass
class SizedFactory(EchoFactory):
    """The echo engine, each model claiming 100 MiB."""

    def check(self, settings: EchoSettings, path: Path, model_id: str) -> int:
        super().check(settings, path, model_id)
        return 100 << 20


def sized_manager(tmp_path: Path, **settings: object) -> ModelManager:
    for name in ("x", "y", "z"):
        (tmp_path / f"{name}.echo").write_text("echo\n")
    config = Settings(
        engine="echo",
        models=[{"id": n, "path": str(tmp_path / f"{n}.echo"), "autoload": True} for n in "xyz"],
        models_dir=tmp_path,
        **settings,  # type: ignore[arg-type]
    )
    return ModelManager(config, EngineRegistry([SizedFactory()]))


def test_the_memory_budget_unloads_the_least_recently_used_idle_model(tmp_path: Path) -> None:
    async def scenario() -> list[list[str]]:
        manager = sized_manager(tmp_path, max_loaded_models=3, memory_budget_mb=250)
        await manager.load_configured()  # x, the default
        seen = []
        for name in ("y", "z", "y"):
            await manager.acquire(name)
            seen.append(sorted(m.id for m in manager.loaded()))
        await manager.close()
        return seen

    # 100 MiB each, 250 MiB budget: two fit; y goes for z (x is the default), then z for y.
    assert asyncio.run(scenario()) == [["x", "y"], ["x", "z"], ["x", "y"]]


def test_several_configured_models_make_unknown_names_404(tmp_path: Path) -> None:
    async def scenario() -> None:
        manager = sized_manager(tmp_path, max_loaded_models=2)
        await manager.load_configured()
        assert (await manager.acquire("y")).id == "y"
        with pytest.raises(ModelNotFoundError):
            await manager.acquire("gpt-4")
        await manager.close()

    asyncio.run(scenario())


def test_an_admin_load_may_set_the_keep_alive(server: RunningServer) -> None:
    body = {"model_name": "m-b", "keep_alive": "1s"}
    r = httpx.post(server.url + "/v1/model/load", json=body, headers=ADMIN, timeout=300)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while statuses(server)["m-b"] == "loaded" and time.monotonic() < deadline:
        time.sleep(0.25)
    assert statuses(server)["m-b"] == "available"
    bad = httpx.post(
        server.url + "/v1/model/load",
        json={"model_name": "m-b", "keep_alive": "soon"},
        headers=ADMIN,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"
