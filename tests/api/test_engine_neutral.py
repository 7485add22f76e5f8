"""The engine-neutral core: no engine library outside engines/, a second engine behind the registry.

The second engine is the fake one, registered under another name: it declares fewer
capabilities than llama.cpp, so what it cannot do must be a 400 naming the field, while a chat
goes through the real HTTP stack (uvicorn, the openai SDK) exactly as with llama.cpp.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import Field

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.constraints import Choice, ConstraintKind, JsonObject, Regex
from llmserve.core.params import SamplingParams
from llmserve.engines.base import Capabilities, Engine, InvalidModelFileError
from llmserve.engines.registry import EngineRegistry, default_registry
from llmserve.engines.settings import EngineSettings
from llmserve.models.wrappers import unsupported_fields
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve

ECHO_CAPABILITIES = Capabilities(
    constraints=frozenset({ConstraintKind.CHOICE}),
    samplers=frozenset({"max_tokens", "temperature", "top_p", "stop", "n", "seed", "logprobs"}),
    adapters=False,
)

BLOCKED_IMPORTS = """
import importlib, importlib.abc, pkgutil, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("llama_cpp", "gguf", "vllm", "transformers", "torch"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocked())
import llmserve
# The engines' own modules need their libraries; everything else (their settings, config,
# factories too) must not. vLLM's other modules import it only inside the functions that use it.
ENGINE_MODULES = {
    "llamacpp": ("adapters", "batch", "embedding", "engine", "grammar", "inspect", "model",
                 "runner", "sampling", "scheduler", "gguf_header", "regex_gbnf"),
    "vllm": ("engine",),
}
imported = []
for info in pkgutil.walk_packages(llmserve.__path__, "llmserve."):
    parts = info.name.split(".")
    package = parts[2] if len(parts) > 3 and parts[1] == "engines" else ""
    in_engine = parts[-1] in ENGINE_MODULES.get(package, ())
    if parts[-1] == "__main__" or in_engine:
        continue
    importlib.import_module(info.name)
    imported.append(info.name)
assert not {"llama_cpp", "gguf", "vllm", "transformers", "torch"} & set(sys.modules)
from llmserve.app import create_app
from llmserve.config import Settings
create_app(Settings(disable_auth=True))
try:
    importlib.import_module("llmserve.engines.llamacpp.engine")
except ImportError:
    print("blocked-ok", len(imported))
"""


def test_nothing_outside_the_engine_imports_an_engine_library() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    status, count = result.stdout.split()
    assert status == "blocked-ok"  # the blocker works: llama.cpp's engine itself cannot load
    assert int(count) >= 40  # api, core, models, app, cli, config, ... all imported


# ---- a second engine ---------------------------------------------------------------------------


class EchoSettings(EngineSettings):
    """The fake engine's settings: the common ones and one of its own."""

    greeting: str = Field("hello", description="Recorded to show settings reach the factory.")


@dataclasses.dataclass
class EchoFactory:
    """Serves `.echo` files with the fake engine, which can do less than llama.cpp."""

    name: str = "echo"
    settings_type: type[EchoSettings] = EchoSettings
    model_suffixes: tuple[str, ...] = (".echo",)
    model_folders: bool = False
    loaded: list[EchoSettings] = dataclasses.field(default_factory=list)

    def default_model(self, data_dir: Path) -> Path:
        return data_dir / "default.echo"

    def prepare_default_model(self, data_dir: Path) -> Path:
        return self.default_model(data_dir)

    def check(self, settings: EchoSettings, path: Path, model_id: str) -> int:
        if path.suffix != ".echo" or not path.is_file():
            raise InvalidModelFileError(f"{path.name} is not an echo model")
        return 0

    def load(self, settings: EchoSettings, path: Path, model_id: str) -> Engine:
        self.loaded.append(settings)
        engine = FakeEngine()
        engine.info = dataclasses.replace(
            engine.info, id=model_id, path=str(path), capabilities=ECHO_CAPABILITIES
        )
        return engine


@pytest.fixture(scope="module")
def echo_factory() -> EchoFactory:
    return EchoFactory()


