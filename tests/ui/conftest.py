"""Real servers on the default model with keys on, and a fresh headless Chromium per test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from playwright.sync_api import BrowserContext, Page, sync_playwright

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.models.defaults import default_model_path
from tests.conftest import TEST_SETTINGS
from tests.lora_file import write_lora
from tests.server import RunningServer, serve
from tests.ui.browser import chromium_or_skip, launch

API_KEY = "ui-browser-api-key"
ADMIN_KEY = "ui-browser-admin-key"


PLAIN_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


def ui_settings(home: Path) -> Settings:
    """Keys on, the default model copied into models_dir as ui-a.gguf, a spare ui-b.gguf.

    Also a LoRA adapter (smol-lora), a chat template (plain) and a sampling preset (cool).
    """
    models = home / "models"
    models.mkdir(exist_ok=True)
    for name in ("ui-a.gguf", "ui-b.gguf"):
        if not (models / name).exists():
            shutil.copy(default_model_path(), models / name)
    write_lora(home / "loras" / "smol-lora.gguf")
    (home / "templates").mkdir(exist_ok=True)
    (home / "templates" / "plain.jinja").write_text(PLAIN_TEMPLATE)
    (home / "presets").mkdir(exist_ok=True)
    (home / "presets" / "cool.yml").write_text("temperature: {override: 0.2}\n")
    tokens = home / "api_tokens.yml"
    tokens.write_text(yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY}))
    return Settings(
        model=str(models / "ui-a.gguf"),
        models_dir=models,
        loras_dir=home / "loras",
        templates_dir=home / "templates",
        sampler_overrides_dir=home / "presets",
        api_tokens_file=tokens,
        **TEST_SETTINGS,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """llmserve on the real default model, keys on."""
    with serve(create_app(ui_settings(tmp_path_factory.mktemp("ui-real")))) as server:
        yield server


@pytest.fixture
def context() -> Iterator[BrowserContext]:
    """A headless Chromium with a fresh user-data dir."""
    chromium_or_skip()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        browser = launch(playwright, profile)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    """A page that fails the test on any CSP violation or uncaught script error."""
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    yield page
    assert not problems, problems


def metric(server: RunningServer, name: str) -> float:
    """The sum of a gauge's samples on /metrics."""
    text = httpx.get(
        server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    ).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )
