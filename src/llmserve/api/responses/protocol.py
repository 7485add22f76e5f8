"""Pydantic models of the OpenAI Responses dialect: requests as the SDK and Codex send them,
responses and stream events as the `openai` SDK's models read them."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from llmserve.api.sampling import SamplerFields, dialect_params
from llmserve.core import constraints
from llmserve.core.errors import InvalidRequestError
from llmserve.core.tools import ToolChoice, ToolFunction, ToolPlan

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

# Content part types that carry text, and those that carry what this server cannot read.
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
MEDIA_PARTS = ("input_image", "input_file", "input_audio")
TOOL_CHOICES = ("none", "auto", "required")


# ---- request -----------------------------------------------------------------------------------


class ContentPart(BaseModel):
    """A part of a message's content: text parts are read; media parts are refused."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    refusal: str | None = None


Content = str | list[ContentPart]


class MessageItem(BaseModel):
    """An input message (OpenAI's "easy" form without `type`, or `type: "message"`)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItem(BaseModel):
    """A function call the model made earlier, sent back as history."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """The result of a function call."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function_call_output"]
    call_id: str
    output: Content


class CustomToolCallItem(BaseModel):
    """A custom (free-form) tool call from history; read as a function call with text input."""

    model_config = ConfigDict(extra="allow")

    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str


class CustomToolCallOutputItem(BaseModel):
    """The result of a custom tool call."""

    model_config = ConfigDict(extra="allow")

    type: Literal["custom_tool_call_output"]
    call_id: str
    output: Content


InputItem = (
    MessageItem
    | FunctionCallItem
    | FunctionCallOutputItem
    | CustomToolCallItem
    | CustomToolCallOutputItem
)
ITEM_TYPES: dict[str, type[BaseModel]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "custom_tool_call": CustomToolCallItem,
    "custom_tool_call_output": CustomToolCallOutputItem,
}


