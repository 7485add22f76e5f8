"""What flows between the API layer and an engine: requests in, deltas out."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from llmserve.core.params import SamplingParams


class FinishReason(StrEnum):
    """Why a sequence ended, in OpenAI's words; dialects translate."""

    STOP = "stop"  # EOS, a stop string or a stop token
    LENGTH = "length"  # max_tokens or the context is full
    ABORT = "abort"  # cancelled by the client, an admin or shutdown


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at a position with its log-probability."""

    token_id: int
    token: str
    logprob: float
    bytes: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token at a position, its log-probability and the best alternatives."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    bytes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token accounting for one request (all its choices)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized prompt and how to continue it; `n` choices share the prompt's prefill."""

    request_id: str
    prompt_tokens: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Delta:
    """New output of one choice since its previous delta.

    Text is final: stop strings are already cut out and partial matches held back.
    The last delta of a choice carries `finish_reason`; the very last delta of the request
    (after every choice finished) also carries `usage`.
    """

    index: int = 0
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # first delta only
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    usage: Usage | None = None
