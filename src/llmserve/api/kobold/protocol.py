"""Pydantic models of the KoboldAI dialect: requests as SillyTavern and KoboldAI Lite send them,
responses in KoboldCpp's shapes."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmserve.api.sampling import SamplerFields, aliased

DEFAULT_MAX_LENGTH = 180  # KoboldCpp's default `max_length`
DEFAULT_REP_PEN_RANGE = 320  # KoboldCpp's default `rep_pen_range`
KOBOLD_UNITED_VERSION = "1.2.5"  # what KoboldAI clients expect from /api/v1/info/version
# New enough that SillyTavern turns on streaming (1.30), mirostat (1.35), token counting (1.41),
# grammar (1.44) and min_p (1.48) for a KoboldCpp backend.
KOBOLDCPP_VERSION = "1.61"

FinishReason = Literal["stop", "length"]


class KoboldGenerateRequest(SamplerFields):
    """Body of POST /api/v1/generate and /api/extra/generate/stream; null means default.

    The sampler fields are the shared ones under Kobold's names (aliases of the base:
    `max_length` is `max_tokens`, `rep_pen` is `repetition_penalty`, `rep_pen_range` is
    `penalty_range`, `sampler_seed` is `seed`, `stop_sequence` is `stop`, `typical` is
    `typical_p`, `mirostat` is `mirostat_mode`, `bypass_eos` is `ignore_eos`); the validators
    below translate Kobold's meanings of their special values into the base's.
    """

    # Clients send many UI-only fields (s1..s7, quiet, gui_settings, n, ...): accepted, ignored.
    model_config = ConfigDict(extra="allow")

    DEFAULT_MAX_TOKENS: ClassVar[int | None] = DEFAULT_MAX_LENGTH
    DEFAULT_PENALTY_RANGE: ClassVar[int] = DEFAULT_REP_PEN_RANGE

    prompt: str
    memory: str | None = Field(None, description="Prepended to the prompt, never truncated.")
    max_context_length: int | None = Field(None, ge=1)
    # The shared fields again with Kobold's name first: it wins, and the schema shows it.
    max_tokens: int | None = Field(None, ge=1, validation_alias=aliased("max_length", "max_tokens"))
    repetition_penalty: float | None = Field(
        None, gt=0, validation_alias=aliased("rep_pen", "repetition_penalty")
    )
    mirostat_mode: int | None = Field(
        None, ge=0, le=2, validation_alias=aliased("mirostat", "mirostat_mode")
    )
    ignore_eos: bool | None = Field(None, validation_alias=aliased("bypass_eos", "ignore_eos"))
    typical_p: float | None = Field(
        None,
        ge=0,
        le=1,
        description="0 or 1 disables it.",
        validation_alias=aliased("typical", "typical_p"),
    )
    penalty_range: int | None = Field(
        None,
        ge=-1,
        description="0 or -1: the whole context.",
        validation_alias=aliased("rep_pen_range", "penalty_range", "repetition_penalty_range"),
    )
    seed: int | None = Field(
        None,
        ge=-1,
        description="-1: a random seed.",
        validation_alias=aliased("sampler_seed", "seed"),
    )
    stop: str | list[str | None] | None = Field(
        None, validation_alias=aliased("stop_sequence", "stop")
    )
    sampler_order: list[int] | None = Field(
        None, description="Accepted; the order is KoboldCpp's default (see README)."
    )
    trim_stop: bool | None = True
    singleline: bool | None = False
    use_default_badwordsids: bool | None = False
    banned_tokens: list[str | Annotated[int, Field(ge=0)]] | None = None  # type: ignore[assignment]
    grammar: str | None = None
    smoothing_factor: float | None = Field(None, description="Accepted and ignored.")
    genkey: str | None = None
    # KoboldAI United's story features; a client sends the finished prompt instead.
    use_story: bool | None = None
    use_memory: bool | None = None
    use_authors_note: bool | None = None
    use_world_info: bool | None = None

    @field_validator("typical_p")
    @classmethod
    def _typical_zero_is_off(cls, value: float | None) -> float | None:
        return None if value == 0 else value

    @field_validator("penalty_range")
    @classmethod
    def _range_zero_is_whole_context(cls, value: int | None) -> int | None:
        return -1 if value == 0 else value

    @field_validator("seed")
    @classmethod
    def _seed_minus_one_is_random(cls, value: int | None) -> int | None:
        return None if value == -1 else value

    @field_validator("stop")
    @classmethod
    def _drop_empty_stops(cls, value: str | list[str | None] | None) -> list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        return [s for s in items if s] or None

    @model_validator(mode="after")
    def _badwords_ban_eos(self) -> KoboldGenerateRequest:
        # KoboldCpp: use_default_badwordsids bans EOS, as bypass_eos (ignore_eos) does.
        if self.use_default_badwordsids:
            self.ignore_eos = True
        return self

    def stop_strings(self) -> tuple[str, ...]:
        """Stop strings: `stop_sequence` plus a newline for `singleline`."""
        stops = super().stop_strings()
        return (*stops, "\n") if self.singleline else stops


class GenkeyRequest(BaseModel):
    """Body of /api/extra/generate/check and /api/extra/abort."""

    model_config = ConfigDict(extra="allow")

    genkey: str | None = None


class TokenCountRequest(BaseModel):
    """Body of POST /api/extra/tokencount."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    special: bool | None = True


