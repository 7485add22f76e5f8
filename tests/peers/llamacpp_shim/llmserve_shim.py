"""pytest plugin (`-p llmserve_shim`) that runs llama.cpp's server suite against llmserve.

It replaces the suite's server launcher (`utils.ServerProcess.start`/`stop`) with
`python -m llmserve` on 127.0.0.1, translating the ServerProcess attributes into llmserve
flags and a config.yml: every preset is served by the bundled model (the infill preset by a
copy with FIM tokens), so nothing is downloaded. Loading a model takes llmserve several
seconds, so servers of identical settings are pooled for the session instead of restarted for
every test; all of them are stopped when the session ends.

Environment (set by tests/peers/test_llamacpp_suite.py): LLMSERVE_SHIM_MODEL, the bundled
GGUF; LLMSERVE_SHIM_FIM_MODEL, its FIM copy; LLMSERVE_SHIM_WORK, a scratch folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import utils  # the suite's own module (tools/server/tests/utils.py), on sys.path

POOL_SIZE = 3  # llmserve processes kept alive at once (about 250 MB each)
STOP_SECONDS = 10
DEFAULT_CTX = 2048  # llama-server's n_ctx when a preset sets none: the model's (capped here)
# llama-server's --chat-template names llmserve ships as well (others are passed as files).
BUILTIN_TEMPLATES = {"chatml", "llama3", "llama2", "mistral", "gemma", "phi3", "qwen2"}


@dataclass(frozen=True)
class Launch:
    """What one llmserve process is started with: flags and config.yml text."""

    flags: tuple[str, ...]
    config: str


@dataclass
class Running:
    """A started llmserve process and where it listens."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _names(alias: str | None) -> list[str]:
    """llama-server's `--alias a,b,c`: the id is the first in sorted order (a std::set)."""
    names = sorted({n.strip() for n in (alias or "").split(",") if n.strip()})
    return names or ["tinyllama-2"]


def _model_path(server: Any) -> str:
    repo = f"{server.model_hf_repo or ''} {server.model_alias or ''}"
    key = "LLMSERVE_SHIM_FIM_MODEL" if "infill" in repo else "LLMSERVE_SHIM_MODEL"
    return os.environ[key]


def _preset(server: Any) -> dict[str, Any]:
    """llama-server's sampling flags as a llmserve preset: defaults every request may change."""
    preset: dict[str, Any] = {"temperature": server.temperature, "seed": server.seed}
    if server.n_predict is not None and server.n_predict > 0:
        preset["max_tokens"] = server.n_predict
    return preset


def _template(server: Any) -> str | None:
    if server.chat_template_file:
        return str(Path(server.chat_template_file).resolve())
    return server.chat_template or None


def translate(server: Any, presets_dir: Path) -> Launch:
    """llmserve's flags and config.yml for a ServerProcess's attributes."""
    slots = server.n_slots or 1
    ctx = server.n_ctx or DEFAULT_CTX
    if not server.kv_unified:
        ctx //= slots  # llama-server splits n_ctx across slots; a unified cache gives each all
    names = _names(server.model_alias)
    entry: dict[str, Any] = {
        "id": names[0],
        "aliases": names[1:],
        "path": _model_path(server),
        "preset": "suite",
    }
    template = _template(server)
    if template is not None:
        entry["chat_template"] = template
    config = {"models": [entry], "sampler_overrides_dir": str(presets_dir)}
    flags = ["--ctx-size", str(ctx), "--parallel", str(slots)]
    flags += [
        "--threads",
        str(server.n_threads or 2),
        "--threads-batch",
        str(server.n_threads or 2),
    ]
    if server.n_batch:
        flags += ["--prefill-chunk", str(server.n_batch)]
    if server.kv_unified:
        flags.append("--kv-unified")
    if server.pooling:
        flags += ["--pooling", server.pooling]
    flags += ["--api-key", server.api_key] if server.api_key else ["--disable-auth"]
    if server.debug:
        flags += ["--log-level", "debug"]
    # The preset travels in the config text too, so different sampling is a different server.
    text = json.dumps({**config, "_preset": _preset(server)}, sort_keys=True)
    return Launch(tuple(flags), text)


