"""Responses requests → GenerationRequests; engine deltas → response objects and typed events."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace

from sse_starlette import ServerSentEvent

from llmserve.api.common import now
from llmserve.api.overrides import SamplingOverrides
from llmserve.api.responses.protocol import (
    MEDIA_PARTS,
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    Content,
    ContentPartEvent,
    CustomToolCallItem,
    DeletedResponse,
    ErrorEvent,
    FunctionCallItem,
    FunctionCallOutput,
    IncompleteDetails,
    InputItem,
    InputTokensDetails,
    ItemStatus,
    MessageItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseErrorInfo,
    ResponseEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    Status,
    StreamEvent,
    TextConfig,
    TextDeltaEvent,
    TextDoneEvent,
)
from llmserve.api.sampling import dialect_params
from llmserve.core import tools as toolcalls
from llmserve.core.constraints import Constraint
from llmserve.core.errors import InvalidRequestError, LLMServeError, NotFoundError
from llmserve.core.request import FinishReason, GenerationRequest, Usage
from llmserve.core.streams import IndexedDelta, open_streams
from llmserve.models.manager import LoadedModel, ModelManager

log = logging.getLogger(__name__)

# Engine field names in errors, as this dialect spells them.
RESPONSES_PARAMS = {"prompt": "input", "messages": "input", "max_tokens": "max_output_tokens"}
Output = OutputMessage | FunctionCallOutput


def item_id(prefix: str) -> str:
    """An id in OpenAI's Responses style: `resp_...`, `msg_...`, `fc_...`."""
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- the store ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResponse:
    """A kept response and the conversation it ends (its input history and its own output)."""

    response: ResponseObject
    turns: tuple[toolcalls.Turn, ...]
    size: int  # characters of text held, for the store's budget


@dataclass
class ResponseStore:
    """Responses kept for `previous_response_id` and GET: bounded, the oldest evicted first."""

    max_responses: int = 1000
    max_chars: int = 64 * 2**20  # text held across all responses (each holds its history)
    _items: OrderedDict[str, StoredResponse] = field(default_factory=OrderedDict, init=False)
    _chars: int = field(default=0, init=False)

    def put(self, response: ResponseObject, turns: tuple[toolcalls.Turn, ...]) -> None:
        """Keep `response`; evict the oldest ones beyond the bounds."""
        size = sum(_turn_size(t) for t in turns)
        if size > self.max_chars:
            log.info("response %s is too large to store (%d characters)", response.id, size)
            return
        self._items[response.id] = StoredResponse(response, turns, size)
        self._chars += size
        while len(self._items) > self.max_responses or self._chars > self.max_chars:
            _, evicted = self._items.popitem(last=False)
            self._chars -= evicted.size

    def get(self, response_id: str, param: str | None = "response_id") -> StoredResponse:
        """The stored response; 404 naming `param` when unknown (or evicted)."""
        stored = self._items.get(response_id)
        if stored is None:
            code = "previous_response_not_found" if param == "previous_response_id" else None
            raise NotFoundError(
                f"no stored response with id {response_id!r} (responses created with "
                "`store: false` are not kept; the oldest are evicted)",
                param=param,
                code=code,
            )
        return stored

    def delete(self, response_id: str) -> DeletedResponse:
        """Forget a stored response."""
        stored = self.get(response_id)
        del self._items[response_id]
        self._chars -= stored.size
        return DeletedResponse(id=response_id)


def _turn_size(turn: toolcalls.Turn) -> int:
    return len(turn.content) + sum(len(c.arguments) + len(c.name) for c in turn.tool_calls)


# ---- input items → turns -----------------------------------------------------------------------


