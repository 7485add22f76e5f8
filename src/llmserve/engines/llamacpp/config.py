"""LlamaCppConfig: everything the llama.cpp engine is told, built from its settings in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from llmserve.engines.base import InvalidEngineSettingError
from llmserve.engines.llamacpp.settings import LlamaCppSettings

DEFAULT_MAX_CTX = 4096  # per-sequence context when the config leaves it to the model
# Without `parallel`, the KV cache may take 1/8 of the machine's memory, at most 4 GiB: one
# chat server serves many users, and the rest stays for weights, other models and the OS.
DEFAULT_KV_MEMORY_SHARE = 8
DEFAULT_KV_MEMORY_CAP = 4 << 30
MAX_DEFAULT_PARALLEL = 32  # more slots than this only add attention streams few servers fill
# llama.cpp's KV cache element types by name (model.py maps them onto ggml's enum).
KV_CACHE_TYPE_NAMES = frozenset(
    {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"}
)
POOLING_NAMES = frozenset({"mean", "cls", "last"})  # embedding.py maps them onto its poolings


@dataclass(frozen=True)
class LlamaCppConfig:
    """How to load a GGUF model and run it; None means "work it out from the model/machine"."""

    model_path: str
    model_id: str
    ctx_size: int | None = None  # per sequence; None: min(training context, 4096)
    parallel: int | None = None  # max running sequences; None: sized from ctx_size
    prefill_chunk: int = 512  # prompt tokens per step, so long prompts cannot stall decoding
    n_threads: int | None = None  # None: os.cpu_count()
    n_threads_batch: int | None = None  # None: os.cpu_count()
    max_queue: int | None = None  # requests waiting for a slot; None: unbounded
    n_gpu_layers: int = 0
    flash_attn: bool | None = None  # None: llama.cpp decides
    use_mmap: bool = True
    cache_type_k: str | None = None  # e.g. "f16", "q8_0"; None: llama.cpp's default
    cache_type_v: str | None = None
    rope_freq_base: float | None = None  # None (or 0): the model's RoPE base frequency
    rope_freq_scale: float | None = None  # None (or 0): the model's; 0.5 stretches context 2x
    # One KV buffer for all slots, or one stream per slot (False). Separate streams were ~20%
    # faster at 32 sequences here: attention then spans a slot's own cells, not every slot's.
    kv_unified: bool = False
    # Let llama.cpp repack weights for CPU-specific kernels (AMX, ...) at load. Off by default:
    # in VMs that advertise AMX without enabling it, the first llama_decode segfaults.
    cpu_repack: bool = False
    # Embedding pooling ("mean", "cls", "last"); None: the GGUF's, mean when it declares none.
    pooling: str | None = None

    def __post_init__(self) -> None:
        positive = {
            "ctx_size": self.ctx_size,
            "parallel": self.parallel,
            "prefill_chunk": self.prefill_chunk,
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads_batch,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise InvalidEngineSettingError(
                    f"{name} must be at least 1, got {value}", param=name
                )
        if self.max_queue is not None and self.max_queue < 0:
            raise InvalidEngineSettingError(
                f"max_queue must not be negative, got {self.max_queue}", param="max_queue"
            )
        for name, cache_type in (
            ("cache_type_k", self.cache_type_k),
            ("cache_type_v", self.cache_type_v),
        ):
            if cache_type is not None and cache_type not in KV_CACHE_TYPE_NAMES:
                raise InvalidEngineSettingError(
                    f"{name} must be one of {sorted(KV_CACHE_TYPE_NAMES)}, got {cache_type!r}",
                    param=name,
                )
        if self.pooling is not None and self.pooling not in POOLING_NAMES:
            raise InvalidEngineSettingError(
                f"pooling must be one of {sorted(POOLING_NAMES)}, got {self.pooling!r}",
                param="pooling",
            )
        for name, rope in (
            ("rope_freq_base", self.rope_freq_base),
            ("rope_freq_scale", self.rope_freq_scale),
        ):
            if rope is not None and not (math.isfinite(rope) and rope >= 0):
                raise InvalidEngineSettingError(
                    f"{name} must be a finite number >= 0, got {rope}", param=name
                )

    @classmethod
    def from_settings(cls, settings: LlamaCppSettings, path: Path, model_id: str) -> LlamaCppConfig:
        """The one mapping from the engine's settings onto its config."""
        return cls(
            model_path=str(path),
            model_id=model_id,
            ctx_size=settings.ctx_size,
            parallel=settings.parallel,
            prefill_chunk=settings.prefill_chunk,
            n_threads=settings.threads,
            n_threads_batch=settings.threads_batch,
            max_queue=settings.max_queue,
            n_gpu_layers=settings.n_gpu_layers,
            flash_attn=settings.flash_attn,
            use_mmap=settings.use_mmap,
            cache_type_k=settings.cache_type_k,
            cache_type_v=settings.cache_type_v,
            rope_freq_base=settings.rope_freq_base,
            rope_freq_scale=settings.rope_freq_scale,
            kv_unified=settings.kv_unified,
            pooling=settings.pooling,
        )

    def resolve_ctx_size(self, n_ctx_train: int) -> int:
        """Per-sequence context: the configured one, else the model's capped at 4096."""
        if self.ctx_size is not None:
            return self.ctx_size
        return max(1, min(n_ctx_train, DEFAULT_MAX_CTX))

    def resolve_parallel(
        self, ctx_size: int, kv_bytes_per_token: int, machine_memory: int | None
    ) -> int:
        """Running sequences: the configured number, else as many slots as the KV budget holds.

        Each slot owns `ctx_size` cells of `kv_bytes_per_token` (f16 K and V over all layers);
        the budget is `default_kv_budget(machine_memory)`. Between 1 and MAX_DEFAULT_PARALLEL.
        """
        if self.parallel is not None:
            return self.parallel
        slot_bytes = max(1, ctx_size * kv_bytes_per_token)
        return max(1, min(MAX_DEFAULT_PARALLEL, default_kv_budget(machine_memory) // slot_bytes))


def default_kv_budget(machine_memory: int | None) -> int:
    """Bytes the default slots' KV cache may take: 1/8 of the machine, at most 4 GiB."""
    if machine_memory is None:
        return DEFAULT_KV_MEMORY_CAP
    return min(DEFAULT_KV_MEMORY_CAP, machine_memory // DEFAULT_KV_MEMORY_SHARE)
