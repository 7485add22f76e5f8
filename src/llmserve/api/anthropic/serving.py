"""Anthropic Messages requests → GenerationRequests; engine deltas → messages and stream events.

The conversation becomes dialect-neutral turns (core/tools.Turn) and goes through the same tool
plan, template and constraint path as OpenAI chat. Streams send `message_start` and a `ping` as
soon as the request is admitted, then a `ping` every PING_INTERVAL seconds until the first token,
so a client waiting out a long prefill (Claude Code's prompts run to tens of thousands of tokens)
sees a live connection. Errors that show up within FIRST_DELTA_GRACE (bad requests, a full queue,
a prompt too long) still become HTTP statuses; later ones are an `error` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi.responses import JSONResponse
from sse_starlette import ServerSentEvent

from llmserve.api.anthropic.protocol import (
    CUSTOM_TOOL_TYPES,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    CountTokensRequest,
    CountTokensResponse,
    ErrorDetail,
    ErrorResponse,
    ImageBlock,
    InputJsonDelta,
    InputMessage,
    MessageDelta,
    MessageDeltaBody,
    MessageResponse,
    MessagesRequest,
    MessageStart,
    MessageStop,
    OutputBlock,
    OutputText,
    OutputToolUse,
    Ping,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    Tool,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from llmserve.api.overrides import SamplingOverrides
from llmserve.api.sampling import SamplerFields, dialect_params
from llmserve.core import tools as toolcalls
from llmserve.core.constraints import Constraint
from llmserve.core.errors import (
    EngineError,
    InvalidRequestError,
    LLMServeError,
    QueueFullError,
    ServiceUnavailableError,
)
from llmserve.core.request import Delta, FinishReason, GenerationRequest
from llmserve.core.request import Usage as EngineUsage
from llmserve.core.streams import IndexedDelta, open_streams
from llmserve.models.manager import LoadedModel, ModelManager

log = logging.getLogger(__name__)

# Claude Code starts its system prompt with a per-request attribution line; left in, it makes
# every prompt differ from the first line on and the prefix cache never hits.
BILLING_HEADER = "x-anthropic-billing-header:"
PING_INTERVAL = 5.0  # seconds between pings while the prompt is prefilled
FIRST_DELTA_GRACE = 1.0  # how long a stream waits for its first token before answering 200
OVERLOADED = 529  # Anthropic's status for "overloaded": a full queue, no engine
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    OVERLOADED: "overloaded_error",
}  # other 4xx: invalid_request_error; other 5xx: api_error
# Engine field names in errors, as a Messages request spells them.
ANTHROPIC_PARAMS = {"prompt": "messages", "stop": "stop_sequences"}


# ---- errors -----------------------------------------------------------------------------------


def anthropic_status(exc: LLMServeError) -> int:
    """Anthropic answers a full queue with 529 overloaded, not 429."""
    return OVERLOADED if isinstance(exc, QueueFullError) else exc.status


def error_body(exc: LLMServeError) -> ErrorResponse:
    """An LLMServeError in Anthropic's shape, its type chosen by status."""
    status = anthropic_status(exc)
    kind = ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return ErrorResponse(error=ErrorDetail(type=kind, message=exc.message))


def anthropic_error_response(exc: LLMServeError) -> JSONResponse:
    """An error as Anthropic's `{"type": "error", "error": {...}}` with its status."""
    status = anthropic_status(exc)
    headers = {"Retry-After": "1"} if status in (429, 503, OVERLOADED) else None
    return JSONResponse(error_body(exc).model_dump(), status_code=status, headers=headers)


# ---- the conversation -------------------------------------------------------------------------


def strip_billing_header(text: str) -> str:
    """`text` without Claude Code's `x-anthropic-billing-header:` lines."""
    if BILLING_HEADER not in text.lower():
        return text
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if not line.lstrip().lower().startswith(BILLING_HEADER)]
    return "".join(kept).strip("\n")


