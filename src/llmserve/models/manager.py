"""Which models are loaded, what they are called, and which one answers a request.

Lifetimes: a request leases the model it picks (see `leases`), and a swapped-out or unloaded
engine is closed only when its last lease is gone (at most RETIRE_WAIT_SECONDS later). Loads
run as tasks of their own, shielded from the request that asked for them, so a client that
disconnects mid-load still leaves the engine registered, never orphaned. A monitor notices an
engine whose thread died, marks its model failed and reloads it from the same file; when that
fails and nothing else can serve, the `on_fatal` callbacks run (the server then exits non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from llmserve.config import Settings
from llmserve.core.continuation import render_continuation
from llmserve.core.errors import (
    LLMServeError,
    ModelNotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from llmserve.core.templates import ChatTemplate, load_template, read_template_file
from llmserve.engines.base import Engine, EngineFactory, InvalidEngineSettingError
from llmserve.engines.registry import EngineRegistry, default_registry
from llmserve.engines.settings import EngineSettings
from llmserve.models import leases
from llmserve.models.defaults import default_model_path
from llmserve.models.leases import LeaseCount
from llmserve.models.registry import FileEntry, list_files, resolve_file

log = logging.getLogger(__name__)

LOAD_WAIT_SECONDS = 60.0  # how long a request waits for a model that is loading, then 503
RETIRE_WAIT_SECONDS = 600.0  # how long a swapped-out engine may finish its requests
DRAIN_POLL_SECONDS = 0.05
MONITOR_SECONDS = 0.5  # how often the monitor looks for dead engine threads

ProgressCallback = Callable[[str, float], None]
EngineWrapper = Callable[[Engine], Engine]
FatalCallback = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class LoadSource:
    """Where a loaded model came from, so a dead engine can be loaded again the same way."""

    path: Path
    names: tuple[str, ...]
    engine: EngineSettings  # an instance of the chosen engine's own settings model
    template_file: Path | None = None


@dataclass
class LoadedModel:
    """A model that is serving: its engine, its names and its chat template."""

    id: str
    aliases: tuple[str, ...]
    engine: Engine
    template: ChatTemplate
    gguf_template: ChatTemplate  # the model's own, restored by template unload
    created: int = field(default_factory=lambda: int(time.time()))
    source: LoadSource | None = None  # None: registered from outside (tests), not reloadable
    users: LeaseCount = field(default_factory=LeaseCount)  # requests holding this model
    failed: str | None = None  # why its engine stopped, once the monitor noticed

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
        continue_final: bool = False,
    ) -> list[int]:
        """Render `messages` (and `tools`, if the template reads them) and tokenize the result.

        `continue_final`: the prompt ends inside the final message (see core/continuation).
        """
        if continue_final:
            text = render_continuation(self.template, messages, tools=tools, extra=extra)
        else:
            text = self.template.render(
                messages, add_generation_prompt=add_generation_prompt, tools=tools, extra=extra
            )
        bos = self.template.bos_token
        # The template may already write BOS as text; don't let the tokenizer add a second one.
        return self.engine.tokenize(text, not (bos and text.startswith(bos)))


class ModelManager:
    """Loads, names, swaps and resolves models; the only owner of engines."""

    def __init__(self, settings: Settings, engines: EngineRegistry | None = None):
        self._settings = settings
        self.engines = engines or default_registry()
        self._models: dict[str, LoadedModel] = {}
        self._lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._retiring: dict[asyncio.Task[None], LoadedModel] = {}
        self._loads: set[asyncio.Task[Any]] = set()
        self._revivals: set[asyncio.Task[None]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._fatal_callbacks: list[FatalCallback] = []
        self.loading: str | None = None
        self.load_error: str | None = None
        self.fatal_error: str | None = None
        self._wrap: EngineWrapper = lambda engine: engine

    def wrap_engines(self, wrapper: EngineWrapper) -> None:
        """Wrap every engine, now and later (the app adds metrics this way)."""
        self._wrap = wrapper
        for model in self._models.values():
            model.engine = wrapper(model.engine)

    def on_fatal(self, callback: FatalCallback) -> None:
        """Call `callback(reason)` when no model can serve and none could be loaded."""
        self._fatal_callbacks.append(callback)

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
        """Every model file of the configured engine in the models folder (and sub-folders)."""
        return list_files(self._settings.models_dir, self._model_suffixes())

    def _model_suffixes(self) -> tuple[str, ...]:
        return self.engines.get(self._settings.engine).model_suffixes

    def live_engines(self) -> int:
        """Engines not yet closed: serving plus draining (tests bound this)."""
        return len(self._models) + len(self._retiring)

    # ---- resolving ----

    def resolve(self, requested: str | None) -> LoadedModel:
        """The model that answers a request naming `requested` (None: the default).

        Inside an HTTP request the model is leased until the response has been sent.
        """
        model = self._pick(requested)
        self._notice_death(model)
        leases.lease(model.users)
        return model

    def _pick(self, requested: str | None) -> LoadedModel:
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
            if not leases.may_load_models():
                raise PermissionDeniedError(
                    f"loading the model `{requested}` needs the admin key", param="model"
                )
            await self.load_named(requested)
        elif not self._models and self.loading is not None:
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
        """Check and load the model the settings name (or the bundled default)."""
        path = Path(self._settings.model) if self._settings.model else default_model_path()
        names = self._settings.served_model_name or [path.stem]
        template_file = Path(self._settings.chat_template) if self._settings.chat_template else None
        source = LoadSource(path, tuple(names), self.engine_settings(), template_file)
        self.loading = source.names[0]  # requests wait for the start-up model, checks included
        try:
            await self._check_file(source)
            return await self._load(source)
        except Exception as exc:
            self.load_error = str(exc)
            raise
        finally:
            self.loading = None

    async def load_named(
        self,
        name: str,
        overrides: Mapping[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> LoadedModel:
        """Validate and load a model of the models folder, then swap it in for the current one.

        `overrides` replace configured engine settings for this load (`engine` among them).
        """
        progress = on_progress or (lambda stage, fraction: None)
        engine = self.engine_settings(overrides or {})
        suffixes = self.engines.get(engine.engine).model_suffixes
        path = resolve_file(self._settings.models_dir, name, suffixes, "model")
        source = LoadSource(path, (name,), engine)
        progress("validating", 0.1)
        await self._check_file(source)
        progress("loading", 0.3)
        model = await self._load(source)
        progress("ready", 1.0)
        return model

    def engine_settings(self, overrides: Mapping[str, Any] | None = None) -> EngineSettings:
        """The configured engine settings with `overrides` on top, as the engine's own model.

        400 naming the field for a value out of range or a setting the engine does not have;
        names no engine has are ignored (TabbyAPI clients send their backends' own).
        """
        overrides = dict(overrides or {})
        ignored = sorted(set(overrides) - self.engines.setting_names())
        if ignored:
            log.info("ignoring load settings no engine has: %s", ", ".join(ignored))
        overrides = {k: v for k, v in overrides.items() if k not in ignored}
        factory = self.engines.get(overrides.get("engine", self._settings.engine))
        fields = factory.settings_type.model_fields
        foreign = next((name for name in overrides if name not in fields), None)
        if foreign is not None:
            raise InvalidEngineSettingError(
                f"{foreign} is not a setting of the {factory.name} engine", param=foreign
            )
        configured = {k: v for k, v in self._settings.engine_options().items() if k in fields}
        values = {**configured, **overrides, "engine": factory.name}
        return _validated(factory.settings_type, values)

    def _factory(self, source: LoadSource) -> EngineFactory:
        return self.engines.get(source.engine.engine)

    async def _check_file(self, source: LoadSource) -> None:
        """The engine's checks of the file and settings, before it loads anything."""
        factory = self._factory(source)
        await asyncio.to_thread(factory.check, source.engine, source.path, source.names[0])

    async def _load(self, source: LoadSource) -> LoadedModel:
        """Load and swap in; the load goes on (and registers) even if the caller is cancelled."""
        return await self._shielded(self._load_locked(source))

    async def _shielded(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.create_task(work)
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        return await asyncio.shield(task)

    async def _load_locked(self, source: LoadSource) -> LoadedModel:
        async with self._lock:
            engine, template = await self._start_engine(source)
            return self._swap_in(engine, source, template)

    async def _start_engine(self, source: LoadSource) -> tuple[Engine, ChatTemplate]:
        """A running engine for `source` and its chat template (the caller holds the lock)."""
        factory = self._factory(source)
        self.loading = source.names[0]
        try:
            engine = await asyncio.to_thread(
                factory.load, source.engine, source.path, source.names[0]
            )
            try:
                return engine, self._template(engine, source.template_file)
            except Exception:
                await engine.close()
                raise
        finally:
            self.loading = None

    def register(
        self,
        engine: Engine,
        names: list[str],
        template: ChatTemplate,
        source: LoadSource | None = None,
    ) -> LoadedModel:
        """Serve an already running engine under `names` (tests use this with a fake engine)."""
        model = LoadedModel(
            names[0], tuple(names[1:]), self._wrap(engine), template, template, source=source
        )
        self._models[model.id] = model
        self._ready.set()
        self.load_error = None
        log.info("model %s ready: %s (template: %s)", model.id, engine.info.path, template.origin)
        return model

    def _swap_in(self, engine: Engine, source: LoadSource, template: ChatTemplate) -> LoadedModel:
        previous = list(self._models.values())
        self._models.clear()
        model = self.register(engine, list(source.names), template, source)
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
        self._retiring[task] = model
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    @staticmethod
    async def _drain_and_close(model: LoadedModel) -> None:
        """Let requests holding a swapped-out engine finish, then free it."""
        deadline = time.monotonic() + RETIRE_WAIT_SECONDS
        while time.monotonic() < deadline and _in_use(model):
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        await model.engine.close()
        log.info("model %s unloaded", model.id)

    async def close(self) -> None:
        """Stop every engine, the draining ones included; their open streams end with ABORT.

        The caller has already given requests their grace period (the server's shutdown
        grace, or uvicorn's wait for open connections); what still runs is aborted through
        each engine, so every stream gets its final event and can close properly.
        """
        for task in [self._monitor, *self._revivals]:
            if task is not None:
                task.cancel()
        # A load cannot be cancelled halfway (its thread runs on): let it finish and register.
        await asyncio.gather(*self._loads, return_exceptions=True)
        models = [*self._models.values(), *self._retiring.values()]
        self._models.clear()
        self._ready.clear()
        await asyncio.gather(*(m.engine.close() for m in models), return_exceptions=True)
        # Their engines are closed: the drains have nothing left to wait for.
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

    # ---- dead engines ----

    def start_monitor(self) -> None:
        """Watch the engines from now on: a dead one is reloaded, see the module docstring."""
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            for model in list(self._models.values()):
                self._notice_death(model)
            await asyncio.sleep(MONITOR_SECONDS)

    def _notice_death(self, model: LoadedModel) -> None:
        """Mark a model whose engine died as failed and reload it in the background (once)."""
        if model.failed is not None:
            return
        stats = model.engine.stats()
        if stats.alive:
            return
        model.failed = stats.error or "the engine stopped"
        log.error("the engine of %s stopped (%s); reloading it", model.id, model.failed)
        task = asyncio.create_task(self._revive(model))
        self._revivals.add(task)
        task.add_done_callback(self._revivals.discard)

    async def _revive(self, model: LoadedModel) -> None:
        try:
            if model.source is None:
                raise ServiceUnavailableError(f"{model.id} was not loaded from a file")
            await self._check_file(model.source)  # the file may have changed since
            await self._shielded(self._reload_locked(model, model.source))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = exc.message if isinstance(exc, LLMServeError) else str(exc)
            log.error("reloading %s failed: %s", model.id, reason)
            if not any(m.failed is None for m in self._models.values()):
                self.declare_fatal(
                    f"the engine of {model.id} died and reloading it failed: {reason}"
                )

    async def _reload_locked(self, model: LoadedModel, source: LoadSource) -> None:
        async with self._lock:
            if self._models.get(model.id) is not model:
                return  # swapped out or unloaded meanwhile: nothing to revive
            engine, _ = await self._start_engine(source)
            revived = self._swap_in(engine, source, model.gguf_template)
            revived.template = model.template  # keep a template the admin switched to
            log.info("model %s reloaded after its engine died", model.id)

    def declare_fatal(self, reason: str) -> None:
        """Nothing can serve: tell the server (which answers what runs, then exits non-zero)."""
        if self.fatal_error is not None:
            return
        self.fatal_error = reason
        log.critical("cannot serve: %s", reason)
        for callback in self._fatal_callbacks:
            callback(reason)

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

    @staticmethod
    def _template(engine: Engine, template_file: Path | None) -> ChatTemplate:
        info = engine.info
        if template_file is not None:
            source = read_template_file(template_file)
            return load_template(
                source, f"file:{template_file.name}", info.bos_token, info.eos_token
            )
        return load_template(info.chat_template, "gguf", info.bos_token, info.eos_token)


def _validated(model: type[BaseModel], values: Mapping[str, Any]) -> EngineSettings:
    """`values` as an instance of the engine's settings `model`; 400 naming the first bad one."""
    try:
        settings = model.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        raise InvalidEngineSettingError(f"{param}: {error['msg']}", param=param) from None
    assert isinstance(settings, EngineSettings)
    return settings


def _in_use(model: LoadedModel) -> bool:
    """A request still holds the model, or its engine still runs or queues something."""
    if model.users.count:
        return True
    stats = model.engine.stats()
    return stats.alive and (stats.running > 0 or stats.waiting > 0)
