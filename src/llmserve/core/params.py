"""Sampling parameters: what every dialect's request is translated into."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from enum import IntEnum

from llmserve.core import limits
from llmserve.core.constraints import Constraint
from llmserve.core.errors import InvalidRequestError


class MirostatMode(IntEnum):
    """Mirostat variant; OFF uses the ordinary top-k/top-p/... chain."""

    OFF = 0
    V1 = 1
    V2 = 2


@dataclass(frozen=True)
class DrySettings:
    """DRY ("don't repeat yourself") penalty, llama.cpp's implementation."""

    multiplier: float
    base: float = 1.75
    allowed_length: int = 2
    penalty_last_n: int | None = None  # None: the whole context
    sequence_breakers: tuple[str, ...] = ("\n", ":", '"', "*")

    def __post_init__(self) -> None:
        """Bound the breakers: each one is a vocabulary scan when the sampler is built."""
        _check_count(self.sequence_breakers, limits.MAX_DRY_SEQUENCE_BREAKERS, BREAKERS_PARAM)
        _check_lengths(self.sequence_breakers, limits.MAX_DRY_BREAKER_LENGTH, BREAKERS_PARAM)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; neutral defaults change nothing."""

    max_tokens: int | None = None  # None: the rest of the sequence's context
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k cut
    min_p: float = 0.0
    typical_p: float = 1.0
    top_n_sigma: float | None = None
    repetition_penalty: float = 1.0
    # KoboldCpp's slope: tokens only in the older half of the penalty window get
    # 1 + (repetition_penalty - 1) * slope; 1 is no slope.
    repetition_penalty_slope: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_range: int | None = 64  # last N tokens the penalties look at; None: whole context
    seed: int | None = None  # None: a fresh random seed per sequence
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    banned_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; N: the sampled token plus the top N
    prompt_logprobs: int | None = None  # None: none; N: for every prompt token, top N
    dry: DrySettings | None = None
    top_a: float = 0.0  # drop tokens with p < top_a * p_max**2; 0 is off
    tfs: float = 1.0  # tail-free sampling's z; 1 is off
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dynatemp_range: float = 0.0  # entropy-scaled temperature in temperature ± range; 0 is off
    dynatemp_exponent: float = 1.0
    mirostat: MirostatMode = MirostatMode.OFF
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    constraint: Constraint | None = None  # structured output; each engine compiles its own way

    def __post_init__(self) -> None:
        """Refuse sizes past the bounds in `limits`: each becomes work or memory per token."""
        _check_count(self.stop, limits.MAX_STOP_STRINGS, "stop")
        _check_lengths(self.stop, limits.MAX_STOP_LENGTH, "stop")
        _check_count(self.stop_token_ids, limits.MAX_STOP_TOKEN_IDS, "stop_token_ids")
        _check_count(self.banned_token_ids, limits.MAX_BANNED_TOKENS, BANNED_PARAM)
        _check_count(self.logit_bias, limits.MAX_LOGIT_BIAS, "logit_bias")
        _check_biases(self.logit_bias)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > limits.MAX_LOGPROBS:
                raise InvalidRequestError(
                    f"{name} is {value}; at most {limits.MAX_LOGPROBS} are supported", param=name
                )
        if self.penalty_range is not None and self.penalty_range < 0:
            raise InvalidRequestError("penalty_range must not be negative", param="penalty_range")
        for name, low, high in BOUNDED_SAMPLERS:
            _check_bounds(getattr(self, name), low, high, name)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature <= 0.0


BREAKERS_PARAM = "dry_sequence_breakers"
# (field, lowest, highest) of the samplers whose meaning ends at a bound.
BOUNDED_SAMPLERS = (
    ("repetition_penalty_slope", 0.0, 1.0),
    ("top_a", 0.0, 1.0),
    ("tfs", 0.0, 1.0),
    ("dynatemp_range", 0.0, math.inf),
    ("dynatemp_exponent", 0.0, math.inf),
)
BANNED_PARAM = "banned_tokens"  # what clients call it (TabbyAPI, Kobold); ids once tokenized


def _check_count(items: Sized, limit: int, param: str) -> None:
    if len(items) > limit:
        raise InvalidRequestError(
            f"{param} has {len(items)} entries; at most {limit} are accepted", param=param
        )


def _check_lengths(texts: tuple[str, ...], limit: int, param: str) -> None:
    longest = max(map(len, texts), default=0)
    if longest > limit:
        raise InvalidRequestError(
            f"{param} has an entry of {longest} characters; at most {limit} are accepted",
            param=param,
        )


def _check_bounds(value: float, low: float, high: float, param: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequestError(
            f"{param} is {value}; it lies in [{low:g}, {high:g}]", param=param
        )


def _check_biases(biases: Mapping[int, float]) -> None:
    bound = limits.MAX_ABS_LOGIT_BIAS
    for token, bias in biases.items():
        if not (math.isfinite(bias) and -bound <= bias <= bound):
            raise InvalidRequestError(
                f"logit_bias for token {token} is {bias}; biases lie in [-{bound:g}, {bound:g}]",
                param="logit_bias",
            )
