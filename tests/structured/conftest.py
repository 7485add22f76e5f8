"""Fixtures of the structured-output tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.structured.oracle import GrammarOracle


@pytest.fixture(scope="session")
def oracle() -> Iterator[GrammarOracle]:
    """Answers "does this grammar accept this text" with llama.cpp's own grammar sampler."""
    found = GrammarOracle()
    yield found
    found.close()
