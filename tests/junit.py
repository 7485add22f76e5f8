"""Per-test outcomes of a pytest run in a subprocess, from its junit XML report."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Outcome:
    """One test of a run and how it ended."""

    test_id: str  # `module.py::name[params]`
    outcome: str  # passed, failed, error, skipped
    message: str


def parse_junit(report: Path) -> list[Outcome]:
    """Per-test outcomes from pytest's junit XML."""
    outcomes = []
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").rpartition(".")[2]
        test_id = f"{module}.py::{case.get('name')}"
        kind, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                kind = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "")[:300]
        outcomes.append(Outcome(test_id, kind, message))
    return outcomes
