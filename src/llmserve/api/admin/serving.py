"""The management API: models, LoRA adapters, sampling presets, chat templates, tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ValidationError

from llmserve.api.admin.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    LoraCard,
    LoraList,
    LoraLoadRequest,
    ModelCardDetails,
    ModelLoadProgress,
    ModelLoadRequest,
    OverrideList,
    OverrideSwitchRequest,
    StatusResponse,
    TemplateList,
    TokenDecodeRequest,
    TokenDecodeResponse,
    TokenEncodeRequest,
    TokenEncodeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TokenPiece,
)
from llmserve.api.common import ChatMessage
from llmserve.api.overrides import OverrideValue, SamplingOverrides
from llmserve.config import Settings
from llmserve.core.errors import InvalidRequestError, LLMServeError
from llmserve.core.templates import read_template_file
from llmserve.models.manager import LoadedModel, ModelManager, ProgressCallback
from llmserve.models.registry import PRESET_SUFFIXES, list_adapters, list_files, resolve_file

TEMPLATE_SUFFIXES = (".jinja", ".j2", ".txt")
LOAD_STAGES = ("validating", "loading", "ready")


class AdminServing:
    """Implements every management route over the model manager and the app's holders."""

    def __init__(self, settings: Settings, models: ModelManager, overrides: SamplingOverrides):
        self.settings = settings
        self.models = models
        self.overrides = overrides
        # Models' own presets (config.yml): the manager checks them with this layer's rules
        # when a model loads, and requests find theirs through it.
        models.check_presets_with(self._register_model_preset)
        overrides.preset_of = models.preset_for

    def _register_model_preset(self, name: str, path: Path) -> None:
        """Validate a configured model's preset file and keep its values for its requests."""
        probe = SamplingOverrides()
        probe.set(name, _read_preset(name, path))
        self.overrides.model_presets[name] = probe.values

    # ---- models ----

    def model_card(self) -> ModelCardDetails:
        """The loaded model's card."""
        model = self.models.resolve(None)
        info = model.engine.info
        return ModelCardDetails(
            id=model.id,
            aliases=list(model.aliases),
            path=info.path,
            context_length=info.context_length,
            train_context_length=info.train_context_length,
            parameters=info.n_params,
            size_bytes=info.size_bytes,
            quantization=_quantization(info.description),
            description=info.description,
            chat_template_source=model.template.origin,
        )

    async def _load(
        self, body: ModelLoadRequest, report: ProgressCallback | None = None
    ) -> LoadedModel:
        """Load the model the request names; its `keep_alive`, if given, applies to it."""
        model = await self.models.load_named(body.model_name, body.engine_overrides(), report)
        if "keep_alive" in body.model_fields_set:
            self.models.set_keep_alive(model, body.keep_alive)
        return model

    async def load_model(self, body: ModelLoadRequest) -> StatusResponse:
        """Load and swap in a model; the previous one serves until the new one is ready."""
        await self._load(body)
        return StatusResponse(status="loaded", detail=body.model_name)

    async def load_model_stream(self, body: ModelLoadRequest) -> AsyncIterator[str]:
        """Progress events (`stage`, `progress`) as the load advances; errors raise before any."""
        queue: asyncio.Queue[ModelLoadProgress] = asyncio.Queue()

        def report(stage: str, fraction: float) -> None:
            module = LOAD_STAGES.index(stage) + 1 if stage in LOAD_STAGES else 0
            status: Literal["processing", "finished"] = (
                "finished" if stage == "ready" else "processing"
            )
            queue.put_nowait(
                ModelLoadProgress(
                    module=module,
                    modules=len(LOAD_STAGES),
                    stage=stage,
                    progress=fraction,
                    status=status,
                )
            )

        task = asyncio.create_task(self._load(body, report))
        first = await _next_event(queue, task)  # a bad name or file fails here, as a 4xx
        return _progress_events(first, queue, task)

    async def unload_model(self, name: str | None = None) -> StatusResponse:
        """Stop serving `name`, or every loaded model."""
        unloaded = await self.models.unload(name)
        return StatusResponse(status="unloaded", detail=", ".join(unloaded) or None)

    # ---- LoRA ----

    def list_loras(self, admin: bool, model_name: str | None = None) -> LoraList:
        """A model's active adapters; with the admin key, every adapter in the folder too."""
        model = self.models.target(model_name)
        active = model.loras
        names = [e.name for e in list_adapters(self.settings.loras_dir)] if admin else []
        names += [n for n in active if n not in names]
        return LoraList(
            model=model.id,
            data=[LoraCard(id=n, scaling=active.get(n), active=n in active) for n in names],
        )

    async def load_loras(self, body: LoraLoadRequest) -> StatusResponse:
        """Apply these adapters to a model (added to its active ones, same name replaces)."""
        model = self.models.target(body.model)
        scales = {**model.loras, **{lora.name: lora.scaling for lora in body.loras}}
        await self.models.set_loras(model, scales)
        return StatusResponse(status="loaded", detail=", ".join(sorted(scales)))

    async def unload_loras(self, model_name: str | None = None) -> StatusResponse:
        """Remove every adapter of a model."""
        model = self.models.target(model_name)
        await self.models.set_loras(model, {})
        return StatusResponse(status="unloaded")

    # ---- sampling presets ----

    def list_overrides(self) -> OverrideList:
        """Presets in the folder and the overrides in force."""
        presets = [e.name for e in list_files(self.settings.sampler_overrides_dir, PRESET_SUFFIXES)]
        return OverrideList(
            selected_preset=self.overrides.preset, presets=presets, overrides=self.overrides.values
        )

    def switch_overrides(self, body: OverrideSwitchRequest) -> StatusResponse:
        """Switch to a preset file or to inline overrides."""
        if body.preset is not None:
            path = resolve_file(
                self.settings.sampler_overrides_dir, body.preset, PRESET_SUFFIXES, "preset"
            )
            self.overrides.set(body.preset, _read_preset(body.preset, path))
        elif body.overrides is not None:
            self.overrides.set(None, body.overrides)
        else:
            raise InvalidRequestError("give `preset` or `overrides`", param="preset")
        return StatusResponse(status="switched", detail=body.preset)

    def unload_overrides(self) -> StatusResponse:
        """Back to plain request values."""
        self.overrides.clear()
        return StatusResponse(status="unloaded")

    # ---- chat templates ----

    def list_templates(self, model_name: str | None = None) -> TemplateList:
        """Templates in the folder and the one a model renders with."""
        model = self.models.target(model_name)
        names = [e.name for e in list_files(self.settings.templates_dir, TEMPLATE_SUFFIXES)]
        return TemplateList(model=model.id, data=names, active=model.template.origin)

    def switch_template(self, name: str, model_name: str | None = None) -> StatusResponse:
        """Render a model's chats with a template from the folder."""
        model = self.models.target(model_name)
        path = resolve_file(self.settings.templates_dir, name, TEMPLATE_SUFFIXES, "template")
        self.models.set_template(model, read_template_file(path), f"file:{path.name}")
        return StatusResponse(status="switched", detail=name)

    def unload_template(self, model_name: str | None = None) -> StatusResponse:
        """Back to a model's own template."""
        model = self.models.target(model_name)
        self.models.set_template(model, None, "gguf")
        return StatusResponse(status="unloaded")

    # ---- tokens ----

    async def encode(self, body: TokenEncodeRequest) -> TokenEncodeResponse:
        """TabbyAPI's encode: text, or messages rendered through the chat template."""
        model = self.models.resolve(None)
        if isinstance(body.text, str):
            ids = await asyncio.to_thread(model.engine.tokenize, body.text, body.add_bos_token)
        else:
            ids = await asyncio.to_thread(_chat_ids, model, body.text, True)
        return TokenEncodeResponse(tokens=ids, length=len(ids))

    def decode(self, body: TokenDecodeRequest) -> TokenDecodeResponse:
        """TabbyAPI's decode."""
        model = self.models.resolve(None)
        return TokenDecodeResponse(text=model.engine.detokenize(_checked_ids(model, body.tokens)))

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """POST /tokenize: vLLM's `prompt`/`messages` or llama.cpp's `content`, one answer."""
        if not body.parse_special:
            raise InvalidRequestError(
                "parse_special: false is not supported: special-token text is always parsed",
                param="parse_special",
            )
        model = await self.models.acquire(body.model)
        ids = await asyncio.to_thread(_request_ids, model, body)
        tokens: list[int] | list[TokenPiece] = ids
        if body.with_pieces:
            tokens = [TokenPiece(id=t, piece=model.engine.detokenize([t])) for t in ids]
        return TokenizeResponse(
            tokens=tokens, count=len(ids), max_model_len=model.engine.info.context_length
        )

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        """POST /detokenize: the text under both APIs' keys."""
        model = await self.models.acquire(body.model)
        text = model.engine.detokenize(_checked_ids(model, body.tokens))
        return DetokenizeResponse(prompt=text, content=text)

    def tokenizer_info(self) -> TokenizerInfo:
        """What a remote tokenizer client needs."""
        model = self.models.resolve(None)
        info = model.engine.info
        return TokenizerInfo(
            model=model.id,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            bos_token_id=info.bos_token_id,
            eos_token_id=info.eos_token_id,
            chat_template=model.template.source,
            model_max_length=info.context_length,
            vocab_size=info.vocab_size,
        )


