"""Which models are loaded, what they are called, and which one answers a request."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmserve.config import Settings
from llmserve.core.errors import ModelNotFoundError, ServiceUnavailableError
from llmserve.core.templates import ChatTemplate, load_template
from llmserve.engines.base import Engine
from llmserve.models.defaults import default_model_path

if TYPE_CHECKING:
    from llmserve.engines.llamacpp.engine import LlamaCppConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model that is serving: its engine, its names and its chat template."""

    id: str
    aliases: tuple[str, ...]
    engine: Engine
    template: ChatTemplate
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this model answers to."""
        return (self.id, *self.aliases)


class ModelManager:
    """Loads, names and resolves models; the only owner of engines."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._models: dict[str, LoadedModel] = {}
        self._lock = asyncio.Lock()
        self.load_error: str | None = None

    @property
    def ready(self) -> bool:
        """True when at least one model serves and its engine is alive."""
        return bool(self._models) and all(m.engine.stats().alive for m in self._models.values())

    def engine_error(self) -> str | None:
        """Why an engine stopped, if one did."""
        for model in self._models.values():
            stats = model.engine.stats()
            if not stats.alive:
                return f"engine of {model.id} stopped: {stats.error or 'unknown error'}"
        return None

    def loaded(self) -> list[LoadedModel]:
        """The loaded models, default first."""
        return list(self._models.values())

    async def load_configured(self) -> LoadedModel:
        """Load the model the settings name (or the bundled default)."""
        path = Path(self._settings.model) if self._settings.model else default_model_path()
        names = self._settings.served_model_name or [path.stem]
        template_file = Path(self._settings.chat_template) if self._settings.chat_template else None
        try:
            return await self.load(path, names, template_file)
        except Exception as exc:
            self.load_error = str(exc)
            raise

    async def load(
        self, path: Path, names: list[str], template_file: Path | None = None
    ) -> LoadedModel:
        """Load a GGUF in a worker thread and register it under `names`."""
        # Imported here so the HTTP layer (and its fake-engine tests) loads without llama.cpp.
        from llmserve.engines.llamacpp.engine import LlamaCppEngine

        config = self._engine_config(path, names[0])
        async with self._lock:
            engine = await asyncio.to_thread(LlamaCppEngine.load, config)
            try:
                template = self._template(engine, template_file)
            except Exception:
                await engine.close()
                raise
            return self.register(engine, names, template)

    def register(self, engine: Engine, names: list[str], template: ChatTemplate) -> LoadedModel:
        """Serve an already running engine under `names` (tests use this with a fake engine)."""
        model = LoadedModel(names[0], tuple(names[1:]), engine, template)
        self._models[model.id] = model
        log.info("model %s ready: %s (template: %s)", model.id, engine.info.path, template.origin)
        return model

    def resolve(self, requested: str | None) -> LoadedModel:
        """The model that answers a request naming `requested` (None: the default)."""
        if not self._models:
            raise ServiceUnavailableError(self.load_error or "no model is loaded yet")
        if requested is None:
            return next(iter(self._models.values()))
        for model in self._models.values():
            if requested in model.names:
                return model
        if len(self._models) == 1 and not self._settings.strict_model_names:
            model = next(iter(self._models.values()))
            log.debug("request names model %r; served by %s", requested, model.id)
            return model
        raise ModelNotFoundError(f"the model `{requested}` does not exist", param="model")

    def get(self, name: str) -> LoadedModel:
        """The loaded model called exactly `name`."""
        for model in self._models.values():
            if name in model.names:
                return model
        raise ModelNotFoundError(f"the model `{name}` does not exist", param="model")

    async def close(self) -> None:
        """Stop every engine."""
        for model in list(self._models.values()):
            await model.engine.close()
        self._models.clear()

    def _engine_config(self, path: Path, model_id: str) -> LlamaCppConfig:
        from llmserve.engines.llamacpp.engine import LlamaCppConfig

        s = self._settings
        return LlamaCppConfig(
            model_path=str(path),
            model_id=model_id,
            ctx_size=s.ctx_size,
            parallel=s.parallel,
            prefill_chunk=s.prefill_chunk,
            n_threads=s.threads,
            n_threads_batch=s.threads_batch,
            max_queue=s.max_queue,
            n_gpu_layers=s.n_gpu_layers,
            flash_attn=s.flash_attn,
            use_mmap=s.use_mmap,
            cache_type_k=s.cache_type_k,
            cache_type_v=s.cache_type_v,
        )

    @staticmethod
    def _template(engine: Engine, template_file: Path | None) -> ChatTemplate:
        info = engine.info
        if template_file is not None:
            source = template_file.read_text(encoding="utf-8")
            return load_template(
                source, f"file:{template_file.name}", info.bos_token, info.eos_token
            )
        return load_template(info.chat_template, "gguf", info.bos_token, info.eos_token)