def _system_text(content: str | Sequence[Any], param: str) -> str:
    """A system prompt (string or text blocks) as one string, billing lines removed."""
    if isinstance(content, str):
        return strip_billing_header(content)
    parts = []
    for index, block in enumerate(content):
        if not isinstance(block, TextBlock):
            raise InvalidRequestError(
                f"{param}.{index}: a system prompt holds only text blocks, got {block.type!r}",
                param=f"{param}.{index}",
            )
        parts.append(strip_billing_header(block.text))
    return "\n".join(part for part in parts if part)


def conversation(
    system: str | list[TextBlock] | None, messages: Sequence[InputMessage]
) -> list[toolcalls.Turn]:
    """The request as neutral turns: one leading system turn, then the messages in order.

    `role: "system"` messages before the first user or assistant message join the system prompt;
    later ones stay where they are (the template places them), so the prefix stays cacheable.
    """
    system_parts = [_system_text(system, "system")] if system else []
    turns: list[toolcalls.Turn] = []
    for index, message in enumerate(messages):
        param = f"messages.{index}.content"
        if message.role == "system":
            text = _system_text(message.content, param)
            if turns:
                turns.append(toolcalls.Turn(role="system", content=text))
            else:
                system_parts.append(text)
        elif message.role == "user":
            turns += _user_turns(message.content, param)
        else:
            turns.append(_assistant_turn(message.content, param))
    text = "\n".join(part for part in system_parts if part)
    leading = [toolcalls.Turn(role="system", content=text)] if text else []
    return leading + turns


def _refuse_block(block: Any, param: str, role: str) -> InvalidRequestError:
    if isinstance(block, ImageBlock):
        return InvalidRequestError(
            f"{param}: {block.type} blocks are not supported by this server (text only)",
            param=param,
        )
    return InvalidRequestError(
        f"{param}: a {block.type} block cannot appear in a {role} message", param=param
    )


def _user_turns(content: str | Sequence[Any], param: str) -> list[toolcalls.Turn]:
    """A user message: its text, and a tool turn per tool_result, in their order."""
    if isinstance(content, str):
        return [toolcalls.Turn(role="user", content=content)]
    turns: list[toolcalls.Turn] = []
    text: list[str] = []
    for index, block in enumerate(content):
        where = f"{param}.{index}"
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolResultBlock):
            if text:
                turns.append(toolcalls.Turn(role="user", content="\n".join(text)))
                text = []
            turns.append(_tool_turn(block, where))
        elif not isinstance(block, ThinkingBlock):
            raise _refuse_block(block, where, "user")
    if text or not turns:
        turns.append(toolcalls.Turn(role="user", content="\n".join(text)))
    return turns


def _tool_turn(block: ToolResultBlock, param: str) -> toolcalls.Turn:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        for index, part in enumerate(content):
            if isinstance(part, ImageBlock):
                raise _refuse_block(part, f"{param}.content.{index}", "user")
        text = "\n".join(part.text for part in content if isinstance(part, TextBlock))
    if block.is_error:
        text = f"Error: {text}"
    return toolcalls.Turn(role="tool", content=text, tool_call_id=block.tool_use_id)


def _assistant_turn(content: str | Sequence[Any], param: str) -> toolcalls.Turn:
    """An assistant message: its text and its tool calls (previous thinking is dropped)."""
    if isinstance(content, str):
        return toolcalls.Turn(role="assistant", content=content)
    text: list[str] = []
    calls: list[toolcalls.ToolCall] = []
    for index, block in enumerate(content):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append(toolcalls.ToolCall(block.id, block.name, arguments))
        elif not isinstance(block, ThinkingBlock):
            raise _refuse_block(block, f"{param}.{index}", "assistant")
    return toolcalls.Turn(role="assistant", content="\n".join(text), tool_calls=tuple(calls))


def continues_prefill(turns: Sequence[toolcalls.Turn]) -> bool:
    """A final assistant message with text is a prefill: the answer continues it (Anthropic's)."""
    if not turns:
        return False
    last = turns[-1]
    return last.role == "assistant" and bool(last.content) and not last.tool_calls


TOOL_CHOICES = {
    "auto": toolcalls.ToolChoice.AUTO,
    "any": toolcalls.ToolChoice.REQUIRED,
    "tool": toolcalls.ToolChoice.FUNCTION,
    "none": toolcalls.ToolChoice.NONE,
}