async def _next_event(
    queue: asyncio.Queue[ModelLoadProgress], task: asyncio.Task[LoadedModel]
) -> ModelLoadProgress | None:
    """The next progress event, or None once the load finished; the load's error raises."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    if not queue.empty():
        return queue.get_nowait()
    task.result()  # raises the load's error
    return None


async def _progress_events(
    first: ModelLoadProgress | None,
    queue: asyncio.Queue[ModelLoadProgress],
    task: asyncio.Task[LoadedModel],
) -> AsyncIterator[str]:
    event = first
    try:
        while event is not None:
            yield event.model_dump_json()
            event = await _next_event(queue, task)
    except LLMServeError as exc:
        yield StatusResponse(status="error", detail=exc.message).model_dump_json()
    yield "[DONE]"


def _read_preset(name: str, path: Path) -> dict[str, OverrideValue]:
    """A preset file's entries; a file that is not a valid preset is a 400 naming it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"preset {name!r} is not valid YAML: {exc}", param="preset"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise InvalidRequestError(
            f"preset {name!r} must map sampler names to values", param="preset"
        )
    return {field: _preset_entry(name, field, value) for field, value in data.items()}


def _preset_entry(preset: str, field: str, value: object) -> OverrideValue:
    # `{override: V, force: B}` is an entry; any other value (a dict too) is a plain default.
    is_entry = isinstance(value, dict) and bool(value) and set(value) <= {"override", "force"}
    try:
        return OverrideValue.model_validate(value if is_entry else {"override": value})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequestError(
            f"preset {preset!r}, field {field!r}: {problems} "
            "(an entry is `{override: VALUE, force: true|false}` or a plain value)",
            param="preset",
        ) from None


