"""Shared fixtures: a real server on the real default model, and an OpenAI SDK client for it.

LLMSERVE_TEST_ENGINE=vllm runs the same servers on the vLLM engine (the bundled model converted
to an HF folder once, cached beside the other test downloads); tests/engines/test_vllm_half.py
runs the named subset of the suite that way in the vLLM venv.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from llmserve.app import create_app
from llmserve.config import Settings
from tests.server import RunningServer, serve

TEST_ENGINE = os.environ.get("LLMSERVE_TEST_ENGINE", "llamacpp")
# Where the vLLM half keeps the bundled model as an HF folder between runs.
CONVERTED_CACHE = Path.home() / ".cache" / "llmserve-tests"
# Small enough to load fast, big enough for every test prompt; greedy tests stay deterministic.
LLAMACPP_SETTINGS: dict[str, Any] = {
    "ctx_size": 2048,
    "parallel": 8,
    "threads": 2,
    "threads_batch": 2,
}
# The same shape on vLLM: eager (torch.compile would add minutes to each start), a small KV.
VLLM_SETTINGS: dict[str, Any] = {
    "engine": "vllm",
    "ctx_size": 2048,
    "parallel": 8,
    "enforce_eager": True,
    "kv_cache_gib": 1,
}
TEST_SETTINGS = VLLM_SETTINGS if TEST_ENGINE == "vllm" else LLAMACPP_SETTINGS
# Prompt tokens a prefix-cache hit may fall short by: vLLM caches whole KV blocks (up to 256
# tokens on its CPU backend); llama.cpp's slots reuse every shared token.
PREFIX_CACHE_SLACK = 256 if TEST_ENGINE == "vllm" else 0
# Tests that only hold on llama.cpp (its samplers, LoRA, embeddings, slots): skipped on vLLM.
llamacpp_only = pytest.mark.skipif(
    TEST_ENGINE != "llamacpp", reason="a llama.cpp engine feature (the vLLM engine lacks it)"
)


def engine_cases(cases: dict[str, Any], llamacpp_ids: set[str]) -> list[Any]:
    """`cases` as parametrize values by id, those in `llamacpp_ids` marked llama.cpp-only.

    A tuple value is several arguments, as parametrize takes them.
    """
    return [
        pytest.param(
            *(value if isinstance(value, tuple) else (value,)),
            id=name,
            marks=[llamacpp_only] if name in llamacpp_ids else [],
        )
        for name, value in cases.items()
    ]


def pytest_configure(config: pytest.Config) -> None:
    """Servers that name no data_dir write their usage database to a temporary folder."""
    if "LLMSERVE_DATA_DIR" not in os.environ:
        os.environ["LLMSERVE_DATA_DIR"] = tempfile.mkdtemp(prefix="llmserve-test-data-")
    if TEST_ENGINE == "vllm" and "model" not in VLLM_SETTINGS:
        from llmserve.engines.vllm.convert import ensure_default_hf_model

        VLLM_SETTINGS["model"] = str(ensure_default_hf_model(CONVERTED_CACHE))


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
