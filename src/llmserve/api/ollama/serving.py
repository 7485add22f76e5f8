"""Ollama requests → GenerationRequests; engine deltas → Ollama's NDJSON lines and answers.

Names: Ollama names models `name:tag`; a served id or alias `x` answers to `x` and `x:latest`
(the manager's rules decide the rest: with one model configured every name is served by it).
`keep_alive: 0` on a load call (an empty prompt or no messages) unloads the models when the
caller holds the admin key; the next Ollama request loads the configured model again. Other
`keep_alive` values are accepted and ignored: models stay loaded until unloaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from llmserve.api.common import new_id
from llmserve.api.errors import retry_headers
from llmserve.api.ollama.protocol import (
    DEFAULT_TAG,
    ChatChunk,
    ChatRequest,
    ChunkBase,
    DoneReason,
    EmbedRequest,
    EmbedResponse,
    ErrorBody,
    GenerateChunk,
    GenerateRequest,
    GenerationFields,
    KeepAlive,
    LegacyEmbeddingRequest,
    LegacyEmbeddingResponse,
    ModelDetails,
    ModelEntry,
    ModelRequest,
    OllamaMessage,
    OllamaOptions,
    PsResponse,
    ResponseFunction,
    ResponseMessage,
    ResponseToolCall,
    RunningModel,
    ShowResponse,
    StatusResponse,
    TagsResponse,
    Timings,
    keep_alive_is_zero,
    timestamp,
)
from llmserve.api.overrides import SamplingOverrides
from llmserve.api.sampling import dialect_params
from llmserve.core import tools as toolcalls
from llmserve.core.constraints import Constraint
from llmserve.core.errors import (
    InvalidRequestError,
    LLMServeError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from llmserve.core.params import SamplingParams
from llmserve.core.request import FinishReason, GenerationRequest, Usage
from llmserve.core.streams import IndexedDelta, open_streams
from llmserve.models.catalog import parse_duration
from llmserve.models.manager import LoadedModel, ModelManager

log = logging.getLogger(__name__)
ChunkMaker = Callable[[str, str, dict[str, Any] | None], ChunkBase]

# Loaded models do not expire (no idle eviction yet): /api/ps shows a far-away expiry.
NEVER = datetime(2999, 12, 31, tzinfo=UTC)
QUANTIZATION = re.compile(r"(I?Q\d\w*|F16|F32|BF16)", re.IGNORECASE)
# Engine field names in errors, as Ollama's `options` spell them.
OPTION_NAMES = {
    "max_tokens": "num_predict",
    "repetition_penalty": "repeat_penalty",
    "penalty_range": "repeat_last_n",
    "mirostat_mode": "mirostat",
    "banned_token_ids": "banned_tokens",
}
ABORTED = "the generation was aborted (server shutdown or an administrator)"
UNSUPPORTED = {
    "create": "llmserve does not create models: put a GGUF file in models_dir instead",
    "copy": "llmserve does not copy models: give one several names with --served-model-name",
    "delete": "llmserve does not delete models over the Ollama API: remove the file instead",
    "push": "llmserve does not push models to a registry",
    "blobs": "llmserve does not take model blobs: put a GGUF file in models_dir instead",
}


def ollama_error_response(exc: LLMServeError) -> JSONResponse:
    """An error as Ollama's {"error": "..."} with its status."""
    return JSONResponse(
        ErrorBody(error=exc.message).model_dump(),
        status_code=exc.status,
        headers=retry_headers(exc),
    )


def unsupported(operation: str) -> InvalidRequestError:
    """The 400 of an Ollama model-management call this server cannot do."""
    return InvalidRequestError(UNSUPPORTED[operation], code="not_supported")


def tagged(name: str) -> str:
    """A served name as Ollama shows it: `name:latest` unless it has a tag."""
    return name if ":" in name.rpartition("/")[2] else f"{name}:{DEFAULT_TAG}"


