"""One real server for the dialect tests: Together's seed key, Kobold open as SillyTavern needs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmserve.app import create_app
from llmserve.config import Settings
from tests.conftest import TEST_SETTINGS
from tests.server import RunningServer, serve

API_KEY = "YOUR_API_KEY"  # the key the Together seed sends
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def dialect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """llmserve on the bundled model with API key YOUR_API_KEY and `kobold_auth: false`."""
    tokens = tmp_path_factory.mktemp("dialects") / "api_tokens.yml"
    settings = Settings(
        api_key=[API_KEY], api_tokens_file=tokens, kobold_auth=False, **TEST_SETTINGS
    )
    with serve(create_app(settings)) as server:
        yield server
