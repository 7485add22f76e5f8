"""A deterministic in-process engine for unit tests of the HTTP layer (never the only test)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

from llmserve.core.errors import ContextLengthExceededError, EngineError, InvalidRequestError
from llmserve.core.request import (
    Delta,
    FinishReason,
    GenerationRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from llmserve.core.stops import StopMatcher
from llmserve.engines.base import AdapterSpec, EngineStats, ModelInfo

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
CONTEXT = 256


class FakeEngine:
    """Tokens are characters (id = code point); output cycles through WORDS, one word a token."""

    def __init__(self) -> None:
        self.info = ModelInfo(
            id="fake",
            path="/nonexistent/fake.gguf",
            context_length=CONTEXT,
            train_context_length=CONTEXT,
            vocab_size=0x110000,
            bos_token_id=None,
            eos_token_id=None,
            bos_token="",
            eos_token="",
            eog_token_ids=frozenset(),
            chat_template=None,
            add_bos=False,
            n_params=0,
            size_bytes=0,
            description="fake engine",
        )
        self.aborted: list[str] = []
        self.adapters: list[AdapterSpec] = []

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """One token per character."""
        return [ord(c) for c in text]

    def detokenize(self, ids: list[int]) -> str:
        """Characters back; ids that are no code point are refused, as a real vocabulary's."""
        if any(not 0 <= i < self.info.vocab_size for i in ids):
            raise InvalidRequestError("token id out of range", param="tokens")
        return "".join(chr(i) for i in ids)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        """Emit WORDS in turn, honouring max_tokens, stop strings, n and logprobs."""
        p = req.params
        if any(not 0 <= t < self.info.vocab_size for t in req.prompt_tokens):
            raise InvalidRequestError("token id out of range", param="prompt")
        prompt = self.detokenize(req.prompt_tokens)
        if prompt.startswith("fail-now"):
            raise EngineError("llama_decode failed (injected)")
        budget = CONTEXT - len(req.prompt_tokens)
        max_tokens = p.max_tokens if p.max_tokens is not None else min(budget, 8)
        if max_tokens < 1 or len(req.prompt_tokens) + max_tokens > CONTEXT:
            raise ContextLengthExceededError(
                f"prompt {len(req.prompt_tokens)} + max_tokens {max_tokens} > {CONTEXT}",
                param="max_tokens",
            )
        try:
            completion = 0
            for index in range(p.n):
                async for delta in self._choice(req, index, max_tokens):
                    if prompt.startswith("fail-later") and delta.token_ids[0] == 1:
                        raise EngineError("llama_decode failed mid-stream (injected)")
                    completion += len(delta.token_ids)
                    last = index == p.n - 1 and delta.finish_reason is not None
                    usage = Usage(len(req.prompt_tokens), completion) if last else None
                    yield dataclasses.replace(delta, usage=usage)
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(req.request_id)
            raise

    async def _choice(
        self, req: GenerationRequest, index: int, max_tokens: int
    ) -> AsyncIterator[Delta]:
        stops = StopMatcher(req.params.stop)
        for i in range(max_tokens):
            await asyncio.sleep(0)
            word = WORDS[(i + index) % len(WORDS)] + " "
            text, stop = stops.feed(word)
            logprobs = self._logprobs(req, i, word)
            if stop is not None:
                yield Delta(index, text, (i,), logprobs, None, FinishReason.STOP, stop)
                return
            final = FinishReason.LENGTH if i == max_tokens - 1 else None
            if final is not None:
                text += stops.flush()
            yield Delta(index, text, (i,), logprobs, None, final)

    @staticmethod
    def _logprobs(req: GenerationRequest, i: int, word: str) -> tuple[TokenLogprob, ...]:
        if req.params.logprobs is None:
            return ()
        top = tuple(TopLogprob(i, word, -0.5) for _ in range(req.params.logprobs))
        return (TokenLogprob(i, word, -0.5, top),)

    def abort(self, request_id: str) -> None:
        """Record the abort."""
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        """Always idle and alive."""
        return EngineStats(0, 0, 1, 1, 0, CONTEXT, 0, 0, 0, 0, True)

    async def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        """Remember the adapters (the fake has no weights to change)."""
        self.adapters = list(adapters)

    async def embed(
        self, prompts: Sequence[list[int]], normalize: bool = True
    ) -> list[list[float]]:
        """Counts of vowels, other letters, digits and the rest (ids are code points)."""
        if any(not 0 <= i < self.info.vocab_size for prompt in prompts for i in prompt):
            raise InvalidRequestError("token id out of range", param="prompts")
        vectors = [self._counts(self.detokenize(list(prompt))) for prompt in prompts]
        if not normalize:
            return vectors
        return [[x / (sum(y * y for y in v) ** 0.5 or 1.0) for x in v] for v in vectors]

    @staticmethod
    def _counts(text: str) -> list[float]:
        vowels = sum(c in "aeiouAEIOU" for c in text)
        letters = sum(c.isalpha() for c in text) - vowels
        digits = sum(c.isdigit() for c in text)
        rest = len(text) - vowels - letters - digits
        return [float(vowels), float(letters), float(digits), float(rest)]

    async def close(self) -> None:
        """Nothing to free."""
