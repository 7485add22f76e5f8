"""Pydantic models of the OpenAI dialect: requests as clients send them, responses as OpenAI."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

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
from llmserve.api.common import (
    ChatMessage,
    ToolCall,
    continues_final_message,
)
from llmserve.api.sampling import SamplerFields
from llmserve.core import constraints
from llmserve.core.errors import InvalidRequestError
from llmserve.core.tools import ToolChoice, ToolFunction, ToolPlan

TokenIds = list[Annotated[int, Field(ge=0, le=2**31 - 1)]]  # llama_token is int32
# OpenAI's schema wants a string here; ours names the server build.
SYSTEM_FINGERPRINT = f"fp_llmserve_{__version__}"


class StreamOptions(BaseModel):
    """`stream_options`: ask for a last chunk carrying `usage`."""

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: a named JSON schema (strict or not, it is enforced)."""

    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: free text, any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    # llama.cpp's server takes {"type": "json_object", "schema": {...}}.
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    def constraint(self) -> constraints.Constraint | None:
        """The constraint this format asks for (None for text)."""
        if self.type == "text":
            return None
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidRequestError(
                    "response_format of type json_schema needs `json_schema`",
                    param="response_format.json_schema",
                )
            schema = self.json_schema.schema_
            param = "response_format.json_schema.schema"
        else:
            schema, param = self.schema_, "response_format.schema"
        if schema is None:
            return constraints.JsonObject()
        return constraints.JsonSchema.of(schema, param)


class StructuredOutputFields(BaseModel):
    """Output constraints in OpenAI's, vLLM's, TabbyAPI's and llama.cpp's spellings; one at most."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = Field(None, description="A GBNF grammar (llama.cpp's syntax).")
    grammar_string: str | None = None
    json_schema: dict[str, Any] | None = None
    regex_pattern: str | None = None

    def output_constraint(self) -> constraints.Constraint | None:
        """The constraint the request's constraint field asks for, or None."""
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise InvalidRequestError(
                f"give at most one output constraint; got {', '.join(given)}", param=given[1]
            )
        return self._constraint_of(given[0]) if given else None

    def _constraint_of(self, name: str) -> constraints.Constraint | None:
        value = getattr(self, name)
        if name == "response_format":
            constraint: constraints.Constraint | None = value.constraint()
            return constraint
        if name in ("guided_json", "json_schema"):
            return constraints.JsonSchema.of(value, name)
        if name in ("guided_regex", "regex_pattern"):
            return constraints.Regex(value, name)
        if name == "guided_choice":
            return constraints.Choice(tuple(value), name)
        return constraints.Grammar.of(value, name)


CONSTRAINT_FIELDS = tuple(StructuredOutputFields.model_fields)


class CompletionRequest(SamplerFields, StructuredOutputFields):
    """Body of POST /v1/completions."""

    model: str | None = None
    prompt: str | list[str] | TokenIds | list[TokenIds]
    suffix: str | None = None
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
            return [p]
        return p


class FunctionDefinition(BaseModel):
    """A function offered to the model: name, description, JSON-schema parameters."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    """An entry of `tools`."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    """The function a named tool_choice forces."""

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(SamplerFields, StructuredOutputFields):
    """Body of POST /v1/chat/completions."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Wins over `max_tokens` when both are given."
    )
    n: int | None = Field(1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = Field(
        None,
        description="Continue the final (assistant) message instead of opening a new turn; "
        "unset: continue when the last message is the assistant's.",
    )
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

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

    @model_validator(mode="after")
    def _one_output_limit(self) -> ChatCompletionRequest:
        # `max_completion_tokens` wins over the older `max_tokens`; folded into `max_tokens`
        # here so that sampling presets (which cap `max_tokens`) see one limit.
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def output_limit_param(self) -> str:
        """The field the client used for the output limit (for errors)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def continues_final_message(self) -> bool:
        """Whether the prompt ends inside the final assistant message or opens a new turn."""
        return continues_final_message(
            self.messages,
            self.continue_final_message,
            self.add_generation_prompt,
            explicit_prompt="add_generation_prompt" in self.model_fields_set,
        )

    def tool_plan(self) -> ToolPlan | None:
        """The tools and tool_choice, dialect-neutral; None when no tools are offered."""
        choice = self.tool_choice
        if not self.tools:
            if choice == "required" or isinstance(choice, NamedToolChoice):
                raise InvalidRequestError(
                    "tool_choice asks for a tool call but the request has no `tools`",
                    param="tool_choice",
                )
            return None
        functions = tuple(
            ToolFunction(t.function.name, t.function.description, t.function.parameters)
            for t in self.tools
        )
        if isinstance(choice, NamedToolChoice):
            return ToolPlan(functions, ToolChoice.FUNCTION, choice.function.name, self._parallel())
        return ToolPlan(functions, ToolChoice(choice or "auto"), None, self._parallel())

    def _parallel(self) -> bool:
        return self.parallel_tool_calls is not False


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


class FunctionCallChunk(BaseModel):
    """The new part of a streamed function call: its name first, then argument text."""

    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallChunk(BaseModel):
    """A `delta.tool_calls` entry: index always; id and type only on the call's first chunk."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallChunk

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatDelta(BaseModel):
    """The new part of the assistant message in a stream chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None

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
    loaded: bool | None = None  # only in listings that include models not loaded
    status: Literal["loaded", "loading", "available"] | None = None


class ModelList(BaseModel):
    """Response of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- embeddings ----


class EmbeddingRequest(BaseModel):
    """Body of POST /v1/embeddings."""

    # Unknown fields are accepted (clients send vendor extras) and logged at debug level.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None  # refused: the vectors are the model's own size
    user: str | None = None  # accepted, not used

    def inputs(self) -> list[str | list[int]]:
        """The input as a list of inputs, each a string or a list of token ids."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [value]  # one input of token ids
        return list(cast(list[str | list[int]], value))


class EmbeddingData(BaseModel):
    """One vector of an embeddings response: floats, or base64 of little-endian float32."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """Token counts of an embeddings response (all of them are input)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """Response of POST /v1/embeddings."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