def _functions(tools: Sequence[Tool] | None) -> tuple[toolcalls.ToolFunction, ...]:
    """The custom tools as functions; server tools (no schema, run by Anthropic) are dropped."""
    functions = []
    for index, tool in enumerate(tools or ()):
        if tool.type not in CUSTOM_TOOL_TYPES:
            log.debug("messages: ignoring server tool %r (%s)", tool.name, tool.type)
            continue
        if tool.input_schema is None:
            raise InvalidRequestError(
                f"tools.{index}.input_schema: a custom tool needs an input_schema",
                param=f"tools.{index}.input_schema",
            )
        functions.append(toolcalls.ToolFunction(tool.name, tool.description, tool.input_schema))
    return tuple(functions)


def tool_plan(tools: Sequence[Tool] | None, choice: ToolChoice | None) -> toolcalls.ToolPlan | None:
    """`tools` and `tool_choice` as a ToolPlan (any → REQUIRED, tool → FUNCTION); None: no tools."""
    functions = _functions(tools)
    kind = choice.type if choice is not None else "auto"
    if not functions:
        if kind in ("any", "tool"):
            raise InvalidRequestError(
                f"tool_choice {kind!r} asks for a tool call but the request has no custom tools",
                param="tool_choice",
            )
        return None
    name = choice.name if choice is not None and kind == "tool" else None
    if kind == "tool" and not name:
        raise InvalidRequestError(
            "tool_choice of type 'tool' needs the tool's `name`", param="tool_choice.name"
        )
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    return toolcalls.ToolPlan(functions, TOOL_CHOICES[kind], name, parallel)


def tool_use_id(call_id: str) -> str:
    """A core call id (`call_<hex>`) in Anthropic's style, `toolu_<hex>`."""
    return "toolu_" + call_id.removeprefix("call_")


def new_message_id() -> str:
    """A message id in Anthropic's style, `msg_<hex>`."""
    return f"msg_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class Prompt:
    """A rendered conversation: its token ids, the tool plan in force and its constraint."""

    ids: list[int]
    plan: toolcalls.ToolPlan | None
    constraint: Constraint | None


def render_prompt(model: LoadedModel, body: MessagesRequest | CountTokensRequest) -> Prompt:
    """Template and tokenize the request as /v1/messages sends it (a worker thread: slow)."""
    turns = conversation(body.system, body.messages)
    plan = tool_plan(body.tools, body.tool_choice)
    native = model.template.supports_tools
    ids = model.chat_prompt(
        toolcalls.template_messages(turns, plan, native),
        True,
        None,
        tools=toolcalls.template_tools(plan) if native else None,
        continue_final=continues_prefill(turns),
    )
    constraint = plan.constraint() if plan is not None else None
    active = plan if plan is not None and plan.active else None
    return Prompt(ids, active, constraint)


def sampler_fields(body: MessagesRequest) -> SamplerFields:
    """The request's sampling fields in the shared base, so sampling presets apply to them."""
    return SamplerFields.model_validate(
        {
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "stop": body.stop_sequences,
        }
    )


# ---- serving ----------------------------------------------------------------------------------


class AnthropicServing:
    """Serves the Anthropic Messages dialect over the model manager."""

    def __init__(self, models: ModelManager, overrides: SamplingOverrides):
        self.models = models
        self.overrides = overrides

    async def messages(
        self, body: MessagesRequest
    ) -> MessageResponse | AsyncIterator[ServerSentEvent]:
        """POST /v1/messages: a message, or (streaming) an iterator of SSE events."""
        if body.model_extra:
            log.debug("messages: ignoring unknown fields %s", sorted(body.model_extra))
        model = await self.models.acquire(body.model)
        prompt = await asyncio.to_thread(render_prompt, model, body)
        sampler = self.overrides.apply(sampler_fields(body))
        request_id = new_message_id()
        writer = MessageWriter(model.id, request_id, len(prompt.ids), prompt.plan)
        with dialect_params(ANTHROPIC_PARAMS):
            params = replace(sampler.sampling_params(n=1), constraint=prompt.constraint)
            stream = model.engine.generate(GenerationRequest(request_id, prompt.ids, params))
            if not body.stream:
                return await writer.collect(await open_streams([stream]))
            first = await open_with_grace(stream, FIRST_DELTA_GRACE)
        return writer.stream(with_pings(first, stream, PING_INTERVAL))

    async def count_tokens(self, body: CountTokensRequest) -> CountTokensResponse:
        """POST /v1/messages/count_tokens: the prompt /v1/messages would send, counted."""
        model = await self.models.acquire(body.model)
        prompt = await asyncio.to_thread(render_prompt, model, body)
        return CountTokensResponse(input_tokens=len(prompt.ids))