class Pool:
    """llmserve processes by their launch settings, least recently used first."""

    def __init__(self, work: Path):
        self.work = work
        self.idle: dict[Launch, Running] = {}
        self.busy: dict[int, tuple[Launch, Running]] = {}

    def take(self, launch: Launch, host: str, timeout: float) -> Running:
        """A ready server for `launch`: an idle one, else a new one."""
        running = self.idle.pop(launch, None)
        if running is None or running.process.poll() is not None:
            while len(self.idle) >= POOL_SIZE:
                _terminate(self.idle.pop(next(iter(self.idle))))
            running = self._spawn(launch, host, timeout)
        return running

    def _spawn(self, launch: Launch, host: str, timeout: float) -> Running:
        port = _free_port()
        folder = self.work / f"server-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        data = json.loads(launch.config)
        (folder / "presets").mkdir(exist_ok=True)
        (folder / "presets" / "suite.yml").write_text(json.dumps(data.pop("_preset")))
        data["sampler_overrides_dir"] = str(folder / "presets")
        (folder / "config.yml").write_text(json.dumps(data))  # JSON is YAML
        args = [sys.executable, "-m", "llmserve", "serve", "--config", str(folder / "config.yml")]
        args += ["--host", host, "--port", str(port), "--data-dir", str(folder / "data")]
        args += ["--shutdown-grace", "1", *launch.flags]
        log = folder / "server.log"
        print(f"llmserve shim: starting {' '.join(args)}")
        with log.open("wb") as sink:
            process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
        running = Running(process, port, log)
        _wait_ready(running, timeout)
        return running

    def give_back(self, launch: Launch, running: Running) -> None:
        """Keep a server for the next test that starts the same settings."""
        if running.process.poll() is None:
            self.idle[launch] = running

    def close(self) -> None:
        """Stop every server."""
        for running in [*self.idle.values(), *(r for _, r in self.busy.values())]:
            _terminate(running)
        self.idle.clear()
        self.busy.clear()


def _wait_ready(running: Running, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{running.port}/health"
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            tail = running.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"llmserve exited with {running.process.returncode}:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    _terminate(running)
    raise TimeoutError(f"llmserve did not become ready within {timeout} s")


def _terminate(running: Running) -> None:
    process = running.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_SECONDS)


def _pool() -> Pool:
    pool: Pool | None = getattr(utils, "_llmserve_pool", None)
    if pool is None:
        pool = Pool(Path(os.environ["LLMSERVE_SHIM_WORK"]))
        utils._llmserve_pool = pool  # type: ignore[attr-defined]
    return pool


def _start(self: Any, timeout_seconds: int = utils.DEFAULT_HTTP_TIMEOUT) -> None:
    """ServerProcess.start: an llmserve server for this ServerProcess's settings."""
    pool = _pool()
    launch = translate(self, pool.work)
    host = self.server_host.split(",")[0].strip()  # llmserve listens on one address
    # Loading takes llmserve longer than llama-server on this tiny model: give it room.
    running = pool.take(launch, host, max(timeout_seconds, 120))
    pool.busy[id(self)] = (launch, running)
    self.server_port = running.port
    self.process = running.process
    self.ready = True
    utils.server_instances.add(self)


def _stop(self: Any) -> None:
    """ServerProcess.stop: hand the server back to the pool (the session's end stops it)."""
    utils.server_instances.discard(self)
    pool = _pool()
    taken = pool.busy.pop(id(self), None)
    if taken is not None:
        pool.give_back(*taken)
    self.process = None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # pytest then ends the session cleanly: unconfigure stops servers


def pytest_configure(config: Any) -> None:
    """Patch the suite's launcher before any of its tests run."""
    signal.signal(signal.SIGTERM, _interrupt)
    utils.ServerProcess.start = _start
    utils.ServerProcess.stop = _stop
    utils.ServerPreset.load_all = staticmethod(lambda: None)  # it downloads every preset


def pytest_unconfigure(config: Any) -> None:
    """Leave no server running."""
    pool: Pool | None = getattr(utils, "_llmserve_pool", None)
    if pool is not None:
        pool.close()
