"""Which models are loaded, what they are called, and which one answers a request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from llmserve.config import Settings
from llmserve.core.errors import ModelNotFoundError, ServiceUnavailableError
from llmserve.core.templates import ChatTemplate, load_template
from llmserve.engines.base import Engine
from llmserve.models.defaults import default_model_path
from llmserve.models.inspect import InvalidModelFileError, check_fits, inspect_gguf
from llmserve.models.registry import FileEntry, list_files, resolve_file

if TYPE_CHECKING:
    from llmserve.engines.llamacpp.engine import LlamaCppConfig

log = logging.getLogger(__name__)

GGUF = (".gguf",)
LOAD_WAIT_SECONDS = 60.0  # how long a request waits for a model that is loading, then 503
RETIRE_WAIT_SECONDS = 600.0  # how long a swapped-out engine may finish its requests

ProgressCallback = Callable[[str, float], None]
EngineWrapper = Callable[[Engine], Engine]
T = TypeVar("T")


def _pick(override: T | None, configured: T) -> T:
    return configured if override is None else override


@dataclass(frozen=True)
class LoadOptions:
    """Per-load overrides of the engine settings; None keeps the configured value."""

    ctx_size: int | None = None
    parallel: int | None = None
    n_gpu_layers: int | None = None
    flash_attn: bool | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    use_mmap: bool | None = None
    rope_freq_base: float | None = None
    rope_freq_scale: float | None = None


@dataclass
class LoadedModel:
    """A model that is serving: its engine, its names and its chat template."""

    id: str
    aliases: tuple[str, ...]
    engine: Engine
    template: ChatTemplate
    gguf_template: ChatTemplate  # the model's own, restored by template unload
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this model answers to."""
        return (self.id, *self.aliases)

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        extra: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Render `messages` (and `tools`, if the template reads them) and tokenize the result."""
        text = self.template.render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, extra=extra
        )
        bos = self.template.bos_token
        # The template may already write BOS as text; don't let the tokenizer add a second one.
        return self.engine.tokenize(text, not (bos and text.startswith(bos)))


class ModelManager:
    """Loads, names, swaps and resolves models; the only owner of engines."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._models: dict[str, LoadedModel] = {}
        self._lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._retiring: set[asyncio.Task[None]] = set()
        self.loading: str | None = None
        self.load_error: str | None = None
        self._wrap: EngineWrapper = lambda engine: engine

    def wrap_engines(self, wrapper: EngineWrapper) -> None:
        """Wrap every engine, now and later (the app adds metrics this way)."""
        self._wrap = wrapper
        for model in self._models.values():
            model.engine = wrapper(model.engine)

    # ---- state ----

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

    def available(self) -> list[FileEntry]:
        """Every GGUF in the models folder (and one level of sub-folders)."""
        return list_files(self._settings.models_dir, GGUF)

    # ---- resolving ----

    def resolve(self, requested: str | None) -> LoadedModel:
        """The model that answers a request naming `requested` (None: the default)."""
        if not self._models:
            raise ServiceUnavailableError(self.load_error or "no model is loaded")
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

    async def acquire(self, requested: str | None) -> LoadedModel:
        """Like resolve, but waits for a load in progress and loads inline when configured."""
        if self._should_load_inline(requested):
            assert requested is not None
            return await self.load_named(requested)
        if not self._models and self.loading is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), LOAD_WAIT_SECONDS)
        return self.resolve(requested)

    def get(self, name: str) -> LoadedModel:
        """The loaded model called exactly `name`."""
        for model in self._models.values():
            if name in model.names:
                return model
        raise ModelNotFoundError(f"the model `{name}` does not exist", param="model")

    def _should_load_inline(self, requested: str | None) -> bool:
        if not requested or not self._settings.inline_model_loading or self._is_loaded(requested):
            return False
        return any(entry.name == requested for entry in self.available())

    def _is_loaded(self, name: str) -> bool:
        return any(name in model.names for model in self._models.values())

    # ---- loading ----

    async def load_configured(self) -> LoadedModel:
        """Load the model the settings name (or the bundled default)."""
        path = Path(self._settings.model) if self._settings.model else default_model_path()
        names = self._settings.served_model_name or [path.stem]
        template_file = Path(self._settings.chat_template) if self._settings.chat_template else None
        try:
            return await self._load(path, names, LoadOptions(), template_file)
        except Exception as exc:
            self.load_error = str(exc)
            raise

    async def load_named(
        self,
        name: str,
        options: LoadOptions | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> LoadedModel:
        """Validate and load a model of the models folder, then swap it in for the current one."""
        progress = on_progress or (lambda stage, fraction: None)
        path = resolve_file(self._settings.models_dir, name, GGUF, "model")
        progress("validating", 0.1)
        summary = await asyncio.to_thread(inspect_gguf, path)
        if summary.kind != "model":
            raise InvalidModelFileError(f"{path.name} is a {summary.kind}, not a model")
        config = self._engine_config(path, name, options or LoadOptions())
        ctx = config.resolve_ctx_size(summary.context_length or 4096)
        check_fits(summary, ctx * config.resolve_parallel(ctx))
        progress("loading", 0.3)
        model = await self._load(path, [name], options or LoadOptions(), None)
        progress("ready", 1.0)
        return model

    async def _load(
        self, path: Path, names: list[str], options: LoadOptions, template_file: Path | None
    ) -> LoadedModel:
        # Imported here so the HTTP layer (and its fake-engine tests) loads without llama.cpp.
        from llmserve.engines.llamacpp.engine import LlamaCppEngine

        config = self._engine_config(path, names[0], options)
        async with self._lock:
            self.loading = names[0]
            try:
                engine = await asyncio.to_thread(LlamaCppEngine.load, config)
                try:
                    template = self._template(engine, template_file)
                except Exception:
                    await engine.close()
                    raise
                return self._swap_in(engine, names, template)
            finally:
                self.loading = None

    def register(self, engine: Engine, names: list[str], template: ChatTemplate) -> LoadedModel:
        """Serve an already running engine under `names` (tests use this with a fake engine)."""
        model = LoadedModel(names[0], tuple(names[1:]), self._wrap(engine), template, template)
        self._models[model.id] = model
        self._ready.set()
        self.load_error = None
        log.info("model %s ready: %s (template: %s)", model.id, engine.info.path, template.origin)
        return model

    def _swap_in(self, engine: Engine, names: list[str], template: ChatTemplate) -> LoadedModel:
        previous = list(self._models.values())
        self._models.clear()
        model = self.register(engine, names, template)
        for old in previous:
            self._retire(old)
        return model

    async def unload(self) -> list[str]:
        """Stop serving every model; requests already running finish first."""
        async with self._lock:
            unloaded = [model.id for model in self._models.values()]
            for model in list(self._models.values()):
                self._retire(model)
            self._models.clear()
            self._ready.clear()
            return unloaded

    def _retire(self, model: LoadedModel) -> None:
        task = asyncio.create_task(self._drain_and_close(model))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _drain_and_close(model: LoadedModel) -> None:
        """Let requests already on a swapped-out engine finish, then free it."""
        deadline = time.monotonic() + RETIRE_WAIT_SECONDS
        while time.monotonic() < deadline:
            stats = model.engine.stats()
            if stats.running == 0 and stats.waiting == 0:
                break
            await asyncio.sleep(0.1)
        await model.engine.close()
        log.info("model %s unloaded", model.id)

    async def close(self) -> None:
        """Stop every engine, including ones still draining."""
        for model in list(self._models.values()):
            await model.engine.close()
        self._models.clear()
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

    # ---- templates ----

    def set_template(self, source: str | None, origin: str) -> None:
        """Switch the chat template of every loaded model; None restores each model's own."""
        for model in self._models.values():
            info = model.engine.info
            model.template = (
                load_template(source, origin, info.bos_token, info.eos_token)
                if source is not None
                else model.gguf_template
            )

    # ---- helpers ----

    def _engine_config(self, path: Path, model_id: str, options: LoadOptions) -> LlamaCppConfig:
        from llmserve.engines.llamacpp.engine import LlamaCppConfig

        s = self._settings
        pick = _pick
        return LlamaCppConfig(
            model_path=str(path),
            model_id=model_id,
            ctx_size=pick(options.ctx_size, s.ctx_size),
            parallel=pick(options.parallel, s.parallel),
            prefill_chunk=s.prefill_chunk,
            kv_unified=s.kv_unified,
            n_threads=s.threads,
            n_threads_batch=s.threads_batch,
            max_queue=s.max_queue,
            n_gpu_layers=pick(options.n_gpu_layers, s.n_gpu_layers),
            flash_attn=pick(options.flash_attn, s.flash_attn),
            use_mmap=pick(options.use_mmap, s.use_mmap),
            cache_type_k=pick(options.cache_type_k, s.cache_type_k),
            cache_type_v=pick(options.cache_type_v, s.cache_type_v),
            rope_freq_base=pick(options.rope_freq_base, s.rope_freq_base),
            rope_freq_scale=pick(options.rope_freq_scale, s.rope_freq_scale),
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
