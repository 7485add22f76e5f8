"""Load options that reach llama.cpp's context: RoPE frequency base and scale."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from llmserve.api.admin.protocol import ModelLoadRequest
from llmserve.api.admin.serving import _load_options
from llmserve.config import Settings
from llmserve.core.request import FinishReason
from llmserve.engines.llamacpp import LlamaCppConfig
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
    configured = manager._engine_config(
        Path("m.gguf"), "m", _load_options(ModelLoadRequest(model_name="m"))
    )
    assert (configured.rope_freq_base, configured.rope_freq_scale) == (20000.0, 0.5)
    request = ModelLoadRequest(model_name="m", rope_freq_scale=0.25)
    loaded = manager._engine_config(Path("m.gguf"), "m", _load_options(request))
    assert (loaded.rope_freq_base, loaded.rope_freq_scale) == (20000.0, 0.25)
