"""A per-request time limit: past it a generation ends like one that ran out of tokens."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from llmserve.core.request import Delta, FinishReason, GenerationRequest
from llmserve.engines.base import Engine
from llmserve.models.decorator import EngineDecorator


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
