"""Model lifetimes on the real engine: leases across swaps, shielded loads, bad files, crashes."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from gguf import GGUFWriter

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.engines.base import Engine
from llmserve.engines.llamacpp.engine import LlamaCppEngine
from llmserve.models.defaults import default_model_path
from tests.conftest import TEST_SETTINGS
from tests.server import RunningServer, serve

API_KEY = "lifecycle-api-key"
ADMIN_KEY = "lifecycle-admin-key"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"x-admin-key": ADMIN_KEY}
ROUNDS = 2  # per client in the swap test
HELLO = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4, "temperature": 0}


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> None:
    """A structurally valid GGUF that llama.cpp cannot load as a model."""
    writer = GGUFWriter(str(path), arch)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lifecycle")
    models = root / "models"
    models.mkdir()
    shutil.copy(default_model_path(), models / "life-a.gguf")
    shutil.copy(default_model_path(), models / "life-b.gguf")
    write_gguf(models / "no-model.gguf", "llama", {})
    write_gguf(models / "unknown-arch.gguf", "nosucharch", {"x": np.zeros((4, 4), np.float32)})
    write_gguf(models / "five-dims.gguf", "llama", {"x": np.zeros((1, 1, 1, 2, 2), np.float32)})
    (root / "api_tokens.yml").write_text(
        yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY})
    )
    return root


def settings_for(home: Path, **extra: object) -> Settings:
    return Settings(
        model=str(home / "models" / "life-a.gguf"),
        models_dir=home / "models",
        api_tokens_file=home / "api_tokens.yml",
        **{**TEST_SETTINGS, **extra},  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[RunningServer]:
    with serve(create_app(settings_for(home))) as running:
        yield running


def post(server: RunningServer, path: str, body: object, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def chat_model(server: RunningServer) -> str:
    r = post(server, "/v1/chat/completions", HELLO, API)
    assert r.status_code == 200, r.text
    return str(r.json()["model"])


def load(server: RunningServer, name: str, **options: object) -> httpx.Response:
    return post(server, "/v1/model/load", {"model_name": name, **options}, ADMIN)


def llamacpp_threads() -> int:
    """Engine threads of this module's models (each live engine runs exactly one)."""
    return sum(1 for t in threading.enumerate() if t.name.startswith("llamacpp-life-"))


