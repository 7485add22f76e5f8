"""The sampler request base every dialect shares (OpenAI, vLLM, TabbyAPI, Kobold, Together names).

One pydantic base holds the sampling fields; each dialect's spelling of a field is an alias of
it (Kobold's `rep_pen` is `repetition_penalty`, `max_length` is `max_tokens`, ...), so sampling
presets and checks apply to every dialect in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, ClassVar, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from llmserve.core.errors import InvalidRequestError, LLMServeError
from llmserve.core.params import DrySettings, MirostatMode, SamplingParams

log = logging.getLogger(__name__)

StopField = str | list[str | None] | None  # Kobold clients send nulls among the strings
T = TypeVar("T")


def stop_tuple(stop: StopField) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    return tuple(s for s in items if s)


def aliased(*names: str) -> AliasChoices:
    """The field's own name first, then the other dialects' names for it."""
    return AliasChoices(*names)


@contextmanager
def dialect_params(names: Mapping[str, str]) -> Iterator[None]:
    """Errors raised inside name engine fields (`prompt`, `max_tokens`, ...): say the dialect's."""
    try:
        yield
    except LLMServeError as exc:
        if exc.param is not None and exc.param in names:
            exc.param = names[exc.param]
        raise


class SamplerFields(BaseModel):
    """The sampling fields of every dialect's generation request; null means the default.

    Field names are the OpenAI/vLLM ones; `validation_alias` adds the other dialects' names.
    Dialect defaults (Kobold's 180 tokens, Together's 128) are class constants applied when the
    request is translated, after sampling presets had their chance to fill a field in.
    """

    # Unknown fields are accepted (clients send vendor extras) and logged at debug level.
    model_config = ConfigDict(extra="allow")

    DEFAULT_MAX_TOKENS: ClassVar[int | None] = None  # None: the rest of the context
    DEFAULT_PENALTY_RANGE: ClassVar[int] = 64

    max_tokens: int | None = Field(None, ge=1, validation_alias=aliased("max_tokens", "max_length"))
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables top-k.")
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(
        None, gt=0, le=1, validation_alias=aliased("typical_p", "typical")
    )
    top_n_sigma: float | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(
        None, gt=0, validation_alias=aliased("repetition_penalty", "rep_pen")
    )
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    penalty_range: int | None = Field(
        None,
        ge=-1,
        description="-1: the whole context.",
        validation_alias=aliased("penalty_range", "repetition_penalty_range", "rep_pen_range"),
    )
    seed: int | None = Field(None, validation_alias=aliased("seed", "sampler_seed"))
    stop: StopField = Field(None, validation_alias=aliased("stop", "stop_sequence"))
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool | None = Field(None, validation_alias=aliased("ignore_eos", "bypass_eos"))
    min_tokens: int | None = Field(None, ge=0)
    logit_bias: dict[str, float] | None = None
    banned_tokens: list[Annotated[int, Field(ge=0)]] | None = None
    dry_multiplier: float | None = Field(None, ge=0)
    dry_base: float | None = Field(None, ge=1)
    dry_allowed_length: int | None = Field(None, ge=0)
    dry_range: int | None = Field(None, ge=0)
    dry_sequence_breakers: list[str] | None = None
    xtc_probability: float | None = Field(None, ge=0, le=1)
    xtc_threshold: float | None = Field(None, ge=0, le=1)
    mirostat_mode: int | None = Field(
        None, ge=0, le=2, validation_alias=aliased("mirostat_mode", "mirostat")
    )
    mirostat_tau: float | None = Field(None, ge=0)
    mirostat_eta: float | None = Field(None, ge=0)
    # KoboldCpp's samplers (SillyTavern sends them to every backend), served by llama.cpp too.
    top_a: float | None = Field(None, ge=0, le=1, description="0 disables top-a.")
    tfs: float | None = Field(None, ge=0, le=1, description="1 disables it.")
    rep_pen_slope: float | None = Field(
        None,
        ge=0,
        le=10,
        validation_alias=aliased("rep_pen_slope", "repetition_penalty_slope"),
        description="Applied in (0, 1) as KoboldCpp does; 0 and values above 1 mean no slope.",
    )
    dynatemp_range: float | None = Field(None, ge=0, description="0 disables it.")
    dynatemp_exponent: float | None = Field(None, ge=0)

    def log_unknown_fields(self, route: str) -> None:
        """Note ignored vendor extras at debug level."""
        if self.model_extra:
            log.debug("%s: ignoring unknown fields %s", route, sorted(self.model_extra))

    def output_limit(self) -> int | None:
        """Tokens to generate per choice: the request's, else the dialect's default."""
        return self.DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings to match."""
        return stop_tuple(self.stop)

    def sampling_params(
        self,
        *,
        n: int,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        banned_ids: Sequence[int] | None = None,
    ) -> SamplingParams:
        """Translate into engine SamplingParams; rejects samplers the engine lacks.

        `banned_ids` replaces `banned_tokens` when a dialect bans text (Kobold) it tokenized.
        """
        return SamplingParams(
            max_tokens=self.output_limit(),
            temperature=_or(self.temperature, 1.0),
            top_p=_or(self.top_p, 1.0),
            top_k=self.top_k if self.top_k and self.top_k > 0 else None,
            min_p=_or(self.min_p, 0.0),
            typical_p=_or(self.typical_p, 1.0),
            top_n_sigma=self.top_n_sigma,
            repetition_penalty=_or(self.repetition_penalty, 1.0),
            repetition_penalty_slope=_slope(self.rep_pen_slope),
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            penalty_range=_penalty_range(self.penalty_range, self.DEFAULT_PENALTY_RANGE),
            seed=self.seed,
            stop=self.stop_strings(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            min_tokens=_or(self.min_tokens, 0),
            n=n,
            logit_bias=_logit_bias(self.logit_bias),
            banned_token_ids=tuple(self._banned(banned_ids)),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            dry=self._dry(),
            top_a=_or(self.top_a, 0.0),
            tfs=_or(self.tfs, 1.0),
            dynatemp_range=_or(self.dynatemp_range, 0.0),
            dynatemp_exponent=_or(self.dynatemp_exponent, 1.0),
            xtc_probability=_or(self.xtc_probability, 0.0),
            xtc_threshold=_or(self.xtc_threshold, 0.1),
            mirostat=MirostatMode(self.mirostat_mode or 0),
            mirostat_tau=_or(self.mirostat_tau, 5.0),
            mirostat_eta=_or(self.mirostat_eta, 0.1),
        )

    def _banned(self, banned_ids: Sequence[int] | None) -> Sequence[int]:
        return (self.banned_tokens or ()) if banned_ids is None else banned_ids

    def _dry(self) -> DrySettings | None:
        if not self.dry_multiplier:
            return None
        defaults = DrySettings(multiplier=self.dry_multiplier)
        return DrySettings(
            multiplier=self.dry_multiplier,
            base=_or(self.dry_base, defaults.base),
            allowed_length=_or(self.dry_allowed_length, defaults.allowed_length),
            penalty_last_n=self.dry_range or None,
            sequence_breakers=tuple(self.dry_sequence_breakers or defaults.sequence_breakers),
        )


def field_names() -> dict[str, str]:
    """Every accepted spelling of a sampler field -> the field's name (for presets)."""
    names: dict[str, str] = {}
    for name, info in SamplerFields.model_fields.items():
        names[name] = name
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update({str(choice): name for choice in alias.choices})
    return names


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _penalty_range(value: int | None, default: int) -> int | None:
    # Clients say -1 for "the whole context", which the engine spells None.
    if value is None:
        return default
    return None if value < 0 else value


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
    return out


def _slope(value: float | None) -> float:
    # KoboldCpp reads a slope outside (0, 1] as "no slope" (Kobold United's presets send 0 or 1.7).
    if value is None or value <= 0.0 or value > 1.0:
        return 1.0
    return value