# ---- responses ----


class KoboldText(BaseModel):
    """A generation's text so far."""

    text: str


class KoboldCheckResponse(BaseModel):
    """Response of /api/extra/generate/check."""

    results: list[KoboldText]


class KoboldResult(KoboldText):
    """One generation's text, with why it ended and its token counts (as KoboldCpp adds)."""

    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class KoboldGenerateResponse(BaseModel):
    """Response of /api/v1/generate."""

    results: list[KoboldResult]


class KoboldStreamChunk(BaseModel):
    """`data:` of one `event: message` of /api/extra/generate/stream."""

    token: str
    finish_reason: FinishReason | None = None


class KoboldErrorDetail(BaseModel):
    """What went wrong, in KoboldCpp's words."""

    msg: str
    type: str


class KoboldError(BaseModel):
    """KoboldCpp's error shape: {"detail": {"msg", "type"}}."""

    detail: KoboldErrorDetail


class KoboldStreamError(BaseModel):
    """The last event of a stream that failed after it started."""

    token: str = ""
    finish_reason: Literal["error"] = "error"
    detail: KoboldErrorDetail


class AbortResponse(BaseModel):
    """Response of /api/extra/abort; KoboldCpp sends these flags as strings."""

    success: Literal["true", "false"]
    done: Literal["true", "false"]


class TokenCountResponse(BaseModel):
    """Response of /api/extra/tokencount."""

    value: int
    ids: list[int]


class ResultValue(BaseModel):
    """{"result": ...}: /api/v1/model, /api/v1/info/version."""

    result: str


class IntValue(BaseModel):
    """{"value": N}: the /config routes."""

    value: int


class ExtraVersion(BaseModel):
    """GET /api/extra/version: which KoboldCpp this server stands in for (SillyTavern reads it)."""

    result: Literal["KoboldCpp"] = "KoboldCpp"
    version: str = KOBOLDCPP_VERSION
    protected: bool
    txt2img: bool = False
    vision: bool = False
    transcribe: bool = False
    multiplayer: bool = False
    websearch: bool = False
    tts: bool = False
    embeddings: bool = False


class Perf(BaseModel):
    """GET /api/extra/perf: the last generation and the queue, in KoboldCpp's fields."""

    last_process: float  # seconds spent on the last prompt (to its first token)
    last_eval: float  # seconds spent generating after that
    last_token_count: int
    last_seed: int
    total_gens: int
    stop_reason: int  # -1 none/aborted, 0 length, 1 EOS, 2 stop sequence (KoboldCpp's codes)
    queue: int
    idle: int
    hordeexitcounter: int = -1
    uptime: float
    idletime: float
    quiet: bool = False