def input_turns(items: Iterable[tuple[str, InputItem]]) -> list[toolcalls.Turn]:
    """The input items as dialect-neutral turns; calls join the assistant turn before them."""
    turns: list[toolcalls.Turn] = []
    for where, item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            text = content_text(item.content, f"{where}.content")
            turns.append(toolcalls.Turn(role=role, content=text))
        elif isinstance(item, FunctionCallItem):
            _add_call(turns, toolcalls.ToolCall(item.call_id, item.name, item.arguments))
        elif isinstance(item, CustomToolCallItem):
            _add_call(turns, toolcalls.ToolCall(item.call_id, item.name, item.input))
        else:
            text = content_text(item.output, f"{where}.output")
            turns.append(toolcalls.Turn(role="tool", content=text, tool_call_id=item.call_id))
    return turns


def content_text(content: Content, where: str) -> str:
    """A content string, or its text parts joined by newlines; media parts are refused."""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for index, part in enumerate(content):
        if part.type in MEDIA_PARTS:
            raise InvalidRequestError(
                f"{where}[{index}] is of type {part.type}: this server serves text only",
                param=f"{where}[{index}]",
                code="unsupported_content",
            )
        text = part.refusal if part.type == "refusal" else part.text
        if text is None:
            raise InvalidRequestError(
                f"{where}[{index}]: content of type {part.type!r} has no text",
                param=f"{where}[{index}]",
            )
        texts.append(text)
    return "\n".join(texts)


def _add_call(turns: list[toolcalls.Turn], call: toolcalls.ToolCall) -> None:
    last = turns[-1] if turns else None
    if last is not None and last.role == "assistant":
        turns[-1] = replace(last, tool_calls=(*last.tool_calls, call))
    else:
        turns.append(toolcalls.Turn(role="assistant", tool_calls=(call,)))


def output_turn(output: Iterable[Output]) -> toolcalls.Turn:
    """A response's output as the assistant turn the next response continues from."""
    text = "".join(p.text for o in output if isinstance(o, OutputMessage) for p in o.content)
    calls = tuple(
        toolcalls.ToolCall(o.call_id, o.name, o.arguments)
        for o in output
        if isinstance(o, FunctionCallOutput)
    )
    return toolcalls.Turn(role="assistant", content=text, tool_calls=calls)


# ---- serving -----------------------------------------------------------------------------------


class ResponsesServing:
    """Serves the OpenAI Responses dialect over the model manager."""

    def __init__(self, models: ModelManager, overrides: SamplingOverrides, store: ResponseStore):
        self.models = models
        self.overrides = overrides
        self.store = store

    def get(self, response_id: str) -> ResponseObject:
        """GET /v1/responses/{id}."""
        return self.store.get(response_id).response

    def delete(self, response_id: str) -> DeletedResponse:
        """DELETE /v1/responses/{id}."""
        return self.store.delete(response_id)

    async def create(
        self, body: ResponsesRequest
    ) -> ResponseObject | AsyncIterator[ServerSentEvent]:
        """POST /v1/responses: a response, or an iterator of typed SSE events when streaming."""
        body.log_unknown_fields("responses")
        if body.dropped_tools():
            log.debug("responses: dropping tools of types %s", body.dropped_tools())
        body = self.overrides.apply(body)
        _refuse_unservable(body)
        turns = self._conversation(body)
        plan = body.tool_plan()
        model = await self.models.acquire(body.model)
        names = {**RESPONSES_PARAMS, **body.tool_params()}
        with dialect_params(names):
            prompt_ids, constraint = await asyncio.to_thread(_prepare, model, body, turns, plan)
            params = replace(body.sampling_params(n=1), constraint=constraint)
            response_id = item_id("resp")
            deltas = await open_streams(
                [model.engine.generate(GenerationRequest(response_id, prompt_ids, params))]
            )
        active = plan if plan is not None and plan.active else None
        writer = ResponseWriter(model.id, body, response_id, active, turns, self.store)
        if body.stream:
            return writer.stream(deltas)
        return await writer.collect(deltas)

    def _conversation(self, body: ResponsesRequest) -> tuple[toolcalls.Turn, ...]:
        """The stored history `previous_response_id` names, then the request's input."""
        history: tuple[toolcalls.Turn, ...] = ()
        if body.previous_response_id is not None:
            history = self.store.get(body.previous_response_id, "previous_response_id").turns
        turns = (*history, *input_turns(body.items()))
        if not turns:
            raise InvalidRequestError("input must not be empty", param="input")
        return turns