def _chat_ids(
    model: LoadedModel,
    messages: list[ChatMessage],
    generation_prompt: bool,
    continues: bool = False,
) -> list[int]:
    return model.chat_prompt(
        [{"role": m.role, "content": m.text()} for m in messages],
        generation_prompt,
        continue_final=continues,
    )


def _request_ids(model: LoadedModel, body: TokenizeRequest) -> list[int]:
    """The token ids of a /tokenize request, whichever shape it came in."""
    given = [n for n in ("prompt", "messages", "content") if getattr(body, n) is not None]
    if len(given) != 1:
        raise InvalidRequestError(
            "give exactly one of `prompt`, `messages` (vLLM) or `content` (llama.cpp)"
            + (f"; got {', '.join(given)}" if given else ""),
            param=given[-1] if given else "prompt",
        )
    if body.messages is not None:
        return _chat_ids(
            model, body.messages, body.add_generation_prompt, body.continues_final_message()
        )
    text = body.prompt if body.prompt is not None else body.content
    parts = [text] if isinstance(text, str) else text or []
    ids: list[int] = []
    for part in parts:  # llama.cpp's mixed form: special tokens only before the first text
        if isinstance(part, str):
            ids += model.engine.tokenize(part, body.adds_special() and not ids)
        else:
            ids.append(part)
    return _checked_ids(model, ids, "content" if body.content is not None else "prompt")


def _checked_ids(model: LoadedModel, ids: list[int], param: str = "tokens") -> list[int]:
    vocab = model.engine.info.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(
            f"token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", param=param
        )
    return ids


def _quantization(description: str) -> str:
    # llama.cpp's description reads like "llama 135M Q4_1": the last word is the file type.
    return description.split()[-1] if description else "unknown"
