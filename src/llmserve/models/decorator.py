"""A base for engines that wrap another engine and change only part of its behaviour."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from llmserve.core.request import Delta, GenerationRequest
from llmserve.engines.base import AdapterSpec, Engine, EngineStats, ModelInfo


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

    async def close(self) -> None:
        """Delegated."""
        await self.inner.close()