class FunctionToolSpec(BaseModel):
    """A `tools` entry of type `function` (the only kind served), echoed in the response."""

    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "name": ...}`."""

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """`text.format`: free text, any JSON object, or JSON valid against a named schema."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def constraint(self) -> constraints.Constraint | None:
        """The constraint this format asks for (None for text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return constraints.JsonObject()
        if self.schema_ is None:
            raise InvalidRequestError(
                "text.format of type json_schema needs `schema`", param="text.format.schema"
            )
        return constraints.JsonSchema.of(self.schema_, "text.format.schema")


class TextConfig(BaseModel):
    """`text`: the output format (and Codex's `verbosity`, accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    format: TextFormat = Field(default_factory=lambda: TextFormat.model_validate({}))
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(SamplerFields):
    """Body of POST /v1/responses."""

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(
        description="A user message, or a list of items (messages, function calls, outputs)."
    )
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    background: bool | None = None
    # Accepted and ignored (Codex sends them): nothing here can use them.
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _string_or_list(cls, value: Any) -> Any:
        # Checked first so that the error names `input`, not a member of the union.
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("input must be a string or a list of input items")
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise ValueError(f"input[{index}] must be an input item (a JSON object)")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _served_tool_choice(cls, value: Any) -> Any:
        # Checked first so that errors name `tool_choice`, not a member of the union. Forcing
        # a built-in or custom tool cannot be served: those tools are dropped.
        if value is None or value in TOOL_CHOICES:
            return value
        if isinstance(value, dict) and value.get("type") == "function":
            return value
        kind = value.get("type") if isinstance(value, dict) else value
        raise ValueError(
            f"tool_choice {kind!r} is not supported; use `auto`, `none`, `required` or "
            '{"type": "function", "name": ...}'
        )

    @model_validator(mode="after")
    def _one_output_limit(self) -> ResponsesRequest:
        # Folded into `max_tokens` so that sampling presets (which cap `max_tokens`) apply.
        if self.max_output_tokens is not None:
            self.max_tokens = self.max_output_tokens
        return self

    def items(self) -> list[tuple[str, InputItem]]:
        """The input as typed items with where each is (`input[3]`), for errors.

        Items this server cannot use (reasoning, item references, built-in tool calls) are
        left out, logged at debug level.
        """
        if isinstance(self.input, str):
            return [("input", MessageItem(role="user", content=self.input))]
        items: list[tuple[str, InputItem]] = []
        for index, raw in enumerate(self.input):
            kind = raw.get("type", "message")
            model = ITEM_TYPES.get(kind) if isinstance(kind, str) else None
            if model is None:
                log.debug("responses: ignoring input item of type %r", kind)
                continue
            where = f"input[{index}]"
            items.append((where, _parse(model, raw, where)))  # type: ignore[arg-type]
        return items

    def function_tools(self) -> list[tuple[int, FunctionToolSpec]]:
        """The function tools with their index in `tools`; other tool types are dropped."""
        out: list[tuple[int, FunctionToolSpec]] = []
        for index, raw in enumerate(self.tools or ()):
            if raw.get("type") != "function":
                continue
            out.append((index, _parse(FunctionToolSpec, raw, f"tools[{index}]")))
        return out

    def dropped_tools(self) -> list[str]:
        """The types of the `tools` entries not served (custom, web_search, ...)."""
        return [str(raw.get("type")) for raw in self.tools or () if raw.get("type") != "function"]

    def tool_plan(self) -> ToolPlan | None:
        """The tools and tool_choice, dialect-neutral; None when no function tools are offered."""
        tools = self.function_tools()
        choice = self.tool_choice
        if not tools:
            if choice == "required" or isinstance(choice, FunctionToolChoice):
                raise InvalidRequestError(
                    "tool_choice asks for a function call but the request has no function tools",
                    param="tool_choice",
                )
            return None
        functions = tuple(ToolFunction(t.name, t.description, t.parameters) for _, t in tools)
        parallel = self.parallel_tool_calls is not False
        with dialect_params(self.tool_params()):
            if isinstance(choice, FunctionToolChoice):
                return ToolPlan(functions, ToolChoice.FUNCTION, choice.name, parallel)
            return ToolPlan(functions, ToolChoice(choice or "auto"), None, parallel)

    def tool_params(self) -> dict[str, str]:
        """Tool field names as the core spells them (chat's shape) -> as this request does.

        Dropped tool types shift positions: the core's `tools[0]` may be this request's
        `tools[2]`.
        """
        return {
            f"tools[{position}].function.parameters": f"tools[{index}].parameters"
            for position, (index, _) in enumerate(self.function_tools())
        }

    def text_format(self) -> TextFormat:
        """`text.format`, `text` when not given."""
        return self.text.format if self.text is not None else TextFormat.model_validate({})


def _parse(model: type[M], raw: Any, where: str) -> M:
    """Validate one entry; the first problem becomes a 400 naming the field inside it."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.get("loc", ()))
        raise InvalidRequestError(
            f"{where}{path}: {error.get('msg')}", param=f"{where}{path}"
        ) from None


# ---- response ----------------------------------------------------------------------------------


class Annotation(BaseModel):
    """Placeholder for citation annotations (this server makes none)."""

    type: str


class OutputText(BaseModel):
    """An `output_text` content part."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Annotation] = []
    logprobs: list[Any] = []


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    """An assistant message output item."""

    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCallOutput(BaseModel):
    """A function call output item."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = Annotated[OutputMessage | FunctionCallOutput, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    """Prompt tokens served from the prefix cache."""

    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    """Reasoning tokens (none: this server does not separate reasoning)."""

    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """Token counts of a response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    """Why a response is incomplete."""

    reason: Literal["max_output_tokens"] | None = None


class ResponseErrorInfo(BaseModel):
    """Why a response failed."""

    code: str
    message: str


Status = Literal["completed", "incomplete", "failed", "in_progress"]


class ResponseObject(BaseModel):
    """A response (`object: "response"`), with the request's parameters echoed."""

    model_config = ConfigDict(serialize_by_alias=True)

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Status
    error: ResponseErrorInfo | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = []
    instructions: str | None = None
    tools: list[FunctionToolSpec] = []
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    text: TextConfig = Field(default_factory=TextConfig)
    truncation: Literal["auto", "disabled"] = "disabled"
    metadata: dict[str, str] = {}
    user: str | None = None
    prompt_cache_key: str | None = None
    usage: ResponseUsage | None = None


class DeletedResponse(BaseModel):
    """Answer of DELETE /v1/responses/{id}."""

    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# ---- stream events -----------------------------------------------------------------------------


class StreamEvent(BaseModel):
    """Base of every streamed event: its type and its place in the stream."""

    model_config = ConfigDict(serialize_by_alias=True)

    type: str
    sequence_number: int = 0


class ResponseEvent(StreamEvent):
    """response.created / in_progress / completed / incomplete / failed."""

    response: ResponseObject


class OutputItemEvent(StreamEvent):
    """response.output_item.added / done."""

    output_index: int
    item: OutputItem


class ContentPartEvent(StreamEvent):
    """response.content_part.added / done."""

    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class TextDeltaEvent(StreamEvent):
    """response.output_text.delta."""

    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[Any] = []


class TextDoneEvent(StreamEvent):
    """response.output_text.done."""

    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[Any] = []


class ArgumentsDeltaEvent(StreamEvent):
    """response.function_call_arguments.delta."""

    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(StreamEvent):
    """response.function_call_arguments.done."""

    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(StreamEvent):
    """`error`: the stream failed after it started; it closes after this event."""

    type: str = "error"
    code: str | None = None
    message: str
    param: str | None = None