def untagged(name: str) -> str:
    """A requested name without its default tag: `x:latest` -> `x`."""
    base, sep, tag = name.rpartition(":")
    return base if sep and tag == DEFAULT_TAG and base else name


def _option_params(prompt: str) -> dict[str, str]:
    """Engine field names in errors as an Ollama request spells them (`options.num_predict`)."""
    names = {name: f"options.{name}" for name in SamplingParams.__dataclass_fields__}
    names.update({name: f"options.{alias}" for name, alias in OPTION_NAMES.items()})
    names["prompt"] = prompt
    names.pop("constraint", None)
    return names


# ---- model descriptions ----


def details(model: LoadedModel) -> ModelDetails:
    """Family, size and quantization, read from the engine's one-line description."""
    words = model.engine.info.description.split()
    family = words[0].lower() if words else "unknown"
    quant = next((w.upper() for w in reversed(words) if QUANTIZATION.fullmatch(w)), "unknown")
    return ModelDetails(
        family=family,
        families=[family],
        parameter_size=parameter_size(model.engine.info.n_params),
        quantization_level=quant,
    )


def parameter_size(n_params: int) -> str:
    """Ollama's `parameter_size`: 135M, 3.2B, ..."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n_params >= scale:
            return f"{n_params / scale:.1f}".removesuffix(".0") + unit
    return str(n_params)


def digest(model: LoadedModel) -> str:
    """A stable identifier of the model file (its path, size and time), not a content hash."""
    info = model.engine.info
    key = f"{info.path}\0{info.size_bytes}\0{modified(model).isoformat()}"
    return hashlib.sha256(key.encode()).hexdigest()


def modified(model: LoadedModel) -> datetime:
    """When the model file last changed (when it was loaded, if there is no file)."""
    try:
        return datetime.fromtimestamp(Path(model.engine.info.path).stat().st_mtime, UTC)
    except OSError:
        return datetime.fromtimestamp(model.created, UTC)


def model_info(model: LoadedModel) -> dict[str, Any]:
    """`model_info` as GGUF keys: Copilot needs it non-null, opencode reads the context."""
    info = model.engine.info
    arch = details(model).family
    return {
        "general.architecture": arch,
        "general.basename": model.id,
        "general.parameter_count": info.n_params,
        f"{arch}.context_length": info.context_length,
        f"{arch}.vocab_size": info.vocab_size,
        "llmserve.train_context_length": info.train_context_length,
    }


def entries(model: LoadedModel) -> list[ModelEntry]:
    """/api/tags entries: one per name the model answers to."""
    return [
        ModelEntry(
            name=tagged(name),
            model=tagged(name),
            modified_at=timestamp(modified(model)),
            size=model.engine.info.size_bytes,
            digest=digest(model),
            details=details(model),
        )
        for name in model.names
    ]


# ---- timing ----


@dataclass
class Clock:
    """The moments Ollama's final chunk reports, in perf_counter nanoseconds."""

    started: int = field(default_factory=time.perf_counter_ns)
    loaded: int = 0
    first: int = 0

    def timings(self, usage: Usage | None) -> Timings:
        """The counters and durations of a request that just ended."""
        end = time.perf_counter_ns()
        loaded = self.loaded or self.started
        first = self.first or loaded
        u = usage or Usage(0, 0)
        return Timings(
            total_duration=end - self.started,
            load_duration=loaded - self.started,
            prompt_eval_count=u.prompt_tokens,
            prompt_eval_duration=first - loaded,
            eval_count=u.completion_tokens,
            eval_duration=end - first,
        )


def final_fields(reason: DoneReason, timings: Timings | None) -> dict[str, Any]:
    """The fields of a final chunk."""
    out: dict[str, Any] = {"done": True, "done_reason": reason}
    if timings is not None:
        out.update(timings.model_dump())
    return out


# ---- one generation ----