@pytest.fixture(scope="module")
def echo_server(
    echo_factory: EchoFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    models = tmp_path_factory.mktemp("echo-models")
    for name in ("first", "second"):
        (models / f"{name}.echo").write_text("echo\n")
    settings = Settings(
        model=str(models / "first.echo"),
        engine="echo",
        models_dir=models,
        disable_auth=True,
        api_tokens_file=models / "api_tokens.yml",
    )
    registry = default_registry()
    registry.register(echo_factory)
    with serve(create_app(settings, engines=registry)) as server:
        yield server


@pytest.fixture
def client(echo_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=echo_server.url + "/v1", api_key="none", max_retries=0)


def test_the_second_engine_serves_a_chat(client: openai.OpenAI, echo_factory: EchoFactory) -> None:
    reply = client.chat.completions.create(
        model="first", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert reply.model == "first"
    assert reply.choices[0].message.content == "alpha beta gamma "
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    chunks = client.chat.completions.create(
        model="first", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "alpha beta "
    assert echo_factory.loaded[0].greeting == "hello"


def test_a_constraint_kind_it_declares_is_served(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="first",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        extra_body={"guided_choice": ["alpha", "beta"]},
    )
    assert reply.choices[0].message.content  # the fake does not enforce it; it was accepted


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"guided_regex": "a+"}, "guided_regex"),
        ({"mirostat_mode": 2}, "mirostat"),
        ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ],
)
def test_what_the_engine_cannot_do_is_a_400_naming_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="first",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            extra_body=extra,
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["param"], error["code"]) == (param, "unsupported_parameter")


def test_tools_forced_on_an_engine_without_tool_constraints_is_a_400(
    client: openai.OpenAI,
) -> None:
    tool = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="first",
            messages=[{"role": "user", "content": "Time?"}],
            tools=[tool],  # type: ignore[list-item]
            tool_choice="required",
        )
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "tools"


def test_admin_loads_map_onto_the_chosen_engine_settings(
    echo_server: RunningServer, echo_factory: EchoFactory
) -> None:
    load = echo_server.url + "/v1/model/load"
    refused = httpx.post(load, json={"model_name": "second", "kv_unified": True}, timeout=30)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "kv_unified"  # llama.cpp's, not echo's
    unknown = httpx.post(load, json={"model_name": "second", "engine": "nope"}, timeout=30)
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (400, "engine")
    ok = httpx.post(
        load, json={"model_name": "second", "greeting": "hi", "ctx_size": 128}, timeout=30
    )
    assert ok.status_code == 200, ok.text
    assert (echo_factory.loaded[-1].greeting, echo_factory.loaded[-1].ctx_size) == ("hi", 128)
    models = httpx.get(echo_server.url + "/v1/models", timeout=30).json()["data"]
    assert models[0]["id"] == "second"
    lora = httpx.post(
        echo_server.url + "/v1/lora/load", json={"loras": [{"name": "x"}]}, timeout=30
    )
    assert lora.status_code in (400, 404)  # no such adapter, or an engine without adapters


# ---- the capability check itself ---------------------------------------------------------------


def test_unsupported_fields_names_constraints_and_samplers() -> None:
    everything = Capabilities()
    assert unsupported_fields(SamplingParams(repetition_penalty=1.2), everything) == []
    assert unsupported_fields(SamplingParams(constraint=JsonObject()), ECHO_CAPABILITIES) == [
        "response_format"
    ]
    assert (
        unsupported_fields(SamplingParams(constraint=Choice(("a",), "x")), ECHO_CAPABILITIES) == []
    )
    assert unsupported_fields(
        SamplingParams(constraint=Regex("a", "regex_pattern"), top_k=5, temperature=0.5),
        ECHO_CAPABILITIES,
    ) == ["regex_pattern", "top_k"]


def test_the_registry_refuses_unknown_engines_by_name() -> None:
    registry = EngineRegistry([EchoFactory()])
    assert registry.names == ["echo"]
    with pytest.raises(Exception) as caught:
        registry.get("vllm")
    assert getattr(caught.value, "param", None) == "engine"
    assert "echo" in str(caught.value)
