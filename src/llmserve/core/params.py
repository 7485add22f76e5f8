"""Sampling parameters: what every dialect's request is translated into."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum


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
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    mirostat: MirostatMode = MirostatMode.OFF
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    grammar: str | None = None  # GBNF, enforced by llama.cpp's grammar sampler

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature <= 0.0
