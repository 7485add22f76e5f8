"""bench/run_side_by_side.py's two vLLM servers: their commands, environment and checks.

Nothing is started: the specs are built from parsed flags and their templates rendered.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """run_side_by_side, imported the way it runs (bench/ on sys.path, for `import load`)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("run_side_by_side")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def hf_model(tmp_path: Path) -> Path:
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def commands(bench: ModuleType, argv: list[str]) -> dict[str, list[str]]:
    """Server name → its rendered command (port 4321, key KEY)."""
    args = bench.parse_args(argv)
    values = bench.placeholders(args, Path("/m.gguf"), 4321, "KEY")
    return {spec.name: bench.render(spec.template, values) for spec in bench.server_specs(args)}


def test_commands_and_extra_words(bench: ModuleType, hf_model: Path) -> None:
    argv = [
        "--no-llmserve", "--llmserve-vllm", "--vllm", "--vllm-python", sys.executable,
        "--hf-model", str(hf_model), "--concurrency", "1", "8", "--ctx", "1024",
        "--vllm-extra=--enforce-eager", "--vllm-extra", "--dtype {bfloat16}",
    ]  # fmt: skip
    found = commands(bench, argv)
    assert list(found) == ["llmserve-vllm", "vllm"]
    py, model = str(Path(sys.executable).absolute()), str(hf_model)
    extra = ["--enforce-eager", "--dtype", "{bfloat16}"]  # literal: braces are not placeholders
    assert found["llmserve-vllm"] == [
        py, "-m", "llmserve", "serve", "--host", "127.0.0.1", "--port", "4321",
        "--engine", "vllm", "--model", model, "--parallel", "8", "--ctx-size", "1024",
        "--api-key", "KEY", *extra,
    ]  # fmt: skip
    assert found["vllm"] == [
        py, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
        "--port", "4321", "--model", model, "--served-model-name", "SmolLM2-135M-Instruct",
        "--max-num-seqs", "8", "--max-model-len", "1024", "--api-key", "KEY", *extra,
    ]  # fmt: skip


def test_environment_timeout_model_name_baseline(bench: ModuleType, hf_model: Path) -> None:
    argv = ["--vllm", "--vllm-python", sys.executable, "--hf-model", str(hf_model)]
    args = bench.parse_args([*argv, "--vllm-kv-gib", "3"])
    llmserve, vllm = bench.server_specs(args)
    assert (llmserve.name, dict(llmserve.env), llmserve.startup_timeout) == ("llmserve", {}, None)
    assert dict(vllm.env) == {
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "VLLM_CPU_KVCACHE_SPACE": "3",
    }
    assert vllm.startup_timeout == 600.0
    assert vllm.model_name == "SmolLM2-135M-Instruct"  # what llmserve calls the folder
    assert args.baseline == "vllm"
    assert "--kv-cache-gib" not in vllm.template  # vLLM's own server reads the variable only
    llama = bench.parse_args([*argv, "--llama-server", "/bin/true"])
    assert llama.baseline == "llama-server"


def test_kv_size_reaches_llmserve(bench: ModuleType, hf_model: Path) -> None:
    argv = ["--no-llmserve", "--llmserve-vllm", "--vllm-python", sys.executable]
    argv += ["--hf-model", str(hf_model)]
    assert "--kv-cache-gib" not in commands(bench, argv)["llmserve-vllm"]  # its default is 2
    command = commands(bench, [*argv, "--vllm-kv-gib", "4", "--vllm-extra=--enforce-eager"])
    assert command["llmserve-vllm"][-3:] == ["--kv-cache-gib", "4", "--enforce-eager"]


def test_other_servers_unchanged(bench: ModuleType) -> None:
    args = bench.parse_args(["--llama-cpp-python"])
    assert [(s.name, s.template, dict(s.env)) for s in bench.server_specs(args)] == [
        ("llmserve", bench.LLMSERVE_TEMPLATE, {}),
        ("llama-cpp-python", bench.LLAMA_CPP_PYTHON_TEMPLATE, {}),
    ]
    assert args.baseline is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vllm-python", "/no/such/python", "--hf-model", "."], "no such file"),
        (["--vllm-python", sys.executable], "needs --hf-model"),
        (["--vllm-python", sys.executable, "--hf-model", "/"], "no config.json"),
    ],
)
def test_missing_paths_fail_clearly(bench: ModuleType, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        bench.server_specs(bench.parse_args(["--vllm", *argv]))


def test_shown_command_puts_environment_first(bench: ModuleType) -> None:
    run = bench.ServerRun("vllm", ["python", "-m", "x"], "log", env={"A": "1"})
    assert bench.shown_command(run) == "A=1 python -m x"


BURN_THEN_WAIT = "sum(range(30_000_000)); print('burnt', flush=True); import time; time.sleep(60)"


def test_server_cpu_counts_the_processes_it_started(bench: ModuleType) -> None:
    """vLLM's engine core runs in a child: its CPU time is the server's too."""
    load = sys.modules["load"]
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BURN_THEN_WAIT!r}])"
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "burnt"
        (kid,) = load.child_pids(proc.pid)
        whole, own_kid = load.process_cpu_s(proc.pid), load.process_cpu_s(kid)
        assert whole is not None and own_kid is not None and own_kid > 0.1
        assert whole >= own_kid
    finally:
        for pid in [*load.child_pids(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