def settle(condition: Callable[[], bool], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def real_engine(engine: Engine) -> LlamaCppEngine:
    """The llama.cpp engine inside the app's wrappers (metrics, deadline)."""
    while not isinstance(engine, LlamaCppEngine):
        engine = engine.inner  # type: ignore[attr-defined]
    return engine


# ---- item 2: leases ----


def client_round(server: RunningServer, i: int) -> list[tuple[str, int, bool]]:
    """One client's requests: tokenizer routes and generations, streaming and not.

    Returns (route, status, complete) per request; a 200 stream is complete when it ended
    with [DONE].
    """
    text = f"Client {i} tokenizes this sentence. " * 20
    chat = {**HELLO, "max_tokens": 8}
    calls: list[tuple[str, str, dict[str, object], bool]] = [
        ("encode", "/v1/token/encode", {"text": text}, False),
        ("tokenize", "/tokenize", {"prompt": text}, False),
        ("tokenize-chat", "/tokenize", {"messages": chat["messages"]}, False),
        ("chat", "/v1/chat/completions", chat, False),
        ("chat-stream", "/v1/chat/completions", {**chat, "stream": True}, True),
        (
            "completion-stream",
            "/v1/completions",
            {"prompt": text, "max_tokens": 8, "stream": True},
            True,
        ),
    ]
    outcomes = []
    for name, path, body, streaming in calls:
        if not streaming:
            status = post(server, path, body, API).status_code
            outcomes.append((name, status, True))
            continue
        with httpx.stream("POST", server.url + path, json=body, headers=API, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            outcomes.append(
                (name, r.status_code, r.status_code != 200 or lines[-1] == "data: [DONE]")
            )
    return outcomes


@pytest.mark.parametrize(
    ("steps", "allowed"),
    [
        # A swap always leaves a model serving, and a request keeps the engine it picked:
        # nothing may fail (a request on an engine closed under it would get a 503).
        (("life-b", "life-a"), {200}),
        # While nothing is loaded a request gets a clean 503; accepted ones still finish.
        (("unload", "life-a"), {200, 503}),
    ],
    ids=["swap", "unload"],
)
def test_swaps_and_unloads_while_clients_tokenize_and_generate(
    server: RunningServer, steps: tuple[str, ...], allowed: set[int]
) -> None:
    outcomes: list[tuple[str, int, bool]] = []
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            for _ in range(ROUNDS):
                outcomes.extend(client_round(server, i))
        except BaseException as exc:  # a dropped connection (a crashed server) lands here
            errors.append(exc)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in clients:
        thread.start()
    admin_statuses = []
    while any(thread.is_alive() for thread in clients):
        for step in steps:
            if step == "unload":
                admin_statuses.append(post(server, "/v1/model/unload", {}, ADMIN).status_code)
            else:
                admin_statuses.append(load(server, step).status_code)
    for thread in clients:
        thread.join()
    assert not errors
    assert len(outcomes) == 8 * ROUNDS * 6
    # 429 (queue full) would be acceptable too, but no queue limit is configured here.
    assert {status for _, status, _ in outcomes} <= allowed, outcomes
    assert all(complete for _, _, complete in outcomes)
    assert sum(1 for _, status, _ in outcomes if status == 200) > 0
    assert set(admin_statuses) == {200}
    assert chat_model(server) == "life-a"
    assert settle(lambda: llamacpp_threads() == 1)  # every swapped-out engine was freed


def test_an_unload_waits_for_the_request_that_holds_the_model(server: RunningServer) -> None:
    manager = server.app.state.models
    model = manager.loaded()[0]
    text = "word " * 1_500_000  # seconds of tokenizing, in a worker thread
    result: list[httpx.Response] = []
    encoder = threading.Thread(
        target=lambda: result.append(post(server, "/v1/token/encode", {"text": text}, API))
    )
    encoder.start()
    assert settle(lambda: model.users.count == 1)  # the request picked the model
    assert post(server, "/v1/model/unload", {}, ADMIN).status_code == 200
    time.sleep(0.5)
    still_tokenizing = encoder.is_alive()
    engine_threads = llamacpp_threads()
    encoder.join()
    assert still_tokenizing
    assert engine_threads == 1  # the unloaded engine stays while its lease is held
    assert result[0].status_code == 200
    assert result[0].json()["length"] == 1_500_000 + 1  # BOS + one token per word
    assert settle(lambda: llamacpp_threads() == 0)  # freed once the response was sent
    assert load(server, "life-a").status_code == 200


# ---- item 3: loading a file of models_dir by name ----


def test_loading_a_file_by_name_needs_the_admin_key(server: RunningServer) -> None:
    refused = post(server, "/v1/chat/completions", {**HELLO, "model": "life-b"}, API)
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert refused.json()["error"]["param"] == "model"
    assert chat_model(server) == "life-a"
    tokenize = post(server, "/tokenize", {"model": "life-b", "prompt": "hi"}, API)
    assert tokenize.status_code == 403
    loaded = post(server, "/v1/chat/completions", {**HELLO, "model": "life-b"}, ADMIN)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["model"] == "life-b"
    # Naming the loaded model, or a name that is not in the folder, needs no admin key.
    assert (
        post(server, "/v1/chat/completions", {**HELLO, "model": "life-b"}, API).status_code == 200
    )
    assert post(server, "/v1/chat/completions", {**HELLO, "model": "gpt-4"}, API).status_code == 200
    assert load(server, "life-a").status_code == 200


def send_and_hang_up(
    server: RunningServer, path: str, body: dict[str, object], until: Callable[[], bool]
) -> None:
    """Send a request with the admin key and close the connection once `until()` holds."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"x-admin-key: {ADMIN_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode() + payload)
        settle(until, timeout=30)  # then hang up regardless


def test_loads_whose_client_disconnects_leave_no_engine_behind(server: RunningServer) -> None:
    manager = server.app.state.models
    requests = [
        ("/v1/chat/completions", {**HELLO, "model": "life-b"}),
        ("/v1/chat/completions", {**HELLO, "model": "life-a"}),
        ("/v1/model/load", {"model_name": "life-b"}),
        ("/v1/model/load", {"model_name": "life-a", "stream": True}),
    ]
    for path, body in requests * 2:
        # Hang up while llama.cpp loads the weights: the load must still end registered.
        send_and_hang_up(server, path, body, lambda: manager.loading is not None)
        assert settle(lambda: manager.loading is None)
    send_and_hang_up(server, *requests[0], lambda: True)  # and while the file is checked
    assert settle(lambda: manager.loading is None)
    assert load(server, "life-a").status_code == 200
    assert settle(lambda: llamacpp_threads() == 1 and manager.live_engines() == 1)
    assert chat_model(server) == "life-a"


# ---- items 26 and 9: files and settings llama.cpp refuses ----


@pytest.mark.parametrize("name", ["no-model", "unknown-arch", "five-dims"])
def test_gguf_that_llama_cpp_refuses_is_a_400(server: RunningServer, name: str) -> None:
    r = load(server, name)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_model_file"
    assert chat_model(server) == "life-a"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"cache_type_k": "q3_weird"}, "cache_type_k"),
        ({"cache_type_v": "nonsense"}, "cache_type_v"),
        ({"cache_type_v": "q4_0", "flash_attn": False}, "cache_type_v"),
    ],
)
def test_bad_cache_type_is_a_400_naming_it(
    server: RunningServer, options: dict[str, object], param: str
) -> None:
    r = load(server, "life-b", **options)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert chat_model(server) == "life-a"
    assert settle(lambda: llamacpp_threads() == 1)


# ---- item 16: a dead engine is reloaded ----


def test_a_dead_engine_is_marked_failed_and_reloaded(server: RunningServer) -> None:
    manager = server.app.state.models
    model = manager.loaded()[0]
    engine = real_engine(model.engine)

    def crash() -> None:
        raise RuntimeError("simulated engine crash")

    engine._runner.step = crash  # type: ignore[method-assign]
    r = post(server, "/v1/chat/completions", HELLO, API)
    assert r.status_code == 503
    assert settle(lambda: manager.loaded() and manager.loaded()[0] is not model)
    assert model.failed is not None and "simulated engine crash" in model.failed
    assert chat_model(server) == "life-a"
    assert httpx.get(server.url + "/health").status_code == 200
    assert settle(lambda: llamacpp_threads() == 1)
