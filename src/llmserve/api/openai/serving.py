"""OpenAI requests → GenerationRequests; engine deltas → OpenAI responses and stream chunks."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from llmserve.api.common import FunctionCall, ToolCall, chat_turns, error_body, new_id, now
from llmserve.api.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    FunctionCallChunk,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ToolCallChunk,
    UsageInfo,
)
from llmserve.api.overrides import SamplingOverrides
from llmserve.api.sampling import dialect_params
from llmserve.core import tools as toolcalls
from llmserve.core.constraints import Constraint
from llmserve.core.errors import InvalidRequestError, LLMServeError
from llmserve.core.request import Delta, GenerationRequest, TokenLogprob, Usage
from llmserve.core.streams import IndexedDelta, open_streams
from llmserve.models.manager import LoadedModel, ModelManager

log = logging.getLogger(__name__)

DONE = "[DONE]"
TOOL_CALLS = "tool_calls"  # the finish_reason of a choice that ends in tool calls
# Engine field names in errors, as the completions request spells them.
COMPLETION_PARAMS = {"banned_token_ids": "banned_tokens"}
EMBEDDING_PARAMS = {"prompts": "input"}
# Inputs of one embeddings request (OpenAI's bound) and their tokens together: the engine embeds
# them between generation steps, so the bound is on how long one request occupies it (minutes
# for the default model on 2 CPU cores), not on what would stall other streams.
MAX_EMBEDDING_INPUTS = 2048
MAX_EMBEDDING_TOKENS = 65_536


def usage_info(usage: Usage) -> UsageInfo:
    """Engine usage in OpenAI's shape."""
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def add_usage(total: Usage | None, more: Usage | None) -> Usage | None:
    """Sum the usage of several prompts of one request."""
    if more is None:
        return total
    if total is None:
        return more
    return Usage(
        total.prompt_tokens + more.prompt_tokens,
        total.completion_tokens + more.completion_tokens,
        total.cached_tokens + more.cached_tokens,
    )