def _refuse_unservable(body: ResponsesRequest) -> None:
    """What a client would wait for in vain is a 400, not silently ignored."""
    if body.background:
        raise InvalidRequestError(
            "background responses are not supported; leave `background` unset",
            param="background",
        )
    refused = [name for name in ("conversation", "prompt") if name in (body.model_extra or {})]
    if refused:
        raise InvalidRequestError(
            f"`{refused[0]}` is not supported (no server-side conversations or prompt "
            "templates); send the input items, or use previous_response_id",
            param=refused[0],
        )


def _prepare(
    model: LoadedModel,
    body: ResponsesRequest,
    turns: tuple[toolcalls.Turn, ...],
    plan: toolcalls.ToolPlan | None,
) -> tuple[list[int], Constraint | None]:
    """The prompt's token ids and the output constraint (a worker thread: rendering is slow)."""
    constraint = body.text_format().constraint()
    tool_constraint = plan.constraint() if plan is not None else None
    if constraint is not None and tool_constraint is not None:
        raise InvalidRequestError(
            "a forced tool call and text.format cannot be combined", param="tool_choice"
        )
    if body.instructions:
        # Instructions are this request's own: not carried over by previous_response_id.
        turns = (toolcalls.Turn(role="system", content=body.instructions), *turns)
    native = model.template.supports_tools
    messages = toolcalls.template_messages(turns, plan, native)
    prompt_ids = model.chat_prompt(
        messages, True, None, tools=toolcalls.template_tools(plan) if native else None
    )
    return prompt_ids, constraint or tool_constraint


# ---- writing responses -------------------------------------------------------------------------


@dataclass
class Ending:
    """How a generation ended, in the Responses dialect's terms."""

    status: Status = "completed"
    incomplete: IncompleteDetails | None = None
    error: ResponseErrorInfo | None = None

    @classmethod
    def of(cls, finish: FinishReason | None) -> Ending:
        """From the engine's finish reason (a time limit also ends with LENGTH)."""
        if finish is FinishReason.LENGTH:
            return cls("incomplete", IncompleteDetails(reason="max_output_tokens"))
        if finish is FinishReason.ABORT:
            error = ResponseErrorInfo(
                code="server_error", message="the generation was aborted (server shutdown)"
            )
            return cls("failed", error=error)
        return cls()

    @property
    def item_status(self) -> ItemStatus:
        """The status of the output items."""
        return "completed" if self.status == "completed" else "incomplete"


