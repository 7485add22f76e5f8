"""Ollama's native API (docs/api.md of ollama/ollama): request and response models.

Requests keep unknown fields (clients send more than they need; they are logged and ignored).
Responses follow Ollama's field names and units: durations in nanoseconds, times in RFC 3339.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmserve.api.sampling import SamplerFields, aliased
from llmserve.core import constraints
from llmserve.core.errors import InvalidRequestError

# What /api/version reports: Ollama's version whose API this dialect follows. VS Code Copilot
# refuses servers older than 0.6.4; llmserve's own version means nothing to Ollama clients.
OLLAMA_VERSION = "0.6.4"
OLLAMA_BANNER = "Ollama is running"  # opencode compares GET / with this, byte for byte
DEFAULT_TAG = "latest"
# Ollama's paths: they answer in Ollama's error shape and open together under ollama_auth off.
# (`/api/embed` also covers `/api/embeddings`.)
OLLAMA_PATHS = (
    "/api/version",
    "/api/tags",
    "/api/show",
    "/api/ps",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/blobs/",
)
# A Go duration of zero as keep_alive may spell it: "0", "0s", "0m", "0.0h", ...
ZERO_DURATION = re.compile(r"[+-]?0+(\.0*)?(ns|us|µs|ms|s|m|h)?")
DoneReason = Literal["stop", "length", "load", "unload"]
KeepAlive = float | str | None


def keep_alive_is_zero(value: KeepAlive) -> bool:
    """True when keep_alive asks to unload the model now (0, "0", "0s", ...)."""
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    return ZERO_DURATION.fullmatch(value.strip()) is not None


def timestamp(at: datetime | None = None) -> str:
    """RFC 3339 UTC with microseconds, as Ollama writes `created_at`."""
    moment = (at or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class OllamaOptions(SamplerFields):
    """`options`: the shared sampler fields under Ollama's names; null means the default.

    `num_predict` is `max_tokens` (0, -1 and -2: up to the context limit), `repeat_penalty` is
    `repetition_penalty`, `repeat_last_n` is `penalty_range` (-1: the whole context, 0: off),
    `mirostat` is `mirostat_mode`; a negative `seed` is a random one. `num_ctx` is bounded by
    the server's context. Options for the runtime (num_gpu, num_thread, use_mmap, ...) and
    samplers llama.cpp dropped (tfs_z, penalize_newline) are accepted and ignored.
    """

    model_config = ConfigDict(extra="allow")

    # Ollama's defaults where a request and the preset leave a sampler unset (api/types.go).
    OLLAMA_DEFAULTS: ClassVar[dict[str, Any]] = {
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "penalty_range": 64,
    }

    max_tokens: int | None = Field(
        None, ge=1, validation_alias=aliased("num_predict", "max_tokens")
    )
    repetition_penalty: float | None = Field(
        None, gt=0, validation_alias=aliased("repeat_penalty", "repetition_penalty")
    )
    penalty_range: int | None = Field(
        None, ge=-1, validation_alias=aliased("repeat_last_n", "penalty_range")
    )
    mirostat_mode: int | None = Field(
        None, ge=0, le=2, validation_alias=aliased("mirostat", "mirostat_mode")
    )
    num_ctx: int | None = None

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _unlimited(cls, value: Any) -> Any:
        # -1 (Ollama's default), -2 ("fill the context") and 0: up to the context limit.
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            return None
        return value

    @field_validator("seed", "num_ctx", mode="before")
    @classmethod
    def _negative_is_unset(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value <= -1:
            return None
        return value

    def with_ollama_defaults(self) -> OllamaOptions:
        """These options with Ollama's defaults where nothing (request or preset) set a value."""
        unset = {k: v for k, v in self.OLLAMA_DEFAULTS.items() if getattr(self, k) is None}
        return self.model_copy(update=unset) if unset else self


