"""The real llama.cpp engine on the bundled SmolLM2 model, loaded once for the engine tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.engine.helpers import Driver, small_engine


@pytest.fixture(scope="session")
def llm() -> Iterator[Driver]:
    """A driver over one engine shared by every engine test (8 slots of 1024 tokens)."""
    engine = small_engine()
    yield Driver(engine)
    asyncio.run(engine.close())
