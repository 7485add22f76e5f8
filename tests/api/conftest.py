"""An app on the fake engine, served over real HTTP on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.templates import load_template
from llmserve.models.manager import ModelManager
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    """The engine behind fake_server."""
    return FakeEngine()


@pytest.fixture(scope="module")
def fake_server(fake_engine: FakeEngine) -> Iterator[RunningServer]:
    """llmserve's HTTP layer on the fake engine, served as `fake-model`."""
    settings = Settings(disable_auth=True)
    manager = ModelManager(settings)
    manager.register(fake_engine, ["fake-model", "fake-alias"], load_template(None, "gguf"))
    with serve(create_app(settings, manager)) as server:
        yield server
