"""Engines around engines: what every served engine gets, whichever kind it is.

The manager serves each engine as `serving_engine` builds it: the capability check outermost
(a refused request reaches no engine), then metrics, then the time limit.
`EngineDecorator` is the base: it passes every call through, subclasses change what they add to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

from llmserve.core.errors import InvalidRequestError
from llmserve.core.params import SamplingParams
from llmserve.core.request import Delta, FinishReason, GenerationRequest
from llmserve.engines.base import AdapterSpec, Capabilities, Engine, EngineStats, ModelInfo
from llmserve.observability import Metrics, RequestRecord, current_request


class EngineDecorator:
    """Passes every Engine call to `inner`; subclasses override what they add to."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.info: ModelInfo = inner.info

    def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        """Delegated."""
        return self.inner.generate(req)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Delegated."""
        return self.inner.tokenize(text, add_special)

    def detokenize(self, ids: list[int]) -> str:
        """Delegated."""
        return self.inner.detokenize(ids)

    def abort(self, request_id: str) -> None:
        """Delegated."""
        self.inner.abort(request_id)

    def stats(self) -> EngineStats:
        """Delegated."""
        return self.inner.stats()

    async def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        """Delegated."""
        await self.inner.set_adapters(adapters)

    async def embed(
        self, prompts: Sequence[list[int]], normalize: bool = True
    ) -> list[list[float]]:
        """Delegated."""
        return await self.inner.embed(prompts, normalize)

    async def close(self) -> None:
        """Delegated."""
        await self.inner.close()


def serving_engine(
    engine: Engine, metrics: Metrics | None, request_timeout: float | None
) -> Engine:
    """`engine` as requests see it: capability check, time limit, metrics."""
    if request_timeout is not None:
        engine = DeadlineEngine(engine, request_timeout)
    if metrics is not None:
        engine = InstrumentedEngine(engine, metrics)
    return CapabilityCheck(engine)


# ---- capabilities -----------------------------------------------------------------------------

SAMPLING_DEFAULTS = SamplingParams()


def unsupported_fields(params: SamplingParams, capabilities: Capabilities) -> list[str]:
    """The fields of `params` the engine cannot honour, in declaration order."""
    refused: list[str] = []
    constraint = params.constraint
    if constraint is not None and constraint.kind not in capabilities.constraints:
        refused.append(constraint.param)
    if capabilities.samplers is not None:
        for spec in dataclasses.fields(SamplingParams):
            name = spec.name
            if name == "constraint" or name in capabilities.samplers:
                continue
            if getattr(params, name) != getattr(SAMPLING_DEFAULTS, name):
                refused.append(name)
    return refused


class CapabilityCheck(EngineDecorator):
    """Refuses, before any engine work, what the engine declares it cannot do (400 by name)."""

    def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        """The inner stream, once the request asks only for what the engine can do."""
        capabilities = self.info.capabilities
        refused = unsupported_fields(req.params, capabilities)
        if refused:
            raise InvalidRequestError(
                f"{refused[0]} is not supported by the engine serving {self.info.id}",
                param=refused[0],
                code="unsupported_parameter",
            )
        return self.inner.generate(req)

    async def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        """Delegated, unless the engine has no adapters and some are asked for."""
        if adapters and not self.info.capabilities.adapters:
            raise InvalidRequestError(
                f"the engine serving {self.info.id} does not take LoRA adapters",
                param="loras",
                code="unsupported_parameter",
            )
        await self.inner.set_adapters(adapters)

    async def embed(
        self, prompts: Sequence[list[int]], normalize: bool = True
    ) -> list[list[float]]:
        """Delegated, unless the engine declares it has no embeddings."""
        if not self.info.capabilities.embeddings:
            raise InvalidRequestError(
                f"the engine serving {self.info.id} does not compute embeddings",
                param="model",
                code="unsupported_parameter",
            )
        return await self.inner.embed(prompts, normalize)


# ---- time limit -------------------------------------------------------------------------------


class DeadlineEngine(EngineDecorator):
    """Aborts generations that run longer than `seconds`; they finish with LENGTH, not ABORT."""

    def __init__(self, inner: Engine, seconds: float):
        super().__init__(inner)
        self.seconds = seconds

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        """The inner stream, aborted at the deadline; its slot is freed at the next step."""
        loop = asyncio.get_running_loop()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self.inner.abort(req.request_id)

        timer = loop.call_later(self.seconds, expire)
        stream = self.inner.generate(req)
        try:
            async for delta in stream:
                if expired and delta.finish_reason is FinishReason.ABORT:
                    delta = dataclasses.replace(
                        delta, finish_reason=FinishReason.LENGTH, stop_reason="timeout"
                    )
                yield delta
        finally:
            timer.cancel()
            await stream.aclose()  # type: ignore[attr-defined]


# ---- metrics ----------------------------------------------------------------------------------


class InstrumentedEngine(EngineDecorator):
    """An Engine that reports TTFT, inter-token latency and tokens of every generation."""

    def __init__(self, inner: Engine, metrics: Metrics):
        super().__init__(inner)
        self.metrics = metrics

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        """The inner stream, timed."""
        start = last = time.perf_counter()
        first = True
        record = current_request.get()
        stream = self.inner.generate(req)
        try:
            async for delta in stream:
                now = time.perf_counter()
                if first:
                    self.metrics.ttft.observe(now - start)
                    if record is not None and record.ttft_ms is None:
                        record.ttft_ms = round((now - start) * 1000, 1)
                    first = False
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                if delta.usage is not None:
                    self._count(delta, record)
                yield delta
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def embed(
        self, prompts: Sequence[list[int]], normalize: bool = True
    ) -> list[list[float]]:
        """The inner vectors; their tokens count as prompt tokens."""
        vectors = await self.inner.embed(prompts, normalize)
        tokens = sum(len(prompt) for prompt in prompts)
        self.metrics.tokens.labels("prompt").inc(tokens)
        record = current_request.get()
        if record is not None:
            record.model = self.info.id
            record.prompt_tokens += tokens
        return vectors

    def _count(self, delta: Delta, record: RequestRecord | None) -> None:
        usage = delta.usage
        assert usage is not None
        self.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(usage.completion_tokens)
        self.metrics.tokens.labels("cached").inc(usage.cached_tokens)
        if record is not None:
            record.model = self.info.id
            record.prompt_tokens += usage.prompt_tokens
            record.completion_tokens += usage.completion_tokens
            record.cached_tokens += usage.cached_tokens
