"""Screenshots of the web UI for the README: `python docs/screenshots.py [--out docs]`.

Starts llmserve on the bundled default model (keys on, a temporary home, 127.0.0.1 only),
drives Debian's Chromium through Playwright, and saves ui-playground.png, ui-admin.png and
ui-keys.png.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
import yaml
from playwright.sync_api import Page, expect, sync_playwright

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.models.defaults import default_model_path

ADMIN_KEY = "screenshot-admin-key"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "Write a short Python function that adds two numbers, with a comment."


def settings_in(home: Path) -> Settings:
    """Keys on; the default model and a spare copy in models_dir."""
    models = home / "models"
    models.mkdir()
    shutil.copy(default_model_path(), models / "smollm2-135m.gguf")
    shutil.copy(default_model_path(), models / "smollm2-spare.gguf")
    tokens = home / "api_tokens.yml"
    tokens.write_text(yaml.safe_dump({"api_key": "screenshot-api-key", "admin_key": ADMIN_KEY}))
    return Settings(
        model=str(models / "smollm2-135m.gguf"),
        models_dir=models,
        api_tokens_file=tokens,
        data_dir=home,  # the usage database too stays in the temporary home
        ctx_size=2048,
        parallel=4,
    )


@contextmanager
def running(settings: Settings) -> Iterator[str]:
    """The server's base URL while the block runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def shoot(page: Page, url: str, out: Path) -> None:
    """Chat once, screenshot the playground, then the admin console."""
    page.goto(url + "/ui")
    page.fill("#key-input", ADMIN_KEY)
    page.click("#key-save")
    expect(page.locator("#tab-admin")).to_be_visible()
    page.fill("#sampler-max_tokens", "120")
    page.fill("#sampler-temperature", "0")
    page.locator("details", has_text="System prompt").locator("summary").click()
    page.fill("#system-prompt", "You are a concise coding assistant.")
    page.fill("#chat-input", PROMPT)
    page.click("#send")
    expect(page.locator(".msg.assistant[data-state=done]")).to_have_count(1, timeout=180_000)
    page.screenshot(path=str(out / "ui-playground.png"))
    page.click("#tab-admin")
    expect(page.locator("#model-table tr[data-model]")).not_to_have_count(0)
    traffic = threading.Thread(target=chat_traffic, args=(url,))
    traffic.start()  # some load, so the charts have something to draw
    page.wait_for_timeout(12_000)
    page.screenshot(path=str(out / "ui-admin.png"), full_page=True)
    traffic.join()
    shoot_keys(page, out)


def shoot_keys(page: Page, out: Path) -> None:
    """Create a key in the Keys tab (shown once) and screenshot the tab with the usage so far."""
    page.click("#tab-keys")
    page.fill("#new-name", "alice-laptop")
    page.fill("#new-owner", "alice@example.org")
    page.fill("#new-expires-in", "720h")
    page.fill("#new-rpm", "60")
    page.fill("#new-quota-tokens", "100000")
    page.click("#new-create")
    expect(page.locator("#new-key")).to_be_visible()
    page.uncheck("#group-day")
    for _ in range(100):  # usage records are written off the request's path
        page.click("#usage-refresh")
        page.wait_for_timeout(200)
        if page.locator("#usage-table tbody tr").count():
            break
    page.screenshot(path=str(out / "ui-keys.png"), full_page=True)


def chat_traffic(url: str, requests: int = 2) -> None:
    """A few streamed chats, one after another."""
    body = {
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 48,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for _ in range(requests):
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=300
        ) as response:
            for _line in response.iter_lines():
                pass


def main() -> int:
    """Make the screenshots; 2 when no Chromium is installed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as profile:
        settings = settings_in(Path(home))
        with running(settings) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=chromium,
                headless=True,
                args=FLAGS,
                viewport={"width": 1280, "height": 820},
            )
            try:
                shoot(browser.new_page(), url, args.out)
            finally:
                browser.close()
    print(f"saved ui-playground.png, ui-admin.png and ui-keys.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
