"""Load options that reach llama.cpp's context: RoPE frequency base and scale."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from llmserve.api.admin.protocol import ModelLoadRequest
from llmserve.config import Settings
from llmserve.core.errors import InvalidRequestError
from llmserve.core.request import FinishReason
from llmserve.engines.llamacpp.config import LlamaCppConfig
from llmserve.engines.llamacpp.settings import LlamaCppSettings
from llmserve.models.manager import ModelManager
from tests.engine.helpers import Driver, small_engine

GREEDY = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}


def test_rope_freq_scale_context_loads_and_generates(llm: Driver) -> None:
    engine = small_engine(ctx_size=256, parallel=1, rope_freq_scale=0.5)
    try:
        scaled = Driver(engine)
        prompt = scaled.prompt("Write a short poem about the sea.")
        completion = scaled.run(prompt, **GREEDY)
        assert completion.finish_reason is FinishReason.LENGTH
        assert len(completion.token_ids()) == 6
        # Positions are compressed 2x, so the same greedy request reads differently.
        assert completion.text() != llm.run(prompt, **GREEDY).text()
    finally:
        asyncio.run(engine.close())


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_bad_rope_values_are_refused(value: float) -> None:
    for option in ("rope_freq_base", "rope_freq_scale"):
        with pytest.raises(ValueError, match=option):
            LlamaCppConfig(model_path="m.gguf", model_id="m", **{option: value})  # type: ignore[arg-type]


def test_rope_options_flow_from_settings_and_admin_loads() -> None:
    manager = ModelManager(Settings(rope_freq_base=20000.0, rope_freq_scale=0.5))

    def config_for(request: ModelLoadRequest) -> LlamaCppConfig:
        settings = manager.engine_settings(request.engine_overrides())
        assert isinstance(settings, LlamaCppSettings)
        return LlamaCppConfig.from_settings(settings, Path("m.gguf"), "m")

    configured = config_for(ModelLoadRequest(model_name="m"))
    assert (configured.rope_freq_base, configured.rope_freq_scale) == (20000.0, 0.5)
    loaded = config_for(ModelLoadRequest(model_name="m", rope_freq_scale=0.25))
    assert (loaded.rope_freq_base, loaded.rope_freq_scale) == (20000.0, 0.25)
    tabby = config_for(ModelLoadRequest(model_name="m", max_seq_len=1024, cache_mode="Q4"))
    assert tabby.ctx_size == 1024  # TabbyAPI's name; its exllama-only field is ignored


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"rope_freq_scale": -1}, "rope_freq_scale"),
        ({"parallel": 0}, "parallel"),
        ({"parallel": "many"}, "parallel"),
        ({"engine": "nope"}, "engine"),
    ],
)
def test_bad_load_overrides_are_a_400_naming_the_setting(
    overrides: dict[str, object], param: str
) -> None:
    manager = ModelManager(Settings())
    with pytest.raises(InvalidRequestError) as caught:
        manager.engine_settings(overrides)
    assert caught.value.status == 400
    assert caught.value.param == param