@dataclass(frozen=True)
class Piece:
    """New output: text, tool calls read out of it, and (last) why and how it ended."""

    text: str = ""
    calls: tuple[toolcalls.ToolCall, ...] = ()
    token_ids: tuple[int, ...] = ()
    reason: DoneReason | None = None
    timings: Timings | None = None


@dataclass
class Run:
    """A generation in flight, read as Pieces (tool calls split out when tools are offered)."""

    deltas: AsyncIterator[IndexedDelta]
    clock: Clock
    tools: toolcalls.ToolPlan | None = None

    async def pieces(self) -> AsyncIterator[Piece]:
        """The output as it comes; the last piece has `reason` and `timings`."""
        splitter = toolcalls.ToolStream(self.tools) if self.tools else None
        usage: Usage | None = None
        async for item in self.deltas:
            d = item.delta
            usage = d.usage or usage
            if d.finish_reason is FinishReason.ABORT:
                raise ServiceUnavailableError(ABORTED)
            text = d.text if splitter is None else splitter.feed(d.text)[0]
            if d.finish_reason is None:
                if text or d.token_ids:
                    yield Piece(text, (), d.token_ids)
                continue
            calls: tuple[toolcalls.ToolCall, ...] = ()
            if splitter is not None:
                tail, deltas, made_calls = splitter.finish()
                text += tail
                calls = _calls(deltas) if made_calls else ()
            reason: DoneReason = "length" if d.finish_reason is FinishReason.LENGTH else "stop"
            yield Piece(text, calls, d.token_ids, reason, self.clock.timings(usage))


def _calls(deltas: list[toolcalls.ToolCallDelta]) -> tuple[toolcalls.ToolCall, ...]:
    """Whole calls from their deltas (under `auto` each call comes as one delta)."""
    merged: dict[int, list[str]] = {}
    heads: dict[int, tuple[str, str]] = {}
    for d in deltas:
        if d.name is not None:
            heads[d.index] = (d.id or toolcalls.new_call_id(), d.name)
        merged.setdefault(d.index, []).append(d.arguments)
    return tuple(
        toolcalls.ToolCall(heads[i][0], heads[i][1], "".join(merged[i])) for i in sorted(heads)
    )


def response_calls(calls: tuple[toolcalls.ToolCall, ...]) -> list[ResponseToolCall] | None:
    """Calls in Ollama's shape: arguments as an object, never as JSON text."""
    if not calls:
        return None
    return [
        ResponseToolCall(
            id=call.id,
            function=ResponseFunction(index=i, name=call.name, arguments=_arguments(call)),
        )
        for i, call in enumerate(calls)
    ]