class OllamaFunctionCall(BaseModel):
    """The function of a tool call; `arguments` is an object (a string is parsed too)."""

    model_config = ConfigDict(extra="allow")

    index: int | None = None
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    """A tool call of an assistant message."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    function: OllamaFunctionCall


class OllamaFunction(BaseModel):
    """A function offered to the model (OpenAI's function schema)."""

    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(BaseModel):
    """One entry of `tools`."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: OllamaFunction


class OllamaMessage(BaseModel):
    """A chat message; `tool_name` names the tool whose result a `tool` message carries."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class GenerationFields(BaseModel):
    """What /api/chat and /api/generate share."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    format: str | dict[str, Any] | None = None
    options: OllamaOptions = Field(default_factory=lambda: OllamaOptions.model_validate({}))
    stream: bool = True
    keep_alive: KeepAlive = None
    think: bool | str | None = None  # accepted: the bundled model does not think

    def output_constraint(self) -> constraints.Constraint | None:
        """`format: "json"` or a JSON schema as a neutral constraint; "" or null: none."""
        value = self.format
        if value is None or value == "":
            return None
        if value == "json":
            return constraints.JsonObject(param="format")
        if isinstance(value, dict):
            return constraints.JsonSchema.of(value, "format")
        raise InvalidRequestError(
            f'format must be "json" or a JSON schema object, not {value[:40]!r}', param="format"
        )

    def unknown_fields(self) -> list[str]:
        """Top-level and option fields this server ignores (for the debug log)."""
        top = sorted(self.model_extra or {})
        return top + [f"options.{name}" for name in sorted(self.options.model_extra or {})]


class ChatRequest(GenerationFields):
    """Body of POST /api/chat."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = None


class GenerateRequest(GenerationFields):
    """Body of POST /api/generate."""

    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    # Deprecated by Ollama: the tokens of an earlier answer (llama_token is int32).
    context: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = None
    raw: bool | None = None
    images: list[str] | None = None


MAX_EMBED_INPUTS = 2048  # per request, as the OpenAI route allows


class EmbedRequest(BaseModel):
    """Body of /api/embed: one text or a list; `truncate` (default on) cuts what overflows."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    input: str | list[str] = Field(min_length=1)
    truncate: bool = True
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None
    dimensions: int | None = None

    def texts(self) -> list[str]:
        """The inputs as a list, each checked to be non-empty."""
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if len(texts) > MAX_EMBED_INPUTS:
            raise InvalidRequestError(
                f"input has {len(texts)} entries; at most {MAX_EMBED_INPUTS}", param="input"
            )
        if not all(texts):
            raise InvalidRequestError("input must not contain empty strings", param="input")
        return texts


class EmbedResponse(BaseModel):
    """/api/embed's answer: L2-normalized vectors, in input order."""

    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int = 0
    prompt_eval_count: int


class LegacyEmbeddingRequest(BaseModel):
    """Body of the older /api/embeddings: one `prompt`."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    prompt: str = Field(min_length=1)
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class LegacyEmbeddingResponse(BaseModel):
    """/api/embeddings' answer: one vector, not normalized (as Ollama's)."""

    embedding: list[float]


class ModelRequest(BaseModel):
    """Body of /api/show and /api/pull: `model`, or `name` as older clients send it."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    name: str | None = None
    verbose: bool | None = None
    insecure: bool | None = None
    stream: bool = True

    def requested(self) -> str:
        """The model the request names."""
        return self.model or self.name or ""


# ---- responses ----


class ModelDetails(BaseModel):
    """`details` of a model in /api/tags, /api/show and /api/ps."""

    parent_model: str = ""
    format: str = "gguf"
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ModelEntry(BaseModel):
    """A model as /api/tags lists it."""

    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    """GET /api/tags."""

    models: list[ModelEntry]


class RunningModel(BaseModel):
    """A loaded model as /api/ps lists it."""

    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class PsResponse(BaseModel):
    """GET /api/ps."""

    models: list[RunningModel]


class ShowResponse(BaseModel):
    """POST /api/show."""

    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    """GET /api/version."""

    version: str = OLLAMA_VERSION


class StatusResponse(BaseModel):
    """A line of /api/pull's answer."""

    status: str


class ErrorBody(BaseModel):
    """Ollama's error shape, also the last line of a stream that failed."""

    error: str


class ResponseFunction(BaseModel):
    """The function of a tool call the model made."""

    index: int
    name: str
    arguments: dict[str, Any]


class ResponseToolCall(BaseModel):
    """A tool call the model made, its arguments an object."""

    id: str
    function: ResponseFunction


class ResponseMessage(BaseModel):
    """The assistant's message (a fragment of it, when streaming)."""

    role: Literal["assistant"] = "assistant"
    content: str = ""
    tool_calls: list[ResponseToolCall] | None = None


class Timings(BaseModel):
    """The counters of a final chunk; durations in nanoseconds."""

    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


class ChunkBase(BaseModel):
    """What every /api/chat and /api/generate line has; the final one adds the rest."""

    model: str
    created_at: str
    done: bool
    done_reason: DoneReason | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None

    def line(self) -> str:
        """The chunk as one NDJSON line (unset final-only fields left out, as Ollama does)."""
        return self.model_dump_json(exclude_none=True) + "\n"


class ChatChunk(ChunkBase):
    """A line of /api/chat (or its whole answer with `stream: false`)."""

    message: ResponseMessage


class GenerateChunk(ChunkBase):
    """A line of /api/generate (or its whole answer with `stream: false`)."""

    response: str
    context: list[int] | None = None
