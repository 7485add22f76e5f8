"""Property-based fuzzing of llmserve's own OpenAPI schema: no input may cause a 5xx.

Runs on the fake engine (the HTTP layer's parsers and validators), without the admin routes
that change state, over real HTTP on 127.0.0.1; examples are bounded. The real-engine pass is
test_schemathesis_real.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.templates import load_template
from llmserve.models.manager import ModelManager
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve


def fake_app(tmp: Path) -> object:
    config = Settings(disable_auth=True, admin_api=False, api_tokens_file=tmp / "t.yml")
    manager = ModelManager(config)
    manager.register(FakeEngine(), ["fake-model"], load_template(None, "gguf"))
    return create_app(config, manager)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serve(fake_app(tmp_path_factory.mktemp("fuzz"))) as server:  # type: ignore[arg-type]
        yield server


def test_every_post_route_declares_its_body(fuzz_server: RunningServer) -> None:
    spec = httpx.get(fuzz_server.url + "/openapi.json").json()
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert "/v1/chat/completions" in posts and "/v1/completions" in posts
    for path, operation in posts.items():
        if path in ("/v1/model/unload",):
            continue
        assert "requestBody" in operation, path


def test_no_input_causes_a_server_error(fuzz_server: RunningServer) -> None:
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 10
    failures: list[str] = []
    for operation in operations:

        @given(operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(timeout=10)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.path}: {response.status_code} {response.text}"
                )
            if response.status_code >= 400 and not case.path.startswith("/api/"):
                # FastAPI's own {"detail": ...} must never leak out of an OpenAI-style route.
                assert "error" in response.json(), (case.path, response.text)

        fuzz()
    assert not failures, failures[:5]
