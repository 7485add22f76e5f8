"""Debian's Chromium driven by Playwright for Python (no `playwright install`: no downloads)."""

from __future__ import annotations

import os
import shutil

import pytest
from playwright.sync_api import BrowserContext, Playwright

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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


def chromium_or_skip() -> str:
    """Chromium's path; without it: a failure under CI=true (.ci/run installs it), else a skip."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed, and CI=true needs it (see .ci/run)")
        pytest.skip("chromium is not installed")
    return CHROMIUM


def launch(playwright: Playwright, profile: str) -> BrowserContext:
    """A headless Chromium with a fresh profile in `profile`."""
    return playwright.chromium.launch_persistent_context(
        profile,
        executable_path=chromium_or_skip(),
        headless=True,
        args=FLAGS,
        viewport={"width": 1280, "height": 860},
    )
