"""Pydantic models of Together's legacy /inference API: the request and the response shape its
documentation shows, plus the top-level `choices`, `id` and `usage` newer clients read."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    field_serializer,
    model_serializer,
)

from llmserve.api.common import ErrorInfo
from llmserve.api.sampling import SamplerFields

DEFAULT_MAX_TOKENS = 128  # the legacy `together` SDK's default
TogetherFinishReason = Literal["length", "eos_token", "stop_sequence"]


class InferenceRequest(SamplerFields):
    """Body of POST /inference; null means default; unknown fields are ignored."""

    DEFAULT_MAX_TOKENS: ClassVar[int | None] = DEFAULT_MAX_TOKENS

    model: str | None = None
    prompt: str
    n: int | None = Field(None, ge=1, le=128)
    logprobs: int | None = Field(None, ge=0, le=20, description="Any number: logprobs per token.")
    stream_tokens: bool | None = False


class Choice(BaseModel):
    """One generated text with why it ended (in Together's words)."""

    text: str
    finish_reason: TogetherFinishReason | None = None
    index: int
    logprobs: list[float] | None = None  # the chosen tokens' logprobs, when asked for

    @model_serializer(mode="wrap")
    def _omit_absent_logprobs(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The documented response has no `logprobs` key; it appears only when asked for.
        data: dict[str, Any] = handler(self)
        if data.get("logprobs") is None:
            data.pop("logprobs", None)
        return data


class Output(BaseModel):
    """`output` of an inference response."""

    choices: list[Choice]
    raw_compute_time: float
    result_type: Literal["language-model-inference"] = "language-model-inference"


class Usage(BaseModel):
    """Token counts of a response."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class InferenceResponse(BaseModel):
    """Response of POST /inference (non-streaming)."""

    id: str
    status: Literal["finished"] = "finished"
    prompt: list[str]
    model: str
    model_owner: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    num_returns: int
    args: InferenceRequest
    subjobs: list[str] = Field(default_factory=list)
    output: Output
    choices: list[Choice]
    usage: Usage

    @field_serializer("args")
    def _echo(self, args: InferenceRequest) -> dict[str, Any]:
        # `args` echoes what the client sent, no more: unset fields stay out.
        echoed: dict[str, Any] = args.model_dump(mode="json", exclude_unset=True)
        return echoed


class StreamChoice(BaseModel):
    """One choice's new text in a stream event."""

    text: str
    index: int
    finish_reason: TogetherFinishReason | None = None


class StreamChunk(BaseModel):
    """`data:` of one streamed event (`stream_tokens: true`); the last carries `usage`."""

    id: str
    choices: list[StreamChoice]
    usage: Usage | None = None


class StreamErrorInfo(ErrorInfo):
    """An error inside a stream also names the request (the legacy SDK reads `request_id`)."""

    request_id: str


class StreamError(BaseModel):
    """The last event of a stream that failed after it started."""

    error: StreamErrorInfo
