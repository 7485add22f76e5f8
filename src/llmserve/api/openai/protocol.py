"""Pydantic models of the OpenAI dialect: requests as clients send them, responses as OpenAI."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from llmserve import __version__
from llmserve.api.sampling import SamplerFields

TokenIds = list[Annotated[int, Field(ge=0, le=2**31 - 1)]]  # llama_token is int32
# OpenAI's schema wants a string here; ours names the server build.
SYSTEM_FINGERPRINT = f"fp_llmserve_{__version__}"


def new_id(prefix: str) -> str:
    """A unique response id such as `chatcmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix time in seconds, OpenAI's `created`."""
    return int(time.time())


class StreamOptions(BaseModel):
    """`stream_options`: ask for a last chunk carrying `usage`."""

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class CompletionRequest(SamplerFields):
    """Body of POST /v1/completions."""

    model: str | None = None
    prompt: str | list[str] | TokenIds | list[TokenIds]
    suffix: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    user: str | None = None

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return p  # type: ignore[return-value]


class TextPart(BaseModel):
    """A text part of a message whose content is a list of parts."""

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    """A function call inside an assistant message's `tool_calls`."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """An assistant's tool call, in OpenAI's shape."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of a chat request."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplerFields):
    """Body of POST /v1/chat/completions."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _completions_body_sent_here(cls, data: Any) -> Any:
        # A completions body (`prompt`, no `messages`) is a common mistake; say where it belongs.
        if isinstance(data, dict) and "messages" not in data and "prompt" in data:
            raise PydanticCustomError(
                "wrong_endpoint",
                "this is the chat endpoint and needs `messages`; a request with `prompt` "
                "belongs at /v1/completions",
            )
        return data

    def output_limit(self) -> int | None:
        """`max_completion_tokens` wins over the older `max_tokens`."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


# ---- responses ----


class PromptTokensDetails(BaseModel):
    """How many prompt tokens came from the prefix cache."""

    cached_tokens: int = 0


class UsageInfo(BaseModel):
    """Token counts of a response."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists per token."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    """One choice of a completions response or chunk."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    """Response (or stream chunk) of /v1/completions."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str = SYSTEM_FINGERPRINT


class ChatTopLogprob(BaseModel):
    """An alternative token in chat logprobs."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    """A chosen token in chat logprobs with its alternatives."""

    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(BaseModel):
    """Chat logprobs: one entry per generated token."""

    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    """The assistant message of a chat response."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] = []


class ChatChoice(BaseModel):
    """One choice of a chat response."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    """Response of /v1/chat/completions."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str = SYSTEM_FINGERPRINT


class ChatDelta(BaseModel):
    """The new part of the assistant message in a stream chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A delta lists only what changed, as OpenAI's stream does.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    """One choice of a chat stream chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE chunk of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str = SYSTEM_FINGERPRINT


class ModelCard(BaseModel):
    """An entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    loaded: bool | None = None  # only in the admin listing, which includes unloaded files


class ModelList(BaseModel):
    """Response of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """The body of an OpenAI error."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: {"error": {...}}."""

    error: ErrorInfo