class ResponseWriter:
    """Turns deltas into a response object or the typed event stream; stores the result."""

    def __init__(
        self,
        model_id: str,
        body: ResponsesRequest,
        response_id: str,
        plan: toolcalls.ToolPlan | None,
        turns: tuple[toolcalls.Turn, ...],
        store: ResponseStore,
    ):
        self.model_id = model_id
        self.body = body
        self.response_id = response_id
        self.plan = plan
        self.turns = turns
        self.store = store
        self.created = now()

    def snapshot(
        self,
        output: list[Output],
        ending: Ending | None = None,
        usage: Usage | None = None,
    ) -> ResponseObject:
        """The response with the request's parameters echoed; in progress without `ending`."""
        body = self.body
        return ResponseObject(
            id=self.response_id,
            created_at=self.created,
            completed_at=now() if ending is not None and ending.status == "completed" else None,
            status=ending.status if ending is not None else "in_progress",
            error=ending.error if ending is not None else None,
            incomplete_details=ending.incomplete if ending is not None else None,
            model=self.model_id,
            output=list(output),
            instructions=body.instructions,
            tools=[tool for _, tool in body.function_tools()],
            tool_choice=body.tool_choice or "auto",
            parallel_tool_calls=body.parallel_tool_calls is not False,
            temperature=body.temperature,
            top_p=body.top_p,
            max_output_tokens=body.max_tokens,
            previous_response_id=body.previous_response_id,
            store=body.store is not False,
            text=TextConfig(format=body.text_format()),
            truncation=body.truncation or "disabled",
            metadata=body.metadata or {},
            user=body.user,
            prompt_cache_key=body.prompt_cache_key,
            usage=_usage(usage) if usage is not None else None,
        )

    def finish(self, output: list[Output], ending: Ending, usage: Usage | None) -> ResponseObject:
        """The final response; kept in the store when the request asks (and it did not fail)."""
        response = self.snapshot(output, ending, usage or Usage(0, 0))
        if self.body.store is not False and ending.status != "failed":
            self.store.put(response, (*self.turns, output_turn(output)))
        return response

    async def collect(self, deltas: AsyncIterator[IndexedDelta]) -> ResponseObject:
        """The whole non-streaming response."""
        text: list[str] = []
        finish: FinishReason | None = None
        usage: Usage | None = None
        async for item in deltas:
            text.append(item.delta.text)
            finish = item.delta.finish_reason or finish
            usage = item.delta.usage or usage
        ending = Ending.of(finish)
        full = "".join(text)
        content, calls = toolcalls.split_tool_calls(full, self.plan) if self.plan else (full, [])
        output: list[Output] = []
        if content is not None and (content or not calls):
            output.append(_message(item_id("msg"), content, ending.item_status))
        output += [
            FunctionCallOutput(
                id=item_id("fc"),
                call_id=c.id,
                name=c.name,
                arguments=c.arguments,
                status="completed",
            )
            for c in calls
        ]
        return self.finish(output, ending, usage)

    async def stream(self, deltas: AsyncIterator[IndexedDelta]) -> AsyncIterator[ServerSentEvent]:
        """The typed events: created, in_progress, items and their parts, then the ending."""
        events = EventStream(self)
        yield events.emit(ResponseEvent(type="response.created", response=self.snapshot([])))
        yield events.emit(ResponseEvent(type="response.in_progress", response=self.snapshot([])))
        splitter = toolcalls.ToolStream(self.plan) if self.plan else None
        finish: FinishReason | None = None
        usage: Usage | None = None
        try:
            async for item in deltas:
                d = item.delta
                content, calls = splitter.feed(d.text) if splitter else (d.text, [])
                if d.finish_reason is not None and splitter is not None:
                    tail, more, _ = splitter.finish()
                    content, calls = content + tail, calls + more
                for event in (*events.text(content), *events.calls(calls)):
                    yield events.emit(event)
                finish = d.finish_reason or finish
                usage = d.usage or usage
        except LLMServeError as exc:
            yield events.emit(
                ErrorEvent(code=exc.code or exc.type, message=exc.message, param=exc.param)
            )
            return
        ending = Ending.of(finish)
        for event in events.close(ending):
            yield events.emit(event)
        response = self.finish(events.output, ending, usage)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}
        yield events.emit(
            ResponseEvent(type=kind.get(response.status, "response.failed"), response=response)
        )


def _message(message_id: str, text: str, status: ItemStatus) -> OutputMessage:
    return OutputMessage(id=message_id, status=status, content=[OutputText(text=text)])


