"""Checks every engine makes before a request reaches it: token ids, n, context room.

Each raises a 400 naming the field, so a request an engine cannot take is refused before any
engine work, in the same words whichever engine serves it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmserve.core.errors import ContextLengthExceededError, InvalidRequestError
from llmserve.core.request import GenerationRequest
from llmserve.engines.base import ModelInfo


def validate_request(req: GenerationRequest, info: ModelInfo, parallel: int) -> int:
    """Check `req` against the model; return how many tokens it may generate."""
    params = req.params
    prompt = req.prompt_tokens
    if not prompt:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    check_token_ids(prompt, info.vocab_size, "prompt")
    check_token_ids(params.stop_token_ids, info.vocab_size, "stop_token_ids")
    check_token_ids(params.banned_token_ids, info.vocab_size, "banned_token_ids")
    check_token_ids(list(params.logit_bias), info.vocab_size, "logit_bias")
    if not 1 <= params.n <= parallel:
        raise InvalidRequestError(
            f"n must be between 1 and {parallel} (parallel sequences), got {params.n}",
            param="n",
        )
    for name, value in (
        ("max_tokens", params.max_tokens),
        ("logprobs", params.logprobs),
        ("prompt_logprobs", params.prompt_logprobs),
        ("min_tokens", params.min_tokens),
    ):
        if value is not None and value < 0:
            raise InvalidRequestError(f"{name} must not be negative", param=name)
    return generation_room(info.context_length, len(prompt), params.max_tokens)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """400 naming `param` when an id lies outside the vocabulary."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token ids out of the vocabulary (0..{vocab_size - 1}): {bad[:5]}", param=param
        )


def generation_room(ctx_size: int, prompt_tokens: int, max_tokens: int | None) -> int:
    """How many tokens the request may generate; the prompt and the limit must fit.

    A prompt that fills the context by itself is the prompt's fault (`param="prompt"`),
    whatever `max_tokens` says; a prompt that fits but leaves less room than `max_tokens`
    asks for is the limit's (`param="max_tokens"`). Dialects rename both to their fields.
    """
    if prompt_tokens >= ctx_size:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {ctx_size} tokens, but the prompt "
            f"alone has {prompt_tokens} tokens, leaving no room for the completion.",
            param="prompt",
        )
    if max_tokens is None:
        return ctx_size - prompt_tokens
    if prompt_tokens + max_tokens > ctx_size:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {ctx_size} tokens, but "
            f"{prompt_tokens + max_tokens} were requested ({prompt_tokens} in the prompt "
            f"+ {max_tokens} to generate); at most {ctx_size - prompt_tokens} can be "
            "generated after this prompt.",
            param="max_tokens",
        )
    return max_tokens