# ---- waiting for the first token --------------------------------------------------------------


async def _first(stream: AsyncIterator[Delta]) -> Delta:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise EngineError("the engine ended the request without any output") from None


async def _close(stream: AsyncIterator[Delta]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def _cancel(task: asyncio.Future[Delta]) -> None:
    """Cancel `task` and wait until it is over (its stream is then no longer running)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: asyncio would log it as never retrieved


async def open_with_grace(stream: AsyncIterator[Delta], grace: float) -> asyncio.Future[Delta]:
    """Start waiting for the first delta; raise its error if one comes within `grace` seconds."""
    first = asyncio.ensure_future(_first(stream))
    try:
        await asyncio.wait({first}, timeout=grace)
    except BaseException:  # cancelled: the client left
        await _cancel(first)
        await _close(stream)
        raise
    if first.done() and first.exception() is not None:
        await _close(stream)
        first.result()  # raises it, while the answer can still be an HTTP status
    return first


async def with_pings(
    first: asyncio.Future[Delta], stream: AsyncIterator[Delta], interval: float
) -> AsyncIterator[Delta | None]:
    """The stream's deltas, with a None (a ping) every `interval` seconds until the first one."""
    try:
        while not first.done():
            await asyncio.wait({first}, timeout=interval)
            if not first.done():
                yield None
        yield first.result()
        async for delta in stream:
            yield delta
    finally:
        if not first.done():
            await _cancel(first)
        await _close(stream)


# ---- writing the answer -----------------------------------------------------------------------


def usage_of(usage: EngineUsage | None, prompt_tokens: int) -> Usage:
    """Engine usage in Anthropic's terms: input tokens exclude those read from the cache."""
    if usage is None:
        return Usage(input_tokens=prompt_tokens, output_tokens=0)
    return Usage(
        input_tokens=usage.prompt_tokens - usage.cached_tokens,
        output_tokens=usage.completion_tokens,
        cache_read_input_tokens=usage.cached_tokens,
    )


def stop_reason_of(delta: Delta | None) -> tuple[StopReason, str | None]:
    """Anthropic's stop_reason and stop_sequence for a choice's last delta."""
    if delta is None:
        return "end_turn", None
    if delta.finish_reason is FinishReason.ABORT:
        raise ServiceUnavailableError(
            "the generation was stopped by the server (shutdown, unload or an admin)"
        )
    if delta.finish_reason is FinishReason.LENGTH:
        return "max_tokens", None  # also a request that ran into request_timeout
    if isinstance(delta.stop_reason, str):
        return "stop_sequence", delta.stop_reason
    return "end_turn", None


def _tool_uses(calls: Sequence[toolcalls.ToolCall]) -> list[OutputBlock] | None:
    """The calls as tool_use blocks; None when some call's arguments are not a JSON object."""
    blocks: list[OutputBlock] = []
    for call in calls:
        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError:
            return None
        if not isinstance(arguments, dict):
            return None
        blocks.append(OutputToolUse(id=tool_use_id(call.id), name=call.name, input=arguments))
    return blocks


def _event(event: StreamEvent | ErrorResponse) -> ServerSentEvent:
    return ServerSentEvent(data=event.model_dump_json(), event=event.type, sep="\n")


class MessageWriter:
    """Turns one choice's deltas into a message or the Messages stream events."""

    def __init__(
        self, model: str, request_id: str, prompt_tokens: int, plan: toolcalls.ToolPlan | None
    ):
        self.model = model
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.plan = plan

    def _message(
        self,
        content: list[OutputBlock],
        stop: tuple[StopReason, str | None] | None,
        usage: Usage,
    ) -> MessageResponse:
        return MessageResponse(
            id=self.request_id,
            model=self.model,
            content=content,
            stop_reason=stop[0] if stop else None,
            stop_sequence=stop[1] if stop else None,
            usage=usage,
        )

    async def collect(self, deltas: AsyncIterator[IndexedDelta]) -> MessageResponse:
        """The whole non-streaming message."""
        text: list[str] = []
        last: Delta | None = None
        usage: EngineUsage | None = None
        async for item in deltas:
            text.append(item.delta.text)
            if item.delta.finish_reason is not None:
                last = item.delta
            if item.delta.usage is not None:
                usage = item.delta.usage
        stop = stop_reason_of(last)
        output = "".join(text)
        content: list[OutputBlock] = [OutputText(text=output)] if output else []
        if self.plan is not None:
            _, calls = toolcalls.split_tool_calls(output, self.plan)
            uses = _tool_uses(calls) if calls else None
            if uses:
                content, stop = uses, ("tool_use", None)
        return self._message(content, stop, usage_of(usage, self.prompt_tokens))

    async def stream(self, deltas: AsyncIterator[Delta | None]) -> AsyncIterator[ServerSentEvent]:
        """message_start, ping, the blocks' events, message_delta, message_stop (or an error)."""
        start = self._message([], None, usage_of(None, self.prompt_tokens))
        yield _event(MessageStart(message=start))
        yield _event(Ping())
        blocks = BlockStream(self.plan)
        last: Delta | None = None
        try:
            async for delta in deltas:
                if delta is None:
                    yield _event(Ping())
                    continue
                for event in blocks.feed(delta.text):
                    yield _event(event)
                if delta.finish_reason is not None:
                    last = delta
            stop = stop_reason_of(last)
        except LLMServeError as exc:
            yield _event(error_body(exc))
            return
        for event in blocks.finish():
            yield _event(event)
        if blocks.made_calls:
            stop = ("tool_use", None)
        usage = usage_of(last.usage if last else None, self.prompt_tokens)
        body = MessageDeltaBody(stop_reason=stop[0], stop_sequence=stop[1])
        yield _event(MessageDelta(delta=body, usage=usage))
        yield _event(MessageStop())


class BlockStream:
    """Splits streamed output into content blocks: text, and a tool_use block per call."""

    def __init__(self, plan: toolcalls.ToolPlan | None):
        self.splitter = toolcalls.ToolStream(plan) if plan is not None else None
        self.index = -1  # the open block's index
        self.open: str | None = None  # its type
        self.call_blocks: dict[int, int] = {}  # call index → block index
        self.made_calls = False

    def feed(self, text: str) -> list[StreamEvent]:
        """The events for more output."""
        if self.splitter is None:
            return self._text(text)
        content, calls = self.splitter.feed(text)
        return self._text(content) + self._calls(calls)

    def finish(self) -> list[StreamEvent]:
        """The events left at the end: held-back output, then the last block's stop."""
        events: list[StreamEvent] = []
        if self.splitter is not None:
            tail, calls, self.made_calls = self.splitter.finish()
            events += self._text(tail) + self._calls(calls)
        return events + self._close()

    def _open(self, block: OutputBlock) -> list[StreamEvent]:
        events = self._close()
        self.index += 1
        self.open = block.type
        return [*events, ContentBlockStart(index=self.index, content_block=block)]

    def _close(self) -> list[StreamEvent]:
        if self.open is None:
            return []
        self.open = None
        return [ContentBlockStop(index=self.index)]

    def _text(self, text: str) -> list[StreamEvent]:
        if not text:
            return []
        events = self._open(OutputText(text="")) if self.open != "text" else []
        return [*events, ContentBlockDelta(index=self.index, delta=TextDelta(text=text))]

    def _calls(self, deltas: Sequence[toolcalls.ToolCallDelta]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for delta in deltas:
            if delta.id is not None:
                block = OutputToolUse(id=tool_use_id(delta.id), name=delta.name or "", input={})
                events += self._open(block)
                self.call_blocks[delta.index] = self.index
            if delta.arguments:
                index = self.call_blocks[delta.index]
                json_delta = InputJsonDelta(partial_json=delta.arguments)
                events.append(ContentBlockDelta(index=index, delta=json_delta))
        return events
