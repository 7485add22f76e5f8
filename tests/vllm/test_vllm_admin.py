"""The admin API on the vLLM engine: LoRA adapters (PEFT folders) and engine settings vLLM
cannot run, on the real model.

Runs in the vLLM half (LLMSERVE_TEST_ENGINE=vllm) on its own server started with enable_lora;
on llama.cpp the module skips (tests/admin/test_admin.py covers its GGUF adapters and loads).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.errors import InvalidRequestError
from llmserve.engines.base import AdapterSpec
from llmserve.models.manager import ModelManager
from tests.conftest import TEST_ENGINE, TEST_SETTINGS
from tests.lora_file import write_lora, write_peft_lora
from tests.server import RunningServer, serve, sse_chunks

pytestmark = pytest.mark.skipif(TEST_ENGINE != "vllm", reason="tests of the vLLM engine")

API_KEY = "api-key-for-lora-tests"
ADMIN_KEY = "admin-key-for-lora-tests"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"x-admin-key": ADMIN_KEY}
PROMPT = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vllm-lora")
    loras = root / "loras"
    write_peft_lora(loras / "smol-peft")
    write_peft_lora(loras / "no-op", zero=True)  # B = 0: the base model's output exactly
    write_peft_lora(loras / "wide", rank=32)  # above max_lora_rank
    write_lora(loras / "ggml.gguf")  # llama.cpp's kind
    (loras / "broken").mkdir()
    (loras / "broken" / "adapter_config.json").write_text("{")
    (root / "models").mkdir()
    (root / "models" / "smol-hf").symlink_to(TEST_SETTINGS["model"], target_is_directory=True)
    tokens = {"api_key": API_KEY, "admin_key": ADMIN_KEY}
    (root / "api_tokens.yml").write_text(yaml.safe_dump(tokens))
    return root


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[RunningServer]:
    settings = Settings(
        loras_dir=home / "loras",
        models_dir=home / "models",
        api_tokens_file=home / "api_tokens.yml",
        **{**TEST_SETTINGS, "enable_lora": True, "max_lora_rank": 16},
    )
    with serve(create_app(settings)) as running:
        yield running


def text(server: RunningServer) -> str:
    r = httpx.post(server.url + "/v1/completions", json=PROMPT, headers=API, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def load(server: RunningServer, *loras: dict[str, Any]) -> httpx.Response:
    body = {"loras": list(loras)}
    return httpx.post(server.url + "/v1/lora/load", json=body, headers=ADMIN, timeout=300)


def unload(server: RunningServer) -> None:
    r = httpx.post(server.url + "/v1/lora/unload", json={}, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text


def active(server: RunningServer) -> dict[str, bool]:
    r = httpx.get(server.url + "/v1/loras", headers=ADMIN, timeout=60)
    return {card["id"]: card["active"] for card in r.json()["data"]}


def test_peft_folders_and_files_are_listed(server: RunningServer) -> None:
    listed = active(server)
    assert set(listed) == {"broken", "ggml", "no-op", "smol-peft", "wide"}
    assert not any(listed.values())


def test_an_adapter_changes_output_and_unloading_restores_it(server: RunningServer) -> None:
    base = text(server)  # also puts the prompt in vLLM's prefix cache, without the adapter
    assert load(server, {"name": "smol-peft"}).status_code == 200
    assert active(server)["smol-peft"]
    adapted = text(server)
    assert adapted != base
    assert text(server) == adapted  # greedy and the same adapter: the same text
    unload(server)
    assert text(server) == base


def test_a_zero_adapter_leaves_the_output_as_it_was(server: RunningServer) -> None:
    base = text(server)
    assert load(server, {"name": "no-op"}).status_code == 200
    try:
        assert text(server) == base
    finally:
        unload(server)


REFUSED = {
    "rank above max_lora_rank": ([{"name": "wide"}], "--max-lora-rank"),
    "a GGUF file": ([{"name": "ggml"}], "PEFT adapter folders"),
    "damaged config": ([{"name": "broken"}], "not readable JSON"),
    "a scaling": ([{"name": "no-op", "scaling": 0.5}], "scaling must be 1.0"),
    "a second adapter": ([{"name": "no-op"}], "one LoRA adapter at a time"),
}


@pytest.mark.parametrize(("loras", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_what_vllm_cannot_apply_is_a_400_and_keeps_the_active_adapter(
    server: RunningServer, loras: list[dict[str, Any]], message: str
) -> None:
    assert load(server, {"name": "smol-peft"}).status_code == 200
    adapted = text(server)
    try:
        r = load(server, *loras)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "loras" and message in error["message"], error
        assert [name for name, on in active(server).items() if on] == ["smol-peft"]
        assert text(server) == adapted
    finally:
        unload(server)


def test_an_engine_started_without_lora_support_says_how_to_get_it(
    real_server: RunningServer, home: Path
) -> None:
    models: ModelManager = real_server.app.state.models
    engine = models.loaded()[0].engine
    spec = AdapterSpec(str(home / "loras" / "smol-peft"))
    with pytest.raises(InvalidRequestError, match="--enable-lora") as caught:
        asyncio.run(engine.set_adapters([spec]))
    assert caught.value.param == "loras"


UNRUNNABLE = {
    "heads not divisible": ({"tensor_parallel_size": 2}, None, "divisible by tensor parallel"),
    "ray on CPU": (
        {"distributed_executor_backend": "ray"},
        "distributed_executor_backend",
        "cannot run on Ray",
    ),
    "pipeline on CPU": ({"pipeline_parallel_size": 2}, "pipeline_parallel_size", "use 1 on CPU"),
}


@pytest.mark.parametrize(("overrides", "param", "message"), UNRUNNABLE.values(), ids=UNRUNNABLE)
def test_settings_vllm_cannot_run_are_a_400_before_it_starts(
    server: RunningServer, overrides: dict[str, Any], param: str | None, message: str
) -> None:
    body = {"model_name": "smol-hf", **overrides}
    r = httpx.post(server.url + "/v1/model/load", json=body, headers=ADMIN, timeout=300)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert text(server)  # the loaded model still serves


def test_swap_while_another_client_streams(server: RunningServer) -> None:
    """A load replaces the model; a stream already running on the old one finishes whole."""
    chunks: list[dict[str, Any]] = []

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True, "stream": True}
        chunks.extend(sse_chunks(server.url + "/v1/completions", body, API, timeout=300))

    before = httpx.get(server.url + "/v1/model", headers=API, timeout=60).json()["id"]
    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        body = {"model_name": "smol-hf", "max_seq_len": 1024, "enable_lora": True}
        r = httpx.post(server.url + "/v1/model/load", json=body, headers=ADMIN, timeout=600)
        assert r.status_code == 200, r.text
    finally:
        streamer.join(timeout=300)
    card = httpx.get(server.url + "/v1/model", headers=API, timeout=60).json()
    assert (card["id"], card["context_length"]) == ("smol-hf", 1024)
    assert chunks[0]["model"] == before != "smol-hf"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 90
    assert text(server)  # the new model serves
