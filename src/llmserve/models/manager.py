"""Which models are loaded, what they are called, and which one answers a request.

Lifetimes: a request leases the model it picks (see `leases`), and a swapped-out or unloaded
engine is closed only when its last lease is gone (at most RETIRE_WAIT_SECONDS later). Loads
run as tasks of their own, shielded from the request that asked for them, so a client that
disconnects mid-load still leaves the engine registered, never orphaned. A monitor notices an
engine whose thread died, marks its model failed and reloads it from the same file (with the
adapters it had); requests naming it meanwhile wait for that reload (bounded), then get a 503
with Retry-After; a reload that failed is tried again by the next request. When a reload fails
and nothing else can serve, the `on_fatal` callbacks run (the server then exits non-zero).

Who may use what: a request naming a model that is not loaded loads it when its key may load
models (the admin key) or the configured entry is `autoload`; files of models_dir that are not
configured load by their name for the admin key only. A key restricted to some models (see
`leases.restrict_models`) is refused any other, and listings show it only those.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from llmserve.config import Settings
from llmserve.core.continuation import render_continuation
from llmserve.core.errors import (
    InvalidRequestError,
    LLMServeError,
    ModelNotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from llmserve.core.templates import (
    ChatTemplate,
    builtin_template,
    load_template,
    read_template_file,
)
from llmserve.engines.base import (
    MODEL_FOLDER_MARKER,
    AdapterSpec,
    Engine,
    EngineFactory,
    InsufficientMemoryError,
    InvalidEngineSettingError,
)
from llmserve.engines.registry import EngineRegistry, default_registry
from llmserve.engines.settings import EngineSettings
from llmserve.models import leases
from llmserve.models.catalog import LoraRef, ModelEntry, bare_name
from llmserve.models.leases import LeaseCount
from llmserve.models.registry import (
    PRESET_SUFFIXES,
    FileEntry,
    list_files,
    list_folders,
    resolve_adapter,
    resolve_file,
    resolve_folder,
)

log = logging.getLogger(__name__)

LOAD_WAIT_SECONDS = 60.0  # how long a request waits for the start-up model, then 503
# How long a request waits for the model it named to be loaded (behind other loads, and for
# busy models to finish so that it fits), then 503; loads themselves are not cut short.
ON_DEMAND_WAIT_SECONDS = 300.0
REVIVE_WAIT_SECONDS = 30.0  # how long a request waits for a dead engine's reload, then 503
RETIRE_WAIT_SECONDS = 600.0  # how long a swapped-out engine may finish its requests
DRAIN_POLL_SECONDS = 0.05
MONITOR_SECONDS = 0.5  # how often the monitor looks for dead engine threads

ProgressCallback = Callable[[str, float], None]
EngineWrapper = Callable[[Engine], Engine]
FatalCallback = Callable[[str], None]
PresetCheck = Callable[[str, Path], None]  # (preset name, its file): raises when it is not valid
Health = Literal["loaded", "available", "loading", "failed"]
T = TypeVar("T")


@dataclass(frozen=True)
class LoadSource:
    """Where a loaded model came from, so a dead engine can be loaded again the same way."""

    path: Path
    names: tuple[str, ...]
    engine: EngineSettings  # an instance of the chosen engine's own settings model
    template_file: Path | None = None
    keep_alive: float | None = None  # idle seconds before it is unloaded; None: never
    pinned: bool = False  # never unloaded to make room or when idle
    loras: tuple[tuple[str, AdapterSpec], ...] = ()  # (name, adapter) applied once it loads
    preset: str | None = None  # the sampling preset of its requests


@dataclass(frozen=True)
class ModelState:
    """A model as listings show it: loaded (with its LoadedModel), loading or available."""

    id: str
    status: Literal["loaded", "loading", "available"]
    model: LoadedModel | None = None


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
    memory_bytes: int = 0  # the engine's estimate of what it holds (weights + KV cache)
    keep_alive: float | None = None  # idle seconds before it is unloaded; None: never
    pinned: bool = False
    last_used: float = field(default_factory=time.monotonic)
    loras: dict[str, float] = field(default_factory=dict)  # active adapters: name -> scaling

    @property
    def preset(self) -> str | None:
        """The sampling preset configured for its requests."""
        return self.source.preset if self.source is not None else None

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this model answers to."""
        return (self.id, *self.aliases)

    def answers_to(self, name: str) -> bool:
        """True for its id, its aliases, and those with Ollama's `:latest` tag."""
        return bare_name(name) in self.names or name in self.names

    @property
    def idle(self) -> bool:
        """No request holds it and its engine runs and queues nothing."""
        return not _in_use(self)

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
        self._revivals: dict[str, asyncio.Task[None]] = {}  # by model id: one reload at a time
        self._check_preset: PresetCheck | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._fatal_callbacks: list[FatalCallback] = []
        self._pending: dict[str, asyncio.Task[LoadedModel]] = {}  # one load per model id
        self._waiters: dict[str, int] = {}  # requests waiting for each pending load
        self._load_failures: dict[str, str] = {}  # why the last on-demand load of a model failed
        self._default_id: str | None = None  # the model requests without `model` get
        self.loading: str | None = None
        self.load_error: str | None = None
        self.fatal_error: str | None = None
        self._wrap: EngineWrapper = lambda engine: engine

    def wrap_engines(self, wrapper: EngineWrapper) -> None:
        """Wrap every engine, now and later (the app adds metrics this way)."""
        self._wrap = wrapper
        for model in self._models.values():
            model.engine = wrapper(model.engine)

    def check_presets_with(self, check: PresetCheck) -> None:
        """Validate the configured models' presets with `check` (the API layer knows presets)."""
        self._check_preset = check

    def on_fatal(self, callback: FatalCallback) -> None:
        """Call `callback(reason)` when no model can serve and none could be loaded."""
        self._fatal_callbacks.append(callback)

    # ---- state ----

    @property
    def ready(self) -> bool:
        """True when the default model serves and its engine is alive."""
        default = self._default()
        return default is not None and default.engine.stats().alive

    def engine_error(self) -> str | None:
        """Why an engine stopped, if one did."""
        for model in self._models.values():
            stats = model.engine.stats()
            if not stats.alive:
                return f"engine of {model.id} stopped: {stats.error or 'unknown error'}"
        return None

    def loaded(self) -> list[LoadedModel]:
        """The loaded models, default first."""
        default = self._default()
        rest = [m for m in self._models.values() if m is not default]
        return [default, *rest] if default is not None else rest

    def available(self) -> list[FileEntry]:
        """Every model of the configured engine in the models folder (and sub-folders)."""
        factory = self.engines.get(self._settings.engine)
        if factory.model_folders:
            return list_folders(self._settings.models_dir, MODEL_FOLDER_MARKER)
        return list_files(self._settings.models_dir, factory.model_suffixes)

    def configured(self) -> list[ModelEntry]:
        """The configured models: the start-up one first, then config.yml's `models:`."""
        first = self._startup_entry
        return [first, *(m for m in self._settings.models if m.id != first.id)]

    def visible(self) -> list[LoadedModel]:
        """The loaded models the current request's key may use, default first."""
        return [m for m in self.loaded() if _allowed(m.names)]

    def catalog(self, may_load: bool) -> list[ModelState]:
        """What a key sees: loaded models, and those it may load (all, with the admin key).

        A key restricted to some models sees only those.
        """
        states = [ModelState(m.id, "loaded", m) for m in self.visible()]
        listed = {name for model in self._models.values() for name in model.names}
        for names, autoload in self._candidates():
            if names[0] in listed or not (may_load or autoload) or not _allowed(names):
                continue
            listed.add(names[0])
            states.append(
                ModelState(names[0], "loading" if names[0] in self._pending else "available")
            )
        return states

    def _candidates(self) -> list[tuple[tuple[str, ...], bool]]:
        """Models that could be loaded, by their names, and whether any key may load them."""
        # The bundled model, when nothing names it, is what serves, not something to offer.
        named = self._settings.model is not None or self._settings.models
        candidates = [(e.names, e.autoload) for e in self.configured()] if named else []
        return candidates + [((f.name,), False) for f in self.available()]

    def health(self, name: str) -> Health:
        """The state of the model a request naming `name` gets, for `/health?model=`.

        Open without a key, so it reveals no more than naming the model in a request would:
        the answering model's state for names that resolve (configured or loaded models, and
        every name when one model serves them all), ModelNotFoundError for any other.
        """
        entry = None if self._loaded_named(name) else self._configured_named(name)
        if entry is not None:
            if entry.id in self._pending or self.loading == entry.id:
                return "loading"
            return "failed" if entry.id in self._load_failures else "available"
        model = self._loaded_named(name) or self._stand_in()
        if model is None:
            raise ModelNotFoundError(f"the model `{name}` does not exist", param="model")
        alive = model.failed is None and model.engine.stats().alive
        return "loaded" if alive else "failed"

    def preset_for(self, requested: str | None) -> str | None:
        """The sampling preset of the model that serves (or would serve) `requested`.

        Once the request was given its model, that model's; before, the one a request naming
        `requested` would get: a loaded or configured model of that name, else the fallback or
        the default model.
        """
        picked = leases.current_model()
        if picked is not None and picked in self._models:
            return self._models[picked].preset
        if requested is not None:
            if (model := self._loaded_named(requested)) is not None:
                return model.preset
            if (entry := self._configured_named(requested)) is not None:
                return entry.preset
        model = self._stand_in() if requested is not None else self._default()
        return model.preset if model is not None else None

    def live_engines(self) -> int:
        """Engines not yet closed: serving plus draining (tests bound this)."""
        return len(self._models) + len(self._retiring)

    # ---- resolving ----

    def resolve(self, requested: str | None) -> LoadedModel:
        """The model that answers a request naming `requested` (None: the default).

        Inside an HTTP request the model is leased until the response has been sent.
        A model whose engine died is being reloaded: 503 (with Retry-After) until it is back.
        """
        model = self._pick(requested)
        self._notice_death(model)
        if model.failed is not None:
            self._revive_soon(model)
            raise ServiceUnavailableError(
                f"the model `{model.id}` is being reloaded after its engine stopped; retry"
            )
        model.last_used = time.monotonic()
        leases.lease(model.users)
        leases.record_model(model.id)
        return model

    def _pick(self, requested: str | None) -> LoadedModel:
        """The loaded model that answers `requested`; 403 when the key may not use it."""
        default = self._default()
        if default is None:
            raise ServiceUnavailableError(self.load_error or "no model is loaded")
        model = self._loaded_named(requested) if requested is not None else default
        model = model or self._stand_in()
        if model is None:
            raise ModelNotFoundError(f"the model `{requested}` does not exist", param="model")
        if model is default and requested is not None and not model.answers_to(requested):
            log.debug("request names model %r; served by %s", requested, default.id)
        _check_allowed(model.names, requested)
        return model

    def _stand_in(self) -> LoadedModel | None:
        """The model answering a name no loaded model has: the fallback, or the only one."""
        fallback = self._settings.fallback_model
        if fallback is not None and (model := self._loaded_named(fallback)) is not None:
            return model
        return self._default() if self._answers_every_name() else None

    def _answers_every_name(self) -> bool:
        """One configured model serves whatever name a request gives (DESIGN's naming rule)."""
        return len(self.configured()) == 1 and not self._settings.strict_model_names

    def _default(self) -> LoadedModel | None:
        if self._default_id in self._models:
            return self._models[self._default_id]
        return next(iter(self._models.values()), None)

    def _loaded_named(self, name: str) -> LoadedModel | None:
        return next((m for m in self._models.values() if m.answers_to(name)), None)

    def _configured_named(self, name: str) -> ModelEntry | None:
        return next((e for e in self.configured() if _names_match(name, e.names)), None)

    async def acquire(self, requested: str | None) -> LoadedModel:
        """Like resolve, but waits for a load in progress and loads a named model on demand.

        A model that is not loaded (configured, or a file of models_dir) is loaded when the
        key may load models or its entry is `autoload`, else 403; a model whose engine died
        is waited for while it reloads (bounded).
        """
        entry = self._loadable(requested) if requested is not None else None
        if entry is not None:
            _check_allowed(entry.names, requested)
        if entry is not None and not (leases.may_load_models() or entry.autoload):
            if self._answers_every_name() and entry.id == self.configured()[0].id:
                entry = None  # round 1's rule: one configured model answers every name
            else:
                raise PermissionDeniedError(
                    f"the model `{requested}` is not loaded, and loading it needs the admin key "
                    "(or `autoload: true` in its config entry)",
                    param="model",
                )
        if entry is not None:
            await self._load_once(entry)
        elif self._default() is None and self.loading is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), LOAD_WAIT_SECONDS)
        await self._await_revival(self._pick(requested))
        return self.resolve(requested)

    def get(self, name: str) -> LoadedModel:
        """The loaded model called exactly `name` (one the key may not use does not exist)."""
        model = self._loaded_named(name)
        if model is None or not _allowed(model.names):
            raise ModelNotFoundError(f"the model `{name}` does not exist", param="model")
        return model

    def target(self, name: str | None) -> LoadedModel:
        """The loaded model an admin action names (None: the default), without fallbacks."""
        if name is None:
            model = self._default()
            if model is None:
                raise ServiceUnavailableError(self.load_error or "no model is loaded")
            return model
        named = self._loaded_named(name)
        if named is None or not _allowed(named.names):
            raise ModelNotFoundError(f"the model `{name}` is not loaded", param="model")
        return named

    def _loadable(self, name: str) -> ModelEntry | None:
        """The entry a request naming `name` may load, when it is not loaded."""
        if self._loaded_named(name) is not None:
            return None
        entry = self._configured_named(name)
        if entry is not None:
            return entry
        stem = bare_name(name)
        if any(f.name == stem for f in self.available()):
            return ModelEntry(id=stem)  # loadable by the admin key alone (never autoload)
        return None

    def _is_loaded(self, name: str) -> bool:
        return self._loaded_named(name) is not None

    # ---- loading ----

    async def load_configured(self) -> LoadedModel:
        """Check and load the start-up model (the settings' `model`, or the first configured)."""
        entry = self._startup_entry
        self.loading = entry.id  # requests wait for the start-up model, checks included
        try:
            self.check_entries()
            source = self._source(entry, {})
            need = await self._check_file(source) if self._swapping else None
            model = await self._load(source, need)
        except Exception as exc:
            self.load_error = str(exc)
            raise
        finally:
            self.loading = None
        self._default_id = model.id
        return model

    @functools.cached_property
    def _startup_entry(self) -> ModelEntry:
        """The model served at start: `model` (or the bundled one), else the first of `models`.

        Computed once: name resolution asks for it on every request naming an unknown model,
        and finding the bundled model goes through the import system.
        """
        s = self._settings
        if s.model is None and s.models:
            return s.models[0].model_copy(update={"pinned": True})
        factory = self.engines.get(s.engine)
        path = Path(s.model) if s.model else factory.default_model(s.data_path())
        names = s.served_model_name or [path.name if factory.model_folders else path.stem]
        template = Path(s.chat_template) if s.chat_template else None
        return ModelEntry(
            id=names[0], path=path, aliases=names[1:], chat_template=template, pinned=True
        )

    async def load_named(
        self,
        name: str,
        overrides: Mapping[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> LoadedModel:
        """Validate and load a configured model or one of the models folder.

        With max_loaded_models 1 it replaces the loaded model (which becomes this one);
        otherwise it joins them, unloading the least recently used idle ones to make room.
        `overrides` replace configured engine settings for this load (`engine` among them).
        """
        progress = on_progress or (lambda stage, fraction: None)
        entry = next((e for e in self.configured() if name in e.names), None)
        source = self._source(entry or ModelEntry(id=name), overrides or {})
        progress("validating", 0.1)
        # Before the lock, so a bad file never waits; several models: checked making room.
        need = await self._check_file(source) if self._swapping else None
        progress("loading", 0.3)
        model = await self._load(source, need)
        if self._swapping:
            self._default_id = model.id
        progress("ready", 1.0)
        return model

    def check_entries(self) -> None:
        """Check every configured model's LoRA adapters and preset (at start: config errors)."""
        for entry in self.configured():
            self._lora_specs(entry.id, entry.loras)
            self._preset(entry)

    def _lora_specs(
        self, model_id: str, loras: list[LoraRef]
    ) -> tuple[tuple[str, AdapterSpec], ...]:
        """The adapter files of `loras`; 404 naming the model and the adapter that is missing."""
        try:
            return tuple(
                (lora.name, AdapterSpec(str(self.lora_file(lora.name)), lora.scaling))
                for lora in loras
            )
        except LLMServeError as exc:  # a missing file (404) or a name outside the folder (400)
            message = f"model `{model_id}`: {exc.message}"
            raise type(exc)(message, param="loras", code=exc.code) from None

    def lora_file(self, name: str) -> Path:
        """The adapter called `name` in loras_dir (a GGUF file or a PEFT folder)."""
        return resolve_adapter(self._settings.loras_dir, name)

    def _preset(self, entry: ModelEntry) -> str | None:
        """The entry's preset, checked: its file exists and is a valid preset (else 4xx)."""
        if entry.preset is None:
            return None
        root = self._settings.sampler_overrides_dir
        try:
            path = resolve_file(root, entry.preset, PRESET_SUFFIXES, "preset")
            if self._check_preset is not None:
                self._check_preset(entry.preset, path)
        except LLMServeError as exc:
            message = f"model `{entry.id}`: {exc.message}"
            raise type(exc)(message, param="preset", code=exc.code) from None
        return entry.preset

    def _source(self, entry: ModelEntry, overrides: Mapping[str, Any]) -> LoadSource:
        """How to load `entry`: its file, names and engine settings (with `overrides` on top)."""
        engine = self.engine_settings({**entry.engine_overrides(), **overrides})
        path = entry.path
        if path is None:
            path = self._model_path(self.engines.get(engine.engine), entry.id)
        keep_alive = entry.keep_alive if "keep_alive" in entry.model_fields_set else None
        return LoadSource(
            path=path,
            names=entry.names,
            engine=engine,
            template_file=entry.chat_template,
            keep_alive=self._settings.keep_alive if keep_alive is None else keep_alive,
            pinned=entry.pinned,
            loras=self._lora_specs(entry.id, entry.loras),
            preset=self._preset(entry),
        )

    def _model_path(self, factory: EngineFactory, name: str) -> Path:
        """The model called `name` in models_dir: a file, or a folder for folder engines."""
        root = self._settings.models_dir
        if factory.model_folders:
            return resolve_folder(root, name, MODEL_FOLDER_MARKER, "model")
        return resolve_file(root, name, factory.model_suffixes, "model")

    async def _load_once(self, entry: ModelEntry) -> LoadedModel:
        """Load `entry` on demand; requests naming it meanwhile wait for the same load.

        When every waiting request has gone before the engine load started (clients hung up
        while the file was checked), the load is abandoned; once started it always finishes
        and registers (see `_shielded`).
        """
        task = self._pending.get(entry.id)
        if task is None:
            task = asyncio.create_task(self.load_named(entry.id))
            self._pending[entry.id] = task
            task.add_done_callback(functools.partial(self._load_done, entry.id))
        self._waiters[entry.id] = self._waiters.get(entry.id, 0) + 1
        try:
            return await asyncio.wait_for(asyncio.shield(task), ON_DEMAND_WAIT_SECONDS)
        except TimeoutError:
            raise ServiceUnavailableError(f"the model `{entry.id}` is still loading") from None
        except asyncio.CancelledError:
            if self._waiters[entry.id] == 1:
                task.cancel()  # nobody waits: stop before the engine load (it is shielded)
            raise
        finally:
            self._waiters[entry.id] -= 1

    def _load_done(self, model_id: str, task: asyncio.Task[LoadedModel]) -> None:
        """Forget a finished on-demand load, remembering why it failed (for /health)."""
        self._pending.pop(model_id, None)
        error = None if task.cancelled() else task.exception()
        if error is None:
            self._load_failures.pop(model_id, None)
        else:
            reason = error.message if isinstance(error, LLMServeError) else str(error)
            self._load_failures[model_id] = reason

    @property
    def _swapping(self) -> bool:
        """One model at a time: a load replaces it (TabbyAPI's way)."""
        return self._settings.max_loaded_models == 1

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

    async def _check_file(self, source: LoadSource) -> int:
        """The engine's checks of the file and settings; the memory it will hold, estimated."""
        factory = self._factory(source)
        return await asyncio.to_thread(factory.check, source.engine, source.path, source.names[0])

    async def _load(self, source: LoadSource, need: int | None) -> LoadedModel:
        """Load and swap in; the load goes on (and registers) even if the caller is cancelled."""
        return await self._shielded(self._load_locked(source, need))

    async def _shielded(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.create_task(work)
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        return await asyncio.shield(task)

    async def _load_locked(self, source: LoadSource, need: int | None) -> LoadedModel:
        """`need`: the checked file's memory estimate (None: check it while making room)."""
        async with self._lock:
            if need is None:
                need = await self._make_room(source)
            engine, template = await self._start_engine(source)
            model = self._swap_in(engine, source, template)
            model.memory_bytes = need
            return model

    async def _make_room(self, source: LoadSource) -> int:
        """Unload least recently used idle models until `source` fits; its memory estimate.

        Limits: max_loaded_models, memory_budget_mb and the memory the engine finds free.
        Models serving requests are never cut off: only idle ones go (this waits, bounded,
        for one to become idle), and their close is awaited so the memory is really free
        before the new one loads.
        """
        deadline = time.monotonic() + ON_DEMAND_WAIT_SECONDS
        need: int | None = None
        while True:
            others = [m for m in self._models.values() if m.id != source.names[0]]
            if need is None:
                try:
                    need = await self._check_file(source)
                except InsufficientMemoryError:
                    if await self._evict_one(others) or await self._idle_soon(others, deadline):
                        continue
                    raise
            held = sum(m.memory_bytes for m in others)
            if len(others) < self._settings.max_loaded_models and self._fits(held + need):
                return need
            if await self._evict_one(others):
                need = None  # memory was freed: the engine's estimate of what is free changed
                continue
            if await self._idle_soon(others, deadline):
                continue
            raise InsufficientMemoryError(
                f"{source.names[0]} does not fit beside the loaded models "
                f"(max_loaded_models {self._settings.max_loaded_models}, memory budget "
                f"{self._settings.memory_budget_mb} MiB), and none of them could be unloaded"
            )

    def _evictable(self, models: list[LoadedModel]) -> list[LoadedModel]:
        return [m for m in models if not m.pinned and m.id != self._default_id]

    async def _idle_soon(self, models: list[LoadedModel], deadline: float) -> bool:
        """Wait a moment when a model that may go is busy; False when none may or time is up."""
        if not self._evictable(models) or time.monotonic() > deadline:
            return False
        await asyncio.sleep(DRAIN_POLL_SECONDS)
        return True

    def _fits(self, total_bytes: int) -> bool:
        budget = self._settings.memory_budget_mb
        return budget is None or total_bytes <= budget << 20

    async def _evict_one(self, candidates: list[LoadedModel]) -> bool:
        """Unload the least recently used idle, unpinned model and wait for it to close."""
        idle = [m for m in self._evictable(candidates) if m.idle]
        if not idle:
            return False
        victim = min(idle, key=lambda m: m.last_used)
        log.info("unloading %s to make room", victim.id)
        self._models.pop(victim.id, None)
        await victim.engine.close()
        return True

    async def _start_engine(self, source: LoadSource) -> tuple[Engine, ChatTemplate]:
        """A running engine for `source` and its chat template (the caller holds the lock)."""
        factory = self._factory(source)
        self.loading = source.names[0]
        try:
            engine = await asyncio.to_thread(
                factory.load, source.engine, source.path, source.names[0]
            )
            try:
                await _apply_adapters(engine, source.names[0], source.loras)
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
        """Serve the new engine; what it replaces (all, when swapping) drains, then closes."""
        replaced = [m for m in self._models.values() if self._swapping or m.id == source.names[0]]
        for old in replaced:
            self._models.pop(old.id, None)
        model = self.register(engine, list(source.names), template, source)
        model.keep_alive, model.pinned = source.keep_alive, source.pinned
        model.loras = {name: spec.scale for name, spec in source.loras}
        for old in replaced:
            self._retire(old)
        return model

    async def unload(self, name: str | None = None) -> list[str]:
        """Stop serving `name` (None: every model); requests already running finish first."""
        async with self._lock:
            chosen = [m for m in self._models.values() if name is None or m.answers_to(name)]
            if name is not None and not chosen:
                raise ModelNotFoundError(f"the model `{name}` is not loaded", param="model_name")
            for model in chosen:
                self._models.pop(model.id, None)
                self._retire(model)
            if not self._models:
                self._ready.clear()
            return [model.id for model in chosen]

    def set_keep_alive(self, model: LoadedModel, seconds: float | None) -> None:
        """A request's `keep_alive` (Ollama's): idle seconds before unloading, None: never.

        The default and pinned models stay regardless; 0 unloads once the model is idle.
        """
        model.keep_alive = seconds

    def _expire_idle(self) -> None:
        """Unload models idle for longer than their keep_alive (never the default or pinned)."""
        now = time.monotonic()
        for model in list(self._models.values()):
            if model.pinned or model.id == self._default_id or model.keep_alive is None:
                continue
            if model.idle and now - model.last_used >= model.keep_alive:
                log.info("unloading %s: idle for %.0f s", model.id, now - model.last_used)
                self._models.pop(model.id, None)
                self._retire(model)

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
        for task in [self._monitor, *self._revivals.values()]:
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
            self._expire_idle()
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
        self._revive_soon(model)

    def _revive_soon(self, model: LoadedModel) -> None:
        """Reload a failed model in the background, unless a reload of it already runs."""
        if model.id in self._revivals or self._models.get(model.id) is not model:
            return
        task = asyncio.create_task(self._revive(model))
        self._revivals[model.id] = task
        task.add_done_callback(lambda _: self._revivals.pop(model.id, None))

    async def _await_revival(self, model: LoadedModel) -> None:
        """Wait (bounded) while a failed model reloads; resolve then serves it or says 503."""
        self._notice_death(model)
        if model.failed is None:
            return
        self._revive_soon(model)  # a reload that failed before is tried again now
        task = self._revivals.get(model.id)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), REVIVE_WAIT_SECONDS)

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
            # With the adapters it had when it died (the admin may have changed them).
            specs = self._lora_specs(
                model.id, [LoraRef(name=n, scaling=s) for n, s in model.loras.items()]
            )
            source = dataclasses.replace(source, loras=specs)
            engine, _ = await self._start_engine(source)
            revived = self._swap_in_one(engine, source, model)
            revived.template = model.template  # keep a template the admin switched to
            log.info("model %s reloaded after its engine died", model.id)

    def _swap_in_one(self, engine: Engine, source: LoadSource, old: LoadedModel) -> LoadedModel:
        """A revived engine in place of the dead one, whatever the load mode."""
        self._models.pop(old.id, None)
        model = self.register(engine, list(source.names), old.gguf_template, source)
        model.keep_alive, model.pinned, model.memory_bytes = (
            old.keep_alive,
            old.pinned,
            old.memory_bytes,
        )
        self._retire(old)
        return model

    def declare_fatal(self, reason: str) -> None:
        """Nothing can serve: tell the server (which answers what runs, then exits non-zero)."""
        if self.fatal_error is not None:
            return
        self.fatal_error = reason
        log.critical("cannot serve: %s", reason)
        for callback in self._fatal_callbacks:
            callback(reason)

    # ---- templates ----

    def set_template(self, model: LoadedModel, source: str | None, origin: str) -> None:
        """Switch the chat template of `model`; None restores its own."""
        info = model.engine.info
        model.template = (
            load_template(source, origin, info.bos_token, info.eos_token)
            if source is not None
            else model.gguf_template
        )

    # ---- LoRA adapters ----

    async def set_loras(self, model: LoadedModel, scales: Mapping[str, float]) -> None:
        """Apply exactly these adapters (name -> scaling) to `model`; 4xx leaves the old ones."""
        loras = [LoraRef(name=name, scaling=scale) for name, scale in scales.items()]
        specs = [spec for _, spec in self._lora_specs(model.id, loras)]
        await model.engine.set_adapters(specs)
        model.loras = dict(scales)

    # ---- helpers ----

    @staticmethod
    def _template(engine: Engine, template_file: Path | None) -> ChatTemplate:
        info = engine.info
        # A built-in name (`chatml`, `llama3`, ...) unless a file of that name exists.
        builtin = None if template_file is None else builtin_template(str(template_file))
        if template_file is not None and builtin is not None and not template_file.exists():
            origin = f"builtin:{template_file}"
            return load_template(builtin, origin, info.bos_token, info.eos_token)
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


async def _apply_adapters(
    engine: Engine, model_id: str, loras: tuple[tuple[str, AdapterSpec], ...]
) -> None:
    """Apply a model's configured adapters right after its engine started."""
    if not loras:
        return
    if not engine.info.capabilities.adapters:
        raise InvalidRequestError(
            f"model `{model_id}`: its engine takes no LoRA adapters", param="loras"
        )
    await engine.set_adapters([spec for _, spec in loras])


def _names_match(name: str, names: tuple[str, ...]) -> bool:
    """True when `name` (or it without Ollama's `:latest`) is one of `names`."""
    return name in names or bare_name(name) in names


def _allowed(names: tuple[str, ...]) -> bool:
    """True when the current request's key may use the model called `names`."""
    allowed = leases.allowed_models()
    return allowed is None or any(_names_match(entry, names) for entry in allowed)


def _check_allowed(names: tuple[str, ...], requested: str | None) -> None:
    """403 when the current request's key may not use the model called `names`."""
    if not _allowed(names):
        shown = requested if requested is not None and _names_match(requested, names) else names[0]
        raise PermissionDeniedError(f"this key may not use model `{shown}`", param="model")


def _in_use(model: LoadedModel) -> bool:
    """A request still holds the model, or its engine still runs or queues something."""
    if model.users.count:
        return True
    stats = model.engine.stats()
    return stats.alive and (stats.running > 0 or stats.waiting > 0)
