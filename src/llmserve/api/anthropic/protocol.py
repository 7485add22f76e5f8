"""Pydantic models of Anthropic's Messages API: requests as Claude Code and the SDK send them,
responses, stream events and errors as Anthropic's API shapes them.

Fields and blocks that change nothing here (`cache_control`, `metadata`, `thinking`, previous
`thinking` blocks, server tools) are accepted and ignored; what cannot be served (images,
documents) is a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["user", "assistant", "system"]
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
# Anthropic's own tools (web search, bash, text editor, ...) carry a versioned `type` and no
# schema; a local model cannot run them, so they are dropped from the tool list.
CUSTOM_TOOL_TYPES = (None, "custom")


class Lenient(BaseModel):
    """A wire object that accepts unknown fields (`cache_control`, `citations`, ...), unused."""

    model_config = ConfigDict(extra="allow")


class TextBlock(Lenient):
    """`{"type": "text", "text": ...}`."""

    type: Literal["text"]
    text: str


class ImageBlock(Lenient):
    """An image (or PDF document): accepted by the schema so the refusal can name the field."""

    type: Literal["image", "document"]


class ToolUseBlock(Lenient):
    """A call the assistant made earlier in the conversation."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(Lenient):
    """The result of a call, in a user message."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] | None = (
        None
    )
    is_error: bool | None = None


class ThinkingBlock(Lenient):
    """A previous turn's reasoning (from a model that thinks): dropped from the prompt."""

    type: Literal["thinking", "redacted_thinking"]


ContentBlock = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock,
    Field(discriminator="type"),
]


class InputMessage(Lenient):
    """One entry of `messages`; `system` entries are what newer Claude Code sends there."""

    role: Role
    content: str | list[ContentBlock]


class Tool(Lenient):
    """An entry of `tools`: a custom tool with a JSON schema, or a server tool (ignored)."""

    type: str | None = None
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(Lenient):
    """`tool_choice`: auto, any (some tool), tool (the one named) or none."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(Lenient):
    """`thinking`: accepted; the model serves without a thinking block either way."""

    type: str  # enabled, disabled, adaptive, ...: whichever, the answer has no thinking block
    budget_tokens: int | None = None


class MessagesRequest(Lenient):
    """Body of POST /v1/messages."""

    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    metadata: dict[str, Any] | None = None


class CountTokensRequest(Lenient):
    """Body of POST /v1/messages/count_tokens: a Messages request without the output settings."""

    model: str | None = None
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class CountTokensResponse(BaseModel):
    """Response of POST /v1/messages/count_tokens."""

    input_tokens: int


# ---- responses ----


class Usage(BaseModel):
    """Token counts; `input_tokens` excludes what was read from the prefix cache, as Anthropic's."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class OutputText(BaseModel):
    """A text block of the answer."""

    type: Literal["text"] = "text"
    text: str


class OutputToolUse(BaseModel):
    """A tool call of the answer; `input` is the parsed arguments object."""

    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


OutputBlock = OutputText | OutputToolUse


class MessageResponse(BaseModel):
    """Response of POST /v1/messages (also the `message` of `message_start`)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutputBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage


# ---- stream events ----


class MessageStart(BaseModel):
    """`message_start`: the message with no content yet."""

    type: Literal["message_start"] = "message_start"
    message: MessageResponse


class Ping(BaseModel):
    """`ping`: keeps the connection busy (right away, and while a long prompt is prefilled)."""

    type: Literal["ping"] = "ping"


class ContentBlockStart(BaseModel):
    """`content_block_start`: a block opens at `index` (tool_use blocks with `input: {}`)."""

    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: OutputBlock


class TextDelta(BaseModel):
    """New text of a text block."""

    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    """New argument JSON of a tool_use block (concatenated, it is the `input` object)."""

    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDelta(BaseModel):
    """`content_block_delta`."""

    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStop(BaseModel):
    """`content_block_stop`."""

    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDeltaBody(BaseModel):
    """Why the message ended."""

    stop_reason: StopReason
    stop_sequence: str | None = None


class MessageDelta(BaseModel):
    """`message_delta`: the stop reason and the final usage (cumulative, as the SDK expects)."""

    type: Literal["message_delta"] = "message_delta"
    delta: MessageDeltaBody
    usage: Usage


class MessageStop(BaseModel):
    """`message_stop`: the last event."""

    type: Literal["message_stop"] = "message_stop"


StreamEvent = (
    MessageStart
    | Ping
    | ContentBlockStart
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
)


# ---- errors ----


class ErrorDetail(BaseModel):
    """The inner error object."""

    type: str
    message: str


class ErrorResponse(BaseModel):
    """Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`."""

    type: Literal["error"] = "error"
    error: ErrorDetail
