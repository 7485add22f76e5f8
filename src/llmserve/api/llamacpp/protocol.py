"""Pydantic models of llama.cpp's native server API (`llama-server`): requests as its clients
send them, responses in its shapes (tools/server's /completion, /infill, /props, /slots)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmserve.api.common import ChatMessage
from llmserve.api.sampling import SamplerFields, aliased
from llmserve.core import constraints
from llmserve.core.errors import InvalidRequestError

# llama.cpp's LLAMA_DEFAULT_SEED: "a fresh random seed", on the wire in generation_settings.
RANDOM_SEED = 0xFFFFFFFF
# llama-server's sampler defaults (common/common.h), applied when neither the request nor a
# sampling preset sets the field, so a client sees the sampling it would see there.
LLAMA_SERVER_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
}
UNLIMITED = -1  # n_predict on the wire: "until EOS or the context is full"

StopType = Literal["none", "eos", "limit", "word"]
PromptPart = str | Annotated[int, Field(ge=0)]
Prompt = str | list[PromptPart]


class PromptObject(BaseModel):
    """llama-server's prompt object: text, and the media its `<__media__>` markers stand for."""

    model_config = ConfigDict(extra="allow")

    prompt_string: str
    multimodal_data: list[str] | str | None = None


# One prompt: text, token ids (text may sit between them), or a prompt object.
OnePrompt = str | PromptObject | list[PromptPart]
# /completion's `prompt`: one prompt, or several (each its own result, by `index`).
CompletionPrompt = OnePrompt | list[str | PromptObject | list[PromptPart] | PromptPart]
LogitBiasKey = str | int
LogitBiasValue = float | bool


class CompletionRequest(SamplerFields):
    """Body of POST /completion; null means llama-server's default.

    The shared sampler fields under llama.cpp's names (aliases of the base: `repeat_penalty`
    is `repetition_penalty`, `repeat_last_n` is `penalty_range`, `dry_penalty_last_n` is
    `dry_range`, `mirostat` is `mirostat_mode`); `n_predict` is folded into `max_tokens`.
    """

    model_config = ConfigDict(extra="allow")

    DEFAULT_PENALTY_RANGE: ClassVar[int] = 64  # llama-server's repeat_last_n

    model: str | None = None
    prompt: CompletionPrompt = Field(
        description="A string, token ids or a mix, a `{prompt_string}` object, or a list of "
        "those (several prompts: one result each)."
    )
    n_predict: int | None = Field(
        None, ge=-2, description="Tokens to generate; -1 (or -2): until EOS or the context is full."
    )
    stream: bool = False
    cache_prompt: bool = Field(True, description="Accepted: the engine always reuses prefixes.")
    return_tokens: bool = False
    n_probs: int | None = Field(None, ge=0)
    post_sampling_probs: bool = Field(
        False, description="`completion_probabilities` as probabilities after the samplers."
    )
    response_fields: list[str] | None = Field(
        None, description="Only these fields of the result (`a/b` names a nested one)."
    )
    timings_per_token: bool = Field(False, description="`timings` on every streamed event.")
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    id_slot: int | None = Field(None, description="Accepted; the scheduler picks the slot.")
    # The shared fields again with llama.cpp's name first: it wins, and the schema shows it.
    repetition_penalty: float | None = Field(
        None, gt=0, validation_alias=aliased("repeat_penalty", "repetition_penalty")
    )
    penalty_range: int | None = Field(
        None,
        ge=-1,
        description="-1: the whole context; 0: no penalties.",
        validation_alias=aliased("repeat_last_n", "penalty_range"),
    )
    dry_range: int | None = Field(
        None, ge=-1, validation_alias=aliased("dry_penalty_last_n", "dry_range")
    )
    seed: int | None = Field(None, ge=-1, le=RANDOM_SEED, description="-1: a random seed.")
    # llama.cpp's forms: {"15043": 1.0}, [[15043, 1.0]], [["Hello", -0.5]]; false bans.
    logit_bias: dict[str, LogitBiasValue] | None = None

    @model_validator(mode="before")
    @classmethod
    def _pairs_to_mapping(cls, data: Any) -> Any:
        # [[token, bias], ...] is llama.cpp's list form of logit_bias: make it a mapping.
        if isinstance(data, dict) and isinstance(data.get("logit_bias"), list):
            data = {**data, "logit_bias": _bias_pairs(data["logit_bias"])}
        return data

    @model_validator(mode="after")
    def _fold_llama_values(self) -> CompletionRequest:
        # n_predict is llama.cpp's max_tokens; negatives mean "no limit" (the base's None).
        if self.n_predict is not None and self.n_predict > 0 and self.max_tokens is None:
            self.max_tokens = self.n_predict
        if self.seed in (UNLIMITED, RANDOM_SEED):
            self.seed = None
        if self.dry_range is not None and self.dry_range < 0:
            self.dry_range = None  # -1: the whole context, which the base spells None
        return self

    def prompts(self) -> list[OnePrompt]:
        """The prompts, by llama-server's rule: a list is several unless it holds token ids
        (alone, or mixed with text), which make one prompt."""
        prompt = self.prompt
        if not isinstance(prompt, list):
            return [prompt]
        ids = any(isinstance(p, int) for p in prompt)
        if ids and all(isinstance(p, int | str) for p in prompt):
            return [prompt]  # type: ignore[list-item]  # ids and text: checked above
        return [_one_prompt(p) for p in prompt]

    def generates_nothing(self) -> bool:
        """`n_predict: 0`: evaluate the prompt, produce no token (llama-server allows it)."""
        return self.n_predict == 0

    def output_constraint(self) -> constraints.Constraint | None:
        """The `grammar` or `json_schema` the request asks for (one at most)."""
        if self.grammar is not None and self.json_schema is not None:
            raise InvalidRequestError(
                "give either `grammar` or `json_schema`, not both", param="json_schema"
            )
        if self.json_schema is not None:
            return constraints.JsonSchema.of(self.json_schema, "json_schema")
        return constraints.Grammar.of(self.grammar, "grammar")


