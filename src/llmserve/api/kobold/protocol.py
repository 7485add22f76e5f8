"""Pydantic models of the KoboldAI dialect: requests as SillyTavern and KoboldAI Lite send them,
responses in KoboldCpp's shapes."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmserve.api.sampling import SamplerFields
from llmserve.core.errors import UnsupportedSamplerError

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 180  # KoboldCpp's default `max_length`
DEFAULT_REP_PEN_RANGE = 320  # KoboldCpp's default `rep_pen_range`
KOBOLD_UNITED_VERSION = "1.2.5"  # what KoboldAI clients expect from /api/v1/info/version
# New enough that SillyTavern turns on streaming (1.30), mirostat (1.35), token counting (1.41),
# grammar (1.44) and min_p (1.48) for a KoboldCpp backend.
KOBOLDCPP_VERSION = "1.61"

FinishReason = Literal["stop", "length"]


class KoboldGenerateRequest(BaseModel):
    """Body of POST /api/v1/generate and /api/extra/generate/stream; null means default."""

    # Clients send many UI-only fields (s1..s7, quiet, gui_settings, n, ...): accepted, ignored.
    model_config = ConfigDict(extra="allow")

    prompt: str
    memory: str | None = Field(None, description="Prepended to the prompt, never truncated.")
    max_length: int | None = Field(None, ge=1)
    max_context_length: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 disables top-k.")
    top_a: float | None = Field(None, ge=0)
    typical: float | None = Field(None, ge=0, le=1, description="0 or 1 disables it.")
    tfs: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    rep_pen: float | None = Field(None, gt=0)
    rep_pen_range: int | None = Field(None, ge=-1, description="0 or -1: the whole context.")
    rep_pen_slope: float | None = None
    sampler_order: list[int] | None = None
    sampler_seed: int | None = Field(None, ge=-1, description="-1: a random seed.")
    stop_sequence: list[str | None] | None = None
    trim_stop: bool | None = True
    singleline: bool | None = False
    use_default_badwordsids: bool | None = False
    bypass_eos: bool | None = False
    banned_tokens: list[str | Annotated[int, Field(ge=0)]] | None = None
    logit_bias: dict[str, float] | None = None
    grammar: str | None = None
    mirostat: int | None = Field(None, ge=0, le=2)
    mirostat_tau: float | None = Field(None, ge=0)
    mirostat_eta: float | None = Field(None, ge=0)
    dynatemp_range: float | None = Field(None, ge=0)
    dynatemp_exponent: float | None = None
    genkey: str | None = None
    # KoboldAI United's story features; a client sends the finished prompt instead.
    use_story: bool | None = None
    use_memory: bool | None = None
    use_authors_note: bool | None = None
    use_world_info: bool | None = None

    def log_unknown_fields(self) -> None:
        """Note ignored client extras at debug level."""
        if self.model_extra:
            log.debug("kobold generate: ignoring fields %s", sorted(self.model_extra))

    def output_limit(self) -> int:
        """Tokens to generate."""
        return self.max_length or DEFAULT_MAX_LENGTH

    def stops(self) -> list[str]:
        """Stop strings: `stop_sequence` plus a newline for `singleline`."""
        stops = [s for s in self.stop_sequence or () if s]
        if self.singleline:
            stops.append("\n")
        return stops

    def sampler_fields(self, context_length: int, banned_ids: list[int]) -> SamplerFields:
        """The same request in the shared sampler vocabulary (whose checks then apply)."""
        self._reject_unsupported()
        return SamplerFields.model_validate(
            {
                "temperature": self.temperature,
                "top_p": self.top_p,
                "top_k": self.top_k,
                "min_p": self.min_p,
                "typical_p": self.typical if self.typical else None,
                "repetition_penalty": self.rep_pen,
                "penalty_range": self._penalty_range(context_length),
                "seed": None if self.sampler_seed in (None, -1) else self.sampler_seed,
                "stop": self.stops(),
                # KoboldCpp: use_default_badwordsids bans EOS; bypass_eos keeps generating past it.
                "ignore_eos": bool(self.bypass_eos or self.use_default_badwordsids),
                "logit_bias": self.logit_bias,
                "banned_tokens": banned_ids,
                "mirostat_mode": self.mirostat,
                "mirostat_tau": self.mirostat_tau,
                "mirostat_eta": self.mirostat_eta,
                "top_a": self.top_a,
                "tfs": self.tfs,
            }
        )

    def _penalty_range(self, context_length: int) -> int:
        if self.rep_pen_range is None:
            return DEFAULT_REP_PEN_RANGE
        # Kobold clients say 0 (or -1) for "the whole context"; say so in tokens.
        return context_length if self.rep_pen_range <= 0 else self.rep_pen_range

    def _reject_unsupported(self) -> None:
        slope = self.rep_pen_slope
        # KoboldCpp reads a slope outside (0, 1) as "no slope", and a slope only scales a penalty.
        penalized = self.rep_pen is not None and self.rep_pen > 1.0
        if slope is not None and 0.0 < slope < 1.0 and penalized:
            raise UnsupportedSamplerError(
                "sampler `rep_pen_slope` is not supported by the llama.cpp engine; "
                "leave it unset or at 1",
                param="rep_pen_slope",
            )
        if self.dynatemp_range:
            raise UnsupportedSamplerError(
                "dynamic temperature (`dynatemp_range` > 0) is not supported by the llama.cpp "
                "engine; leave it unset or at 0",
                param="dynatemp_range",
            )


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