def _usage(usage: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


@dataclass
class _OpenCall:
    position: int  # output_index
    item: FunctionCallOutput
    arguments: list[str] = field(default_factory=list)


class EventStream:
    """The output items of a streamed response, and the events that build them, numbered."""

    def __init__(self, writer: ResponseWriter):
        self.writer = writer
        self.sequence = 0
        self.output: list[Output] = []
        self._message: int | None = None  # output_index of the open message
        self._text: list[str] = []
        self._calls: dict[int, _OpenCall] = {}  # by the call's index in the model's output

    def emit(self, event: StreamEvent) -> ServerSentEvent:
        """The event as SSE (`event:` its type), with the next sequence number."""
        event.sequence_number = self.sequence
        self.sequence += 1
        return ServerSentEvent(data=event.model_dump_json(), event=event.type)

    def text(self, text: str) -> list[StreamEvent]:
        """Events for new message text (opening the message item first)."""
        if not text:
            return []
        events = self._open_message() if self._message is None else []
        assert self._message is not None
        self._text.append(text)
        message = self.output[self._message]
        events.append(
            TextDeltaEvent(
                type="response.output_text.delta",
                item_id=message.id,
                output_index=self._message,
                delta=text,
            )
        )
        return events

    def _open_message(self) -> list[StreamEvent]:
        self._message = len(self.output)
        message = OutputMessage(id=item_id("msg"), status="in_progress", content=[])
        self.output.append(message)
        item = OutputItemEvent(
            type="response.output_item.added", output_index=self._message, item=message.model_copy()
        )
        part = ContentPartEvent(
            type="response.content_part.added",
            item_id=message.id,
            output_index=self._message,
            part=OutputText(text=""),
        )
        return [item, part]

    def _close_message(self, status: ItemStatus) -> list[StreamEvent]:
        if self._message is None:
            return []
        index, self._message = self._message, None
        text = "".join(self._text)
        message = _message(self.output[index].id, text, status)
        self.output[index] = message
        return [
            TextDoneEvent(
                type="response.output_text.done", item_id=message.id, output_index=index, text=text
            ),
            ContentPartEvent(
                type="response.content_part.done",
                item_id=message.id,
                output_index=index,
                part=message.content[0],
            ),
            OutputItemEvent(type="response.output_item.done", output_index=index, item=message),
        ]

    def calls(self, deltas: list[toolcalls.ToolCallDelta]) -> list[StreamEvent]:
        """Events for call deltas: a new item per call, then its argument text."""
        events: list[StreamEvent] = []
        for delta in deltas:
            if delta.id is not None:
                events += self._close_message("completed")
                events += self._open_call(delta)
            call = self._calls.get(delta.index)
            if call is None or not delta.arguments:
                continue
            call.arguments.append(delta.arguments)
            events.append(
                ArgumentsDeltaEvent(
                    type="response.function_call_arguments.delta",
                    item_id=call.item.id,
                    output_index=call.position,
                    delta=delta.arguments,
                )
            )
        return events

    def _open_call(self, delta: toolcalls.ToolCallDelta) -> list[StreamEvent]:
        assert delta.id is not None
        item = FunctionCallOutput(
            id=item_id("fc"),
            call_id=delta.id,
            name=delta.name or "",
            arguments="",
            status="in_progress",
        )
        call = _OpenCall(len(self.output), item)
        self._calls[delta.index] = call
        self.output.append(item)
        return [
            OutputItemEvent(
                type="response.output_item.added", output_index=call.position, item=item
            )
        ]

    def close(self, ending: Ending) -> list[StreamEvent]:
        """Events that finish every open item (an empty message when nothing was output)."""
        events = self._open_message() if not self.output else []
        events += self._close_message(ending.item_status)
        for call in self._calls.values():
            arguments = "".join(call.arguments)
            status = ending.item_status
            done = call.item.model_copy(update={"arguments": arguments, "status": status})
            self.output[call.position] = done
            events.append(
                ArgumentsDoneEvent(
                    type="response.function_call_arguments.done",
                    item_id=done.id,
                    output_index=call.position,
                    name=done.name,
                    arguments=arguments,
                )
            )
            events.append(
                OutputItemEvent(
                    type="response.output_item.done", output_index=call.position, item=done
                )
            )
        self._calls = {}
        return events