def _one_prompt(part: Any) -> OnePrompt:
    if isinstance(part, int):
        raise InvalidRequestError(
            "a list of prompts holds texts, token lists or prompt objects, not a bare token id",
            param="prompt",
        )
    one: OnePrompt = part
    return one


def _bias_pairs(pairs: list[Any]) -> Any:
    """[[token, bias], ...] as {token: bias}; anything else is left for validation to refuse."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str | int)):
            return pairs  # not the pair form: the field's type check names the problem
        out[str(pair[0])] = pair[1]
    return out


class InputExtra(BaseModel):
    """One extra file of context for /infill (e.g. a header the code uses)."""

    model_config = ConfigDict(extra="forbid")

    text: str
    filename: str = "tmp"


class InfillRequest(CompletionRequest):
    """Body of POST /infill: the code before and after the cursor, and what is typed so far."""

    prompt: Prompt = Field("", description="Text typed at the cursor, continued by the model.")
    input_prefix: Prompt
    input_suffix: Prompt
    input_extra: list[InputExtra] = Field(default_factory=list)


class Timings(BaseModel):
    """llama-server's `timings`: prompt processing and generation counts and durations."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


class GenerationSettings(BaseModel):
    """The sampling a request ran with, as llama-server reports it (`generation_settings`)."""

    seed: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    top_n_sigma: float | None
    repeat_last_n: int
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    dry_multiplier: float
    dry_base: float
    dry_allowed_length: int
    dry_penalty_last_n: int
    xtc_probability: float
    xtc_threshold: float
    mirostat: int
    mirostat_tau: float
    mirostat_eta: float
    stop: list[str]
    n_predict: int = Field(description="-1: until EOS or the context is full.")
    max_tokens: int
    ignore_eos: bool
    stream: bool
    n_probs: int
    logit_bias: list[tuple[int, float]]
    grammar: str = ""
    post_sampling_probs: bool = False
    # llama.cpp's adaptive-p sampler, which llmserve does not run: its "off" values.
    adaptive_target: float = -1.0
    adaptive_decay: float = 0.9


