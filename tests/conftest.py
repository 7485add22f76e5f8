"""Shared fixtures: a real server on the real default model, and an OpenAI SDK client for it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import openai
import pytest

from llmserve.app import create_app
from llmserve.config import Settings
from tests.server import RunningServer, serve

# Small enough to load fast, big enough for every test prompt; greedy tests stay deterministic.
TEST_SETTINGS = {"ctx_size": 2048, "parallel": 8, "threads": 2, "threads_batch": 2}


def pytest_configure(config: pytest.Config) -> None:
    """Servers that name no data_dir write their usage database to a temporary folder."""
    if "LLMSERVE_DATA_DIR" not in os.environ:
        os.environ["LLMSERVE_DATA_DIR"] = tempfile.mkdtemp(prefix="llmserve-test-data-")


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """llmserve on the bundled SmolLM2 model, auth disabled."""
    tokens = tmp_path_factory.mktemp("real") / "api_tokens.yml"
    settings = Settings(disable_auth=True, api_tokens_file=tokens, **TEST_SETTINGS)
    with serve(create_app(settings)) as server:
        yield server


@pytest.fixture(scope="session")
def client(real_server: RunningServer) -> openai.OpenAI:
    """A sync OpenAI SDK client pointed at the real server."""
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused", max_retries=0)
