"""The llama.cpp engine's settings, as config.yml, the environment, flags and loads give them.

Imports nothing of llama.cpp: Settings and the admin API are built from this model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmserve.engines.settings import EngineSettings


class LlamaCppSettings(EngineSettings):
    """Settings of the llama.cpp engine (besides those every engine has)."""

    prefill_chunk: int = Field(
        512, ge=16, description="Prompt tokens prefilled per step, between decode steps."
    )
    threads: int | None = Field(None, ge=1, description="llama.cpp threads for decoding.")
    threads_batch: int | None = Field(
        None, ge=1, description="llama.cpp threads for prompt processing."
    )
    kv_unified: bool = Field(
        False,
        description="One KV buffer for all slots instead of one per slot (slower when many run).",
    )
    n_gpu_layers: int = Field(0, ge=0, description="Layers offloaded to a GPU, if built with one.")
    flash_attn: bool | None = Field(
        None, description="Use flash attention (empty: llama.cpp's choice)."
    )
    use_mmap: bool = Field(True, description="Memory-map the model file.")
    cache_type_k: str | None = Field(None, description="KV cache type for K (f16, q8_0, ...).")
    cache_type_v: str | None = Field(None, description="KV cache type for V (f16, q8_0, ...).")
    rope_freq_base: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="RoPE base frequency (empty or 0: the model's own).",
    )
    rope_freq_scale: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="RoPE frequency scale; 0.5 stretches the context 2x (empty or 0: the model's).",
    )
    pooling: Literal["mean", "cls", "last"] | None = Field(
        None,
        description="Embedding pooling: mean, cls or last (empty: the GGUF's, else mean).",
    )