class TopProb(BaseModel):
    """One candidate token at a position."""

    id: int
    token: str
    bytes: list[int]
    logprob: float


class TokenProb(TopProb):
    """The sampled token at a position with the best alternatives (`completion_probabilities`)."""

    top_logprobs: list[TopProb]


class TopPostProb(BaseModel):
    """One candidate the samplers kept at a position, with its probability among them."""

    id: int
    token: str
    bytes: list[int]
    prob: float


class TokenPostProb(TopPostProb):
    """`post_sampling_probs`: the sampled token and the candidates the samplers kept."""

    top_probs: list[TopPostProb]


Probabilities = list[TokenProb] | list[TokenPostProb]


class CompletionChunk(BaseModel):
    """One streamed part of a completion (`stop: false`)."""

    index: int = 0
    content: str
    tokens: list[int]
    stop: Literal[False] = False
    tokens_predicted: int
    tokens_evaluated: int
    completion_probabilities: Probabilities | None = None
    timings: Timings | None = None  # with `timings_per_token`


class CompletionResponse(BaseModel):
    """A whole completion, or the final streamed event (`stop: true`)."""

    index: int = 0
    content: str
    tokens: list[int]
    stop: Literal[True] = True
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    generation_settings: GenerationSettings
    prompt: str
    has_new_line: bool
    truncated: bool = False  # llmserve refuses a prompt that does not fit; it never cuts one
    stop_type: StopType
    stopping_word: str
    tokens_cached: int
    timings: Timings
    completion_probabilities: Probabilities | None = None


class DefaultGenerationSettings(BaseModel):
    """`default_generation_settings` of /props."""

    params: GenerationSettings
    n_ctx: int


class Modalities(BaseModel):
    """Input kinds the model takes besides text."""

    vision: bool = False
    video: bool = False
    audio: bool = False


class PropsResponse(BaseModel):
    """GET /props: the server's defaults and the model's template and special tokens."""

    default_generation_settings: DefaultGenerationSettings
    total_slots: int
    model_alias: str
    model_path: str
    modalities: Modalities = Modalities()
    endpoint_slots: bool = True
    endpoint_props: bool = False
    endpoint_metrics: bool = True
    chat_template: str
    bos_token: str
    eos_token: str
    build_info: str
    is_sleeping: bool = False


class SlotNextToken(BaseModel):
    """What a slot knows about its next token (llama-server's `next_token`)."""

    has_next_token: bool


class Slot(BaseModel):
    """One engine sequence slot, as far as the engine's stats tell (GET /slots)."""

    id: int
    n_ctx: int
    speculative: bool = False
    is_processing: bool
    next_token: list[SlotNextToken]


class ToolFunctionSpec(BaseModel):
    """A function a chat may call (OpenAI's shape, as llama-server takes it)."""

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    """A tool offered to the chat."""

    type: Literal["function"] = "function"
    function: ToolFunctionSpec


class EmbeddingRequest(BaseModel):
    """POST /embedding: `content` (one prompt, or a list) and `embd_normalize` (2: L2, -1: none)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    content: Prompt | list[Prompt] = Field(min_length=1)
    embd_normalize: Literal[-1, 2] = 2

    def prompts(self) -> list[Prompt]:
        """The prompts, one per embedding: texts and nested lists are several, ids one."""
        content: Any = self.content
        if isinstance(content, str):
            return [content]
        several = all(isinstance(p, str) for p in content) or any(
            isinstance(p, list) for p in content
        )
        return list(content) if several else [content]


class EmbeddingResult(BaseModel):
    """One entry of /embedding's answer: the prompt's vector (pooled: a list of one)."""

    index: int
    embedding: list[list[float]]


class ApplyTemplateRequest(BaseModel):
    """POST /apply-template: render a chat through the model's template, without generating."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class ApplyTemplateResponse(BaseModel):
    """The rendered prompt text, exactly what a chat completion would tokenize."""

    prompt: str
