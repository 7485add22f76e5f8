"""The vLLM engine's settings, as config.yml, the environment, flags and loads give them.

Imports nothing of vLLM: Settings and the admin API are built from this model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmserve.engines.settings import EngineSettings


class VllmSettings(EngineSettings):
    """Settings of the vLLM engine (besides those every engine has).

    `ctx_size` is vLLM's max_model_len and `parallel` its max_num_seqs.
    """

    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM: GPUs each layer is split across (tensor parallel)."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="vLLM: stages the layers are split into (pipeline parallel, nodes)."
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None,
        description="vLLM: how workers run: mp (processes on this machine) or ray (a Ray "
        "cluster, for several nodes); empty: vLLM's choice.",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM: share of each GPU's memory it may take."
    )
    dtype: str = Field(
        "auto", description="vLLM: weight and activation type (auto, bfloat16, float16, float32)."
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="vLLM: KV cache size in GiB (on CPU: VLLM_CPU_KVCACHE_SPACE, rounded up "
        "to whole GiB; empty: 2 on CPU, gpu_memory_utilization on a GPU).",
    )
    enforce_eager: bool = Field(
        False,
        description="vLLM: no torch.compile or CUDA graphs (starts much faster, runs slower).",
    )
    enable_lora: bool = Field(
        False,
        description="vLLM: serve LoRA adapters (PEFT folders in loras_dir, one at a time); "
        "reserves memory for them and slows every step a little.",
    )
    max_lora_rank: int = Field(
        16, ge=1, le=512, description="vLLM: the largest adapter rank it can apply (enable_lora)."
    )
    vllm_args: list[str] = Field(
        [],
        description="vLLM: any other engine argument as NAME=VALUE (VALUE read as JSON when it "
        "parses, e.g. enable_chunked_prefill=false, max_num_batched_tokens=4096).",
    )