def _arguments(call: toolcalls.ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


async def ndjson(chunks: AsyncIterator[ChunkBase]) -> AsyncIterator[str]:
    """Chunks as NDJSON lines; an error after the first line becomes a last `{"error"}` line."""
    try:
        async for chunk in chunks:
            yield chunk.line()
    except LLMServeError as exc:
        yield ErrorBody(error=exc.message).model_dump_json() + "\n"


async def one_line(answer: BaseModel) -> AsyncIterator[str]:
    """A stream of one line (a load, an unload or a pull answered to a streaming client)."""
    yield answer.model_dump_json(exclude_none=True) + "\n"


# ---- the dialect ----


class OllamaServing:
    """Serves Ollama's native API over the model manager."""

    def __init__(self, models: ModelManager, overrides: SamplingOverrides):
        self.models = models
        self.overrides = overrides
        # Set when keep_alive: 0 unloaded the models: the next request loads them again.
        self._unloaded: list[ModelEntry] | None = None
        self._reload = asyncio.Lock()

    # ---- model listing ----

    def tags(self) -> TagsResponse:
        """GET /api/tags: every name of every loaded model (or the unloaded, reloadable ones)."""
        listed = [entry for model in self.models.visible() for entry in entries(model)]
        return TagsResponse(models=listed or list(self._unloaded or ()))

    def ps(self) -> PsResponse:
        """GET /api/ps: the loaded models."""
        return PsResponse(
            models=[
                RunningModel(
                    name=tagged(model.id),
                    model=tagged(model.id),
                    size=model.engine.info.size_bytes,
                    digest=digest(model),
                    details=details(model),
                    expires_at=timestamp(_expires_at(model)),
                    size_vram=0,
                    context_length=model.engine.info.context_length,
                )
                for model in self.models.visible()
            ]
        )

    async def show(self, body: ModelRequest) -> ShowResponse:
        """POST /api/show: details, GGUF-style model_info and capabilities."""
        model = await self._acquire(body.requested())
        info = model.engine.info
        return ShowResponse(
            modelfile=f"# served by llmserve\nFROM {info.path}\n",
            parameters="",
            template=model.template.source or "",
            details=details(model),
            model_info=model_info(model),
            # Tools work with every template: templates without them get a tool prompt.
            capabilities=["completion", "tools"],
            modified_at=timestamp(modified(model)),
        )

    def pull(self, body: ModelRequest) -> StatusResponse:
        """POST /api/pull: success for a model served here; nothing is ever downloaded."""
        requested = untagged(body.requested())
        present = {n for m in self.models.loaded() for n in m.names}
        present |= {entry.name for entry in self._unloaded or ()}
        present |= {untagged(entry.name) for entry in self._unloaded or ()}
        present |= {entry.name for entry in self.models.available()}
        if requested not in present:
            raise ModelNotFoundError(
                f"llmserve does not download models and does not serve `{body.requested()}`; "
                f"served: {', '.join(sorted(tagged(n) for n in present)) or 'none'}",
                param="model",
            )
        return StatusResponse(status="success")

    # ---- embeddings ----

    async def embed(self, body: EmbedRequest) -> EmbedResponse:
        """POST /api/embed: normalized vectors; too long inputs cut unless truncate is off."""
        if body.dimensions is not None:
            raise InvalidRequestError(
                "dimensions is not supported: vectors have the model's own size",
                param="dimensions",
            )
        started = time.perf_counter_ns()
        model = await self._acquire(body.model)
        prompts = await asyncio.to_thread(_embedding_prompts, model, body.texts(), body.truncate)
        with dialect_params({"prompts": "input"}):
            vectors = await model.engine.embed(prompts)
        return EmbedResponse(
            model=body.model or tagged(model.id),
            embeddings=vectors,
            total_duration=time.perf_counter_ns() - started,
            prompt_eval_count=sum(len(p) for p in prompts),
        )

    async def embeddings(self, body: LegacyEmbeddingRequest) -> LegacyEmbeddingResponse:
        """POST /api/embeddings: one vector for `prompt`, not normalized (Ollama's older route)."""
        model = await self._acquire(body.model)
        prompts = await asyncio.to_thread(_embedding_prompts, model, [body.prompt], False)
        with dialect_params({"prompts": "prompt"}):
            (vector,) = await model.engine.embed(prompts, normalize=False)
        return LegacyEmbeddingResponse(embedding=vector)

    # ---- generation ----

    async def chat(self, body: ChatRequest, admin: bool) -> ChunkBase | AsyncIterator[str]:
        """POST /api/chat: the answer, or NDJSON lines when streaming (the default)."""
        _log_unknown(body, "ollama chat")
        _refuse_images(body.messages)
        if not body.messages:
            return await self._load_call(body, admin, self._chat_chunk)
        clock = Clock()
        model = await self._acquire(body.model)
        self._keep_alive(model, body.keep_alive)
        clock.loaded = time.perf_counter_ns()
        plan = _tool_plan(body)
        options = self._options(body)
        prompt_ids, constraint = await asyncio.to_thread(_prepare_chat, model, body, plan)
        run = await self._start(model, prompt_ids, options, constraint, clock, "messages")
        run.tools = plan if plan is not None and plan.active else None
        name = self._echo(body, model)
        if body.stream:
            return ndjson(self._chat_stream(run, name))
        return await self._chat_collect(run, name)

    async def generate(self, body: GenerateRequest, admin: bool) -> ChunkBase | AsyncIterator[str]:
        """POST /api/generate: the answer, or NDJSON lines when streaming (the default)."""
        _log_unknown(body, "ollama generate")
        _refuse_generate_fields(body)
        if not body.prompt and not body.context:
            return await self._load_call(body, admin, self._generate_chunk)
        clock = Clock()
        model = await self._acquire(body.model)
        self._keep_alive(model, body.keep_alive)
        clock.loaded = time.perf_counter_ns()
        options = self._options(body)
        prompt_ids = await asyncio.to_thread(_prepare_generate, model, body)
        constraint = body.output_constraint()
        run = await self._start(model, prompt_ids, options, constraint, clock, "prompt")
        name = self._echo(body, model)
        if body.stream:
            return ndjson(self._generate_stream(run, name, prompt_ids))
        return await self._generate_collect(run, name, prompt_ids)

    def _options(self, body: GenerationFields) -> OllamaOptions:
        # The preset first (it fills what the request left unset), then Ollama's defaults.
        return self.overrides.apply(body.options).with_ollama_defaults()

    async def _start(
        self,
        model: LoadedModel,
        prompt_ids: list[int],
        options: OllamaOptions,
        constraint: Constraint | None,
        clock: Clock,
        prompt_param: str,
    ) -> Run:
        with dialect_params(_option_params(prompt_param)):
            params = options.sampling_params(n=1)
            params = replace(params, constraint=constraint)
            params = _bounded_by_num_ctx(
                params, options.num_ctx, len(prompt_ids), model.engine.info.context_length
            )
            request = GenerationRequest(new_id("ollama"), prompt_ids, params)
            deltas = await open_streams([model.engine.generate(request)])
        clock.first = time.perf_counter_ns()
        return Run(deltas, clock)

    def _keep_alive(self, model: LoadedModel, value: KeepAlive) -> None:
        """A request's keep_alive becomes the model's idle time before unloading.

        The manager never unloads the default or a pinned model this way; Go durations it
        cannot read (`1h30m`) are ignored.
        """
        if value is None:
            return
        try:
            seconds = parse_duration(value)
        except ValueError:
            log.debug("keep_alive %r is not a duration llmserve reads; ignored", value)
            return
        self.models.set_keep_alive(model, seconds)

    def _echo(self, body: GenerationFields, model: LoadedModel) -> str:
        """The name a response carries: the client's, as Ollama echoes it."""
        return body.model or tagged(model.id)

    # ---- loading and unloading ----

    async def _acquire(self, requested: str) -> LoadedModel:
        """The model that serves `requested`, reloading what keep_alive: 0 unloaded."""
        if self._unloaded is not None and not self.models.loaded():
            async with self._reload:
                if not self.models.loaded() and self.models.loading is None:
                    log.info("loading the configured model again after keep_alive: 0")
                    await self.models.load_configured()
        if self.models.loaded():
            self._unloaded = None  # served again (by this reload or any other load)
        served = {name for model in self.models.loaded() for name in model.names}
        name = requested if requested in served else untagged(requested)
        return await self.models.acquire(name or None)

    async def _load_call(
        self,
        body: GenerationFields,
        admin: bool,
        chunk: ChunkMaker,
    ) -> ChunkBase | AsyncIterator[str]:
        """An empty prompt: load the model (or with keep_alive: 0 and the admin key, unload)."""
        if keep_alive_is_zero(body.keep_alive) and admin:
            model = await self._acquire(body.model)
            name = self._echo(body, model)
            self._unloaded = [entry for m in self.models.loaded() for entry in entries(m)]
            unloaded = await self.models.unload(model.id)
            log.info("keep_alive: 0 unloaded %s", ", ".join(unloaded))
            answer: ChunkBase = chunk(name, "", final_fields("unload", None))
        else:
            if keep_alive_is_zero(body.keep_alive):
                log.info("keep_alive: 0 without the admin key: the model stays loaded")
            model = await self._acquire(body.model)
            answer = chunk(self._echo(body, model), "", final_fields("load", None))
        return one_line(answer) if body.stream else answer

    # ---- writers ----

    @staticmethod
    def _chat_chunk(
        name: str,
        text: str,
        final: dict[str, Any] | None = None,
        calls: tuple[toolcalls.ToolCall, ...] = (),
    ) -> ChatChunk:
        message = ResponseMessage(content=text, tool_calls=response_calls(calls))
        fields = final or {"done": False}
        return ChatChunk(model=name, created_at=timestamp(), message=message, **fields)

    @staticmethod
    def _generate_chunk(
        name: str, text: str, final: dict[str, Any] | None = None, context: list[int] | None = None
    ) -> GenerateChunk:
        fields = final or {"done": False}
        return GenerateChunk(
            model=name, created_at=timestamp(), response=text, context=context, **fields
        )

    async def _chat_stream(self, run: Run, name: str) -> AsyncIterator[ChatChunk]:
        async for piece in run.pieces():
            if piece.reason is None:
                if piece.text:
                    yield self._chat_chunk(name, piece.text)
                continue
            if piece.text or piece.calls:
                yield self._chat_chunk(name, piece.text, calls=piece.calls)
            yield self._chat_chunk(name, "", final_fields(piece.reason, piece.timings))

    async def _chat_collect(self, run: Run, name: str) -> ChatChunk:
        text: list[str] = []
        async for piece in run.pieces():
            text.append(piece.text)
            if piece.reason is not None:
                final = final_fields(piece.reason, piece.timings)
                return self._chat_chunk(name, "".join(text), final, piece.calls)
        raise ServiceUnavailableError(ABORTED)  # the engine ended without a final delta

    async def _generate_stream(
        self, run: Run, name: str, prompt_ids: list[int]
    ) -> AsyncIterator[GenerateChunk]:
        context = list(prompt_ids)
        async for piece in run.pieces():
            context.extend(piece.token_ids)
            if piece.text:
                yield self._generate_chunk(name, piece.text)
            if piece.reason is not None:
                final = final_fields(piece.reason, piece.timings)
                yield self._generate_chunk(name, "", final, context)

    async def _generate_collect(self, run: Run, name: str, prompt_ids: list[int]) -> GenerateChunk:
        text: list[str] = []
        context = list(prompt_ids)
        async for piece in run.pieces():
            text.append(piece.text)
            context.extend(piece.token_ids)
            if piece.reason is not None:
                final = final_fields(piece.reason, piece.timings)
                return self._generate_chunk(name, "".join(text), final, context)
        raise ServiceUnavailableError(ABORTED)


# ---- request translation ----


def _expires_at(model: LoadedModel) -> datetime:
    """When an idle model would be unloaded (far away when it never is)."""
    if model.keep_alive is None or model.pinned:
        return NEVER
    idle_for = time.monotonic() - model.last_used
    return datetime.now(UTC) + timedelta(seconds=max(0.0, model.keep_alive - idle_for))


def _embedding_prompts(model: LoadedModel, texts: list[str], truncate: bool) -> list[list[int]]:
    """Token ids of each text; longer than the context: cut (truncate) or a 400 naming input."""
    limit = model.engine.info.context_length
    prompts = []
    for index, text in enumerate(texts):
        ids = model.engine.tokenize(text, True)
        if len(ids) > limit and not truncate:
            raise InvalidRequestError(
                f"input {index} has {len(ids)} tokens; the context holds {limit} "
                "(send truncate: true to cut it)",
                param="input",
            )
        prompts.append(ids[:limit])
    return prompts


def _log_unknown(body: GenerationFields, route: str) -> None:
    if unknown := body.unknown_fields():
        log.debug("%s: ignoring unknown fields %s", route, unknown)


def _refuse_images(messages: list[OllamaMessage]) -> None:
    for index, message in enumerate(messages):
        if message.images:
            raise InvalidRequestError(
                "images are not supported: the model has no vision",
                param=f"messages[{index}].images",
            )


def _refuse_generate_fields(body: GenerateRequest) -> None:
    """400 naming a field this server cannot honour: images, a template override, a suffix."""
    if body.images:
        raise InvalidRequestError(
            "images are not supported: the model has no vision", param="images"
        )
    if body.template:
        raise InvalidRequestError(
            "template overrides are not supported: the model's chat template (or the server's "
            "--chat-template) is used; send raw: true with a prompt you formatted yourself",
            param="template",
        )
    if body.suffix:
        raise InvalidRequestError(
            "suffix (fill-in-the-middle) is not supported by this model", param="suffix"
        )


def _bounded_by_num_ctx(
    params: SamplingParams, num_ctx: int | None, prompt: int, context: int
) -> SamplingParams:
    """num_predict and num_ctx fitted to the server, never refused (as Ollama).

    A num_ctx below the server's context bounds prompt plus output; a larger one, or one the
    prompt does not fit in, is the server's context. num_predict stops where the context ends.
    """
    limit = num_ctx if num_ctx is not None and prompt < num_ctx < context else context
    room = limit - prompt
    if room <= 0:
        return params  # the prompt alone overflows the context: the engine's 400 says so
    if params.max_tokens is None and limit == context:
        return params
    return replace(params, max_tokens=min(params.max_tokens or room, room))


def _tool_plan(body: ChatRequest) -> toolcalls.ToolPlan | None:
    """Ollama's tools (no tool_choice: the model decides, OpenAI's `auto`)."""
    if not body.tools:
        return None
    functions = tuple(
        toolcalls.ToolFunction(t.function.name, t.function.description, t.function.parameters)
        for t in body.tools
    )
    return toolcalls.ToolPlan(functions)


def _turns(messages: list[OllamaMessage]) -> list[toolcalls.Turn]:
    """Messages, dialect-neutral; a tool result is tied to the latest call of its tool."""
    turns: list[toolcalls.Turn] = []
    last_call: dict[str | None, str] = {}
    for index, m in enumerate(messages):
        calls = tuple(
            toolcalls.ToolCall(c.id or f"call_{index}_{i}", c.function.name, _arguments_text(c))
            for i, c in enumerate(m.tool_calls or ())
        )
        for call in calls:
            last_call[call.name] = last_call[None] = call.id
        call_id = last_call.get(m.tool_name) if m.role == "tool" else None
        turns.append(
            toolcalls.Turn(
                role=m.role,
                content=m.content or "",
                name=m.tool_name if m.role == "tool" else None,
                tool_calls=calls,
                tool_call_id=call_id,
            )
        )
    return turns


def _arguments_text(call: Any) -> str:
    arguments = call.function.arguments
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _prepare_chat(
    model: LoadedModel, body: ChatRequest, plan: toolcalls.ToolPlan | None
) -> tuple[list[int], Constraint | None]:
    """Prompt token ids and constraint (a worker thread: rendering is slow)."""
    constraint = body.output_constraint()
    native = model.template.supports_tools
    messages = toolcalls.template_messages(_turns(body.messages), plan, native)
    last = body.messages[-1]
    # As Ollama: a final assistant message with text is continued, not answered.
    continues = last.role == "assistant" and bool(last.content) and not last.tool_calls
    prompt_ids = model.chat_prompt(
        messages,
        add_generation_prompt=not continues,
        tools=toolcalls.template_tools(plan) if native else None,
        continue_final=continues,
    )
    return prompt_ids, constraint


def _prepare_generate(model: LoadedModel, body: GenerateRequest) -> list[int]:
    """The prompt's ids: as written with `raw`, else in the chat template as a user turn."""
    context = list(body.context or ())
    if body.raw:
        return context + model.engine.tokenize(body.prompt, not context)
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": body.system})
    messages.append({"role": "user", "content": body.prompt})
    return context + model.chat_prompt(messages)