@dataclass
class ChoiceState:
    """What one choice has produced so far (for non-streaming responses)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: Delta) -> None:
        """Fold a delta in."""
        self.text.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = str(delta.finish_reason)
            self.stop_reason = delta.stop_reason


class OpenAIServing:
    """Serves the OpenAI dialect over the model manager."""

    def __init__(self, models: ModelManager, overrides: SamplingOverrides):
        self.models = models
        self.overrides = overrides

    # ---- models ----

    def list_models(self, include_available: bool = False) -> ModelList:
        """GET /v1/models: loaded models and those this key may load (all, for the admin key)."""
        cards: list[ModelCard] = []
        for state in self.models.catalog(may_load=include_available):
            if state.model is not None:
                cards += self._cards(state.model)
            else:
                cards.append(ModelCard(id=state.id, created=0, status=state.status))
        if any(card.status is not None for card in cards) or include_available:
            for card in cards:
                card.status = card.status or "loaded"
                card.loaded = card.status == "loaded"
        return ModelList(data=cards)

    def model_card(self, name: str) -> ModelCard:
        """GET /v1/models/{name}."""
        model = self.models.get(name)
        return next(card for card in self._cards(model) if card.id == name)

    @staticmethod
    def _cards(model: LoadedModel) -> list[ModelCard]:
        return [
            ModelCard(
                id=name,
                created=model.created,
                root=model.engine.info.path,
                parent=None if name == model.id else model.id,
                max_model_len=model.engine.info.context_length,
            )
            for name in model.names
        ]

    # ---- completions ----

    async def completion(self, body: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """POST /v1/completions: a response, or an iterator of SSE data lines when streaming."""
        body.log_unknown_fields("completions")
        body = self.overrides.apply(body)
        model = await self.models.acquire(body.model)
        prompts = await self._tokenize_prompts(model, body)
        n = body.n or 1
        params = body.sampling_params(
            n=n,
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
        )
        params = replace(params, constraint=body.output_constraint())
        request_id = new_id("cmpl")
        with dialect_params(COMPLETION_PARAMS):
            streams = [
                model.engine.generate(GenerationRequest(f"{request_id}-{i}", ids, params))
                for i, ids in enumerate(prompts)
            ]
            deltas = await open_streams(streams)
        writer = CompletionWriter(model, body, request_id, prompts, n)
        if body.stream:
            return writer.stream(deltas)
        return await writer.collect(deltas)

    async def _tokenize_prompts(
        self, model: LoadedModel, body: CompletionRequest
    ) -> list[list[int]]:
        prompts = body.prompts()
        if not prompts:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        out: list[list[int]] = []
        for prompt in prompts:
            ids = (
                await asyncio.to_thread(model.engine.tokenize, prompt, True)
                if isinstance(prompt, str)
                else list(prompt)
            )
            if not ids:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            out.append(ids)
        return out

    # ---- embeddings ----

    async def embeddings(self, body: EmbeddingRequest) -> EmbeddingResponse:
        """POST /v1/embeddings: one vector per input, in input order."""
        if body.model_extra:
            log.debug("embeddings: ignoring unknown fields %s", sorted(body.model_extra))
        if body.dimensions is not None:
            raise InvalidRequestError(
                "dimensions is not supported: vectors have the model's own size",
                param="dimensions",
                code="unsupported_parameter",
            )
        inputs = body.inputs()
        _check_inputs(inputs)
        model = await self.models.acquire(body.model)
        prompts = await asyncio.to_thread(_tokenize_inputs, model, inputs)
        with dialect_params(EMBEDDING_PARAMS):
            vectors = await model.engine.embed(prompts)
        tokens = sum(len(p) for p in prompts)
        encode = _base64_vector if body.encoding_format == "base64" else None
        return EmbeddingResponse(
            data=[
                EmbeddingData(index=i, embedding=encode(v) if encode else v)
                for i, v in enumerate(vectors)
            ],
            model=model.id,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    # ---- chat ----

    async def chat(
        self, body: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """POST /v1/chat/completions: a response, or an iterator of SSE data lines."""
        body.log_unknown_fields("chat/completions")
        body = self.overrides.apply(body)
        continues = body.continues_final_message()
        model = await self.models.acquire(body.model)
        plan = body.tool_plan()
        prompt_ids, constraint = await asyncio.to_thread(
            self._prepare_chat, model, body, plan, continues
        )
        n = body.n or 1
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(n=n, logprobs=top)
        params = replace(params, constraint=constraint)
        request_id = new_id("chatcmpl")
        with dialect_params(_chat_params(body)):
            deltas = await open_streams(
                [model.engine.generate(GenerationRequest(request_id, prompt_ids, params))]
            )
        active = plan if plan is not None and plan.active else None
        writer = ChatWriter(model, body, request_id, n, active)
        if body.stream:
            return writer.stream(deltas)
        return await writer.collect(deltas)

    @staticmethod
    def _prepare_chat(
        model: LoadedModel,
        body: ChatCompletionRequest,
        plan: toolcalls.ToolPlan | None,
        continues: bool,
    ) -> tuple[list[int], Constraint | None]:
        """The prompt's token ids and the output constraint (a worker thread: rendering is slow)."""
        constraint = body.output_constraint()
        tool_constraint = plan.constraint() if plan is not None else None
        if constraint is not None and tool_constraint is not None:
            raise InvalidRequestError(
                "a forced tool call and an output constraint cannot be combined",
                param="tool_choice",
            )
        native = model.template.supports_tools
        messages = toolcalls.template_messages(chat_turns(body.messages), plan, native)
        prompt_ids = model.chat_prompt(
            messages,
            body.add_generation_prompt is not False,
            body.chat_template_kwargs,
            tools=toolcalls.template_tools(plan) if native else None,
            continue_final=continues,
        )
        return prompt_ids, constraint or tool_constraint


