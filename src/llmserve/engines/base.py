"""The contract every inference engine fulfils."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from llmserve.core.constraints import ConstraintKind
from llmserve.core.errors import InvalidRequestError
from llmserve.core.request import Delta, GenerationRequest

MODEL_FOLDER_MARKER = "config.json"  # what makes a folder a Hugging Face model
ADAPTER_FOLDER_MARKER = "adapter_config.json"  # and a folder a PEFT adapter (vLLM's LoRAs)


class InvalidModelFileError(InvalidRequestError):
    """The file is not a model the engine can load (400: the old model keeps serving)."""

    code = "invalid_model_file"


class InsufficientMemoryError(InvalidRequestError):
    """The model plus its KV cache would not fit in the memory available to it."""

    code = "insufficient_memory"


class InvalidEngineSettingError(InvalidRequestError, ValueError):
    """A load setting the engine cannot use: 400 naming the setting (`param`)."""


@dataclass(frozen=True)
class Capabilities:
    """What an engine can honour; requests asking for more get a 400 naming the field."""

    constraints: frozenset[ConstraintKind] = frozenset(ConstraintKind)
    # SamplingParams fields it honours at values other than their defaults; None: all of them.
    samplers: frozenset[str] | None = None
    adapters: bool = True  # LoRA adapters through set_adapters
    embeddings: bool = True  # pooled embedding vectors through embed


@dataclass(frozen=True)
class ModelInfo:
    """What the API layer needs to know about a loaded model."""

    id: str
    path: str
    context_length: int  # per sequence
    train_context_length: int
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    bos_token: str
    eos_token: str
    eog_token_ids: frozenset[int]
    chat_template: str | None  # Jinja source from the GGUF metadata, if any
    add_bos: bool  # the tokenizer adds BOS by itself
    n_params: int
    size_bytes: int
    description: str  # one line: architecture, size, quantization
    capabilities: Capabilities = field(default_factory=Capabilities)
    # Fill-in-the-middle token ids (llama.cpp's /infill); None when the vocabulary has none.
    fim_prefix: int | None = None
    fim_suffix: int | None = None
    fim_middle: int | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the scheduler, for tests and /metrics."""

    running: int
    waiting: int
    free_slots: int
    total_slots: int
    kv_cells_used: int
    kv_cells_total: int
    prompt_tokens_total: int
    cached_prompt_tokens_total: int
    generated_tokens_total: int
    steps_total: int
    alive: bool
    error: str | None = None
    busy_seconds_total: float = 0.0  # engine time spent stepping; the rest is idle
    decode_seconds_total: float = 0.0  # of that, inside the backend's forward pass


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter file and the scale to apply it at."""

    path: str
    scale: float = 1.0


class Engine(Protocol):
    """Runs generation requests for one loaded model."""

    info: ModelInfo

    def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream deltas for `req`; closing the iterator early aborts the request."""
        ...

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Text to token ids; special-token text (e.g. `<|im_end|>`) is parsed as such."""
        ...

    def detokenize(self, ids: list[int]) -> str:
        """Token ids back to text."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step; its stream ends with FinishReason.ABORT."""
        ...

    def stats(self) -> EngineStats:
        """Current scheduler state and counters."""
        ...

    async def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        """Apply exactly these LoRA adapters from the next step on (empty: none)."""
        ...

    async def embed(
        self, prompts: Sequence[list[int]], normalize: bool = True
    ) -> list[list[float]]:
        """One vector per prompt; L2-normalized unless normalize=False."""
        ...

    async def close(self) -> None:
        """Abort everything, stop the engine thread and free llama.cpp resources."""
        ...


class EngineFactory(Protocol):
    """One kind of engine: its settings, the files it loads, how it checks and starts them.

    `settings` is an instance of `settings_type`, validated from Settings and a load's
    overrides; both calls block (the manager runs them in a worker thread).
    """

    name: str
    settings_type: type[BaseModel]
    model_suffixes: tuple[str, ...]  # files in models_dir it can load
    model_folders: bool  # its models are folders (holding config.json), not files

    def default_model(self, data_dir: Path) -> Path:
        """Where the model served when none is named lives (it may not be made yet)."""
        ...

    def prepare_default_model(self, data_dir: Path) -> Path:
        """The default model, made under `data_dir` first if it must be (blocking)."""
        ...

    def check(self, settings: Any, path: Path, model_id: str) -> int:
        """Refuse (4xx) what the engine cannot load; else the bytes it will hold, estimated.

        InsufficientMemoryError when it would not fit in the memory free now (the manager
        may then unload idle models and ask again).
        """
        ...

    def load(self, settings: Any, path: Path, model_id: str) -> Engine:
        """A running engine for the model at `path`."""
        ...
