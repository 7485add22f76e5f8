"""Stands in for the `wget` package the suite imports: llmserve's runs never download."""

from __future__ import annotations


def download(url: str, out: str | None = None) -> str:
    """Refuse: the shim serves the bundled model; nothing is fetched from the network."""
    raise RuntimeError(f"the llmserve shim downloads nothing (asked for {url})")