def _check_inputs(inputs: Sequence[str | list[int]]) -> None:
    """Refuse no input, an empty one, and more inputs than MAX_EMBEDDING_INPUTS (400 `input`)."""
    if not inputs:
        raise InvalidRequestError("input must not be empty", param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequestError(
            f"input has {len(inputs)} entries; at most {MAX_EMBEDDING_INPUTS} are accepted",
            param="input",
        )
    for index, item in enumerate(inputs):
        if not item:
            raise InvalidRequestError(f"input[{index}] is empty", param="input")


def _tokenize_inputs(model: LoadedModel, inputs: Sequence[str | list[int]]) -> list[list[int]]:
    """Token ids of every input, within MAX_EMBEDDING_TOKENS (a worker thread)."""
    prompts: list[list[int]] = []
    total = 0
    for index, item in enumerate(inputs):
        ids = model.engine.tokenize(item, True) if isinstance(item, str) else list(item)
        if not ids:
            raise InvalidRequestError(f"input[{index}] has no tokens", param="input")
        total += len(ids)
        if total > MAX_EMBEDDING_TOKENS:
            raise InvalidRequestError(
                f"input has more than {MAX_EMBEDDING_TOKENS} tokens in all",
                param="input",
            )
        prompts.append(ids)
    return prompts


def _base64_vector(vector: list[float]) -> str:
    """A vector as OpenAI encodes it: base64 of little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _chat_params(body: ChatCompletionRequest) -> dict[str, str]:
    """Engine field names in errors, as the chat request spells them (the prompt is messages)."""
    return {
        "prompt": "messages",
        "max_tokens": body.output_limit_param(),
        "banned_token_ids": "banned_tokens",
    }


def _sse(chunk: CompletionResponse | ChatCompletionChunk) -> str:
    """A stream chunk as JSON; `usage` appears only on the chunk that carries it (as OpenAI)."""
    data = chunk.model_dump(mode="json")
    if data.get("usage") is None:
        del data["usage"]
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


class CompletionWriter:
    """Turns completion deltas into a response or stream chunks."""

    def __init__(
        self,
        model: LoadedModel,
        body: CompletionRequest,
        request_id: str,
        prompts: list[list[int]],
        n: int,
    ):
        self.model = model
        self.body = body
        self.request_id = request_id
        self.prompts = prompts
        self.n = n
        self.created = now()
        self.offsets: dict[int, int] = {}

    def _choice_index(self, item: IndexedDelta) -> int:
        return item.prompt_index * self.n + item.delta.index

    def _echo_text(self, prompt_index: int) -> str:
        prompt = self.body.prompts()[prompt_index]
        if isinstance(prompt, str):
            return prompt
        return self.model.engine.detokenize(list(prompt))

    def _first_text(self, item: IndexedDelta, index: int) -> str:
        """The delta's text, preceded by the prompt on a choice's first delta when echoing."""
        if index in self.offsets or not self.body.echo:
            return item.delta.text
        return self._echo_text(item.prompt_index) + item.delta.text

    def _logprobs(
        self, item: IndexedDelta, index: int, text_start: int
    ) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        out = CompletionLogprobs()
        offset = text_start
        prompt = self.prompts[item.prompt_index]
        if item.delta.prompt_logprobs is not None:
            for position, entry in enumerate(item.delta.prompt_logprobs):
                offset = self._append_logprob(out, entry, prompt[position], offset)
        for entry in item.delta.logprobs:
            offset = self._append_logprob(out, entry, entry.token_id, offset)
        return out

    def _append_logprob(
        self, out: CompletionLogprobs, entry: TokenLogprob | None, token_id: int, offset: int
    ) -> int:
        token = entry.token if entry else self.model.engine.detokenize([token_id])
        out.tokens.append(token)
        out.text_offset.append(offset)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            out.token_logprobs.append(entry.logprob)
            top = {alt.token: alt.logprob for alt in entry.top}
            top.setdefault(entry.token, entry.logprob)
            out.top_logprobs.append(top)
        return offset + len(token)

    def _choice(self, item: IndexedDelta) -> CompletionChoice:
        index = self._choice_index(item)
        text = self._first_text(item, index)
        start = self.offsets.get(index, 0)
        logprobs = self._logprobs(item, index, start)
        self.offsets[index] = start + len(text)
        d = item.delta
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=str(d.finish_reason) if d.finish_reason else None,
            stop_reason=d.stop_reason,
        )

    async def collect(self, deltas: AsyncIterator[IndexedDelta]) -> CompletionResponse:
        """The whole non-streaming response."""
        choices: dict[int, CompletionChoice] = {}
        usage: Usage | None = None
        async for item in deltas:
            usage = add_usage(usage, item.delta.usage)
            part = self._choice(item)
            choices[part.index] = _merge_completion_choice(choices.get(part.index), part)
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model.id,
            choices=[choices[i] for i in sorted(choices)],
            usage=usage_info(usage or Usage(0, 0)),
        )

    async def stream(self, deltas: AsyncIterator[IndexedDelta]) -> AsyncIterator[str]:
        """SSE data lines: a chunk per delta, optionally usage, then [DONE]."""
        usage: Usage | None = None
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        async for item in _guard(deltas):
            if isinstance(item, str):
                yield item
                continue
            usage = add_usage(usage, item.delta.usage)
            chunk = self._chunk([self._choice(item)])
            yield _sse(chunk)
        if include_usage and usage is not None:
            yield _sse(self._chunk([], usage_info(usage)))
        yield DONE

    def _chunk(
        self, choices: list[CompletionChoice], usage: UsageInfo | None = None
    ) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model.id,
            choices=choices,
            usage=usage,
        )


def _merge_completion_choice(
    old: CompletionChoice | None, new: CompletionChoice
) -> CompletionChoice:
    if old is None:
        return new
    logprobs = old.logprobs
    if logprobs is not None and new.logprobs is not None:
        logprobs.tokens += new.logprobs.tokens
        logprobs.token_logprobs += new.logprobs.token_logprobs
        logprobs.top_logprobs += new.logprobs.top_logprobs
        logprobs.text_offset += new.logprobs.text_offset
    return CompletionChoice(
        index=old.index,
        text=old.text + new.text,
        logprobs=logprobs,
        finish_reason=new.finish_reason or old.finish_reason,
        stop_reason=new.stop_reason if new.finish_reason else old.stop_reason,
    )


class ChatWriter:
    """Turns chat deltas into a response or stream chunks (tool calls read out when offered)."""

    def __init__(
        self,
        model: LoadedModel,
        body: ChatCompletionRequest,
        request_id: str,
        n: int,
        tools: toolcalls.ToolPlan | None = None,
    ):
        self.model = model
        self.body = body
        self.request_id = request_id
        self.n = n
        self.tools = tools
        self.created = now()

    def _logprobs(self, delta: Delta) -> ChatLogprobs | None:
        if not self.body.logprobs:
            return None
        return ChatLogprobs(content=[_chat_logprob(e) for e in delta.logprobs])

    async def collect(self, deltas: AsyncIterator[IndexedDelta]) -> ChatCompletionResponse:
        """The whole non-streaming response."""
        states = {i: ChoiceState() for i in range(self.n)}
        usage: Usage | None = None
        async for item in deltas:
            usage = add_usage(usage, item.delta.usage)
            states[item.delta.index].add(item.delta)
        choices = [self._final_choice(i, s) for i, s in states.items()]
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model.id,
            choices=choices,
            usage=usage_info(usage or Usage(0, 0)),
        )

    def _final_choice(self, index: int, state: ChoiceState) -> ChatChoice:
        logprobs = None
        if self.body.logprobs:
            logprobs = ChatLogprobs(content=[_chat_logprob(e) for e in state.logprobs if e])
        text = "".join(state.text)
        content, calls = toolcalls.split_tool_calls(text, self.tools) if self.tools else (text, [])
        return ChatChoice(
            index=index,
            message=ChatResponseMessage(
                content=content,
                tool_calls=[
                    ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                    for c in calls
                ],
            ),
            logprobs=logprobs,
            finish_reason=TOOL_CALLS if calls else state.finish_reason,
            stop_reason=None if calls else state.stop_reason,
        )

    async def stream(self, deltas: AsyncIterator[IndexedDelta]) -> AsyncIterator[str]:
        """SSE data lines: role chunk, content chunks, finish chunk, optional usage, [DONE]."""
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        # One first chunk, tools or not: the role and empty content, as OpenAI and vLLM send it.
        first = ChatDelta(role="assistant", content="")
        for index in range(self.n):
            yield _sse(self._chunk([ChatChunkChoice(index=index, delta=first)]))
        splitters = {i: toolcalls.ToolStream(self.tools) for i in range(self.n) if self.tools}
        usage: Usage | None = None
        async for item in _guard(deltas):
            if isinstance(item, str):
                yield item
                continue
            d = item.delta
            usage = add_usage(usage, d.usage)
            splitter = splitters.get(d.index)
            choice = self._stream_choice(d) if splitter is None else self._tool_choice(d, splitter)
            if choice is not None:
                yield _sse(self._chunk([choice]))
        if include_usage and usage is not None:
            yield _sse(self._chunk([], usage=usage_info(usage)))
        yield DONE

    def _stream_choice(self, d: Delta) -> ChatChunkChoice:
        return ChatChunkChoice(
            index=d.index,
            delta=ChatDelta(content=d.text) if d.text or not d.finish_reason else ChatDelta(),
            logprobs=self._logprobs(d),
            finish_reason=str(d.finish_reason) if d.finish_reason else None,
            stop_reason=d.stop_reason,
        )

    def _tool_choice(self, d: Delta, splitter: toolcalls.ToolStream) -> ChatChunkChoice | None:
        """A chunk of a choice whose output may hold tool calls; None when nothing is new."""
        content, calls = splitter.feed(d.text)
        finish_reason = str(d.finish_reason) if d.finish_reason else None
        stop_reason = d.stop_reason
        if d.finish_reason is not None:
            tail, more, made_calls = splitter.finish()
            content, calls = content + tail, calls + more
            if made_calls:
                finish_reason, stop_reason = TOOL_CALLS, None
        if not content and not calls and finish_reason is None and not self.body.logprobs:
            return None
        return ChatChunkChoice(
            index=d.index,
            delta=ChatDelta(content=content or None, tool_calls=_call_chunks(calls) or None),
            logprobs=self._logprobs(d),
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )

    def _chunk(
        self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id,
            created=self.created,
            model=self.model.id,
            choices=choices,
            usage=usage,
        )


def _call_chunks(deltas: list[toolcalls.ToolCallDelta]) -> list[ToolCallChunk]:
    return [
        ToolCallChunk(
            index=d.index,
            id=d.id,
            type="function" if d.id else None,
            function=FunctionCallChunk(name=d.name, arguments=d.arguments),
        )
        for d in deltas
    ]


def _chat_logprob(entry: TokenLogprob) -> ChatTokenLogprob:
    return ChatTokenLogprob(
        token=entry.token,
        logprob=entry.logprob,
        bytes=list(entry.bytes),
        top_logprobs=[
            ChatTopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in entry.top
        ],
    )


async def _guard(deltas: AsyncIterator[IndexedDelta]) -> AsyncIterator[IndexedDelta | str]:
    """Pass deltas through; an error after the stream started becomes a final error event."""
    try:
        async for item in deltas:
            yield item
    except LLMServeError as exc:
        yield error_body(exc).model_dump_json()
