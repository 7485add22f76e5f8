"""Item 17: deploy/llmserve.service lets the server write what it writes under ProtectSystem."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from llmserve.cli import _overrides, _parse
from llmserve.config import Settings, default_data_dir, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "llmserve.service"
# systemd's *Directory= settings: a relative name under these roots, created for User.
DIRECTORY_ROOTS = {
    "StateDirectory": "/var/lib",
    "CacheDirectory": "/var/cache",
    "LogsDirectory": "/var/log",
    "RuntimeDirectory": "/run",
    "ConfigurationDirectory": "/etc",
}


def service() -> dict[str, list[str]]:
    """The [Service] section, each setting with all its values (settings may repeat)."""
    section = ""
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def managed_directories(unit: dict[str, list[str]], kind: str) -> list[PurePosixPath]:
    root = PurePosixPath(DIRECTORY_ROOTS[kind])
    return [root / name for value in unit.get(kind, []) for name in value.split()]


def writable_roots(unit: dict[str, list[str]]) -> list[PurePosixPath]:
    """What ProtectSystem=strict leaves writable: ReadWritePaths and the managed directories."""
    roots = [
        PurePosixPath(p.lstrip("-")) for v in unit.get("ReadWritePaths", []) for p in v.split()
    ]
    for kind in DIRECTORY_ROOTS.keys() - {"ConfigurationDirectory"}:
        roots += managed_directories(unit, kind)
    if unit.get("PrivateTmp", ["false"])[-1] in ("true", "yes"):
        roots.append(PurePosixPath("/tmp"))
    return roots


def server_settings(unit: dict[str, list[str]]) -> tuple[Settings, Path]:
    """The settings ExecStart gives, with the shipped config.yml standing in for its --config."""
    argv = shlex.split(unit["ExecStart"][-1])[1:]
    args = _parse(argv)
    assert args.config is not None, "the unit names its config file"
    settings = load_settings(DEPLOY / "config.yml", **_overrides(args))
    if settings.data_dir == default_data_dir(DEPLOY / "config.yml"):
        settings.data_dir = default_data_dir(args.config)
    return settings, args.config


def test_every_written_path_is_writable() -> None:
    unit = service()
    assert unit["ProtectSystem"] == ["strict"]
    settings, _ = server_settings(unit)
    work = PurePosixPath(unit["WorkingDirectory"][-1])
    roots = writable_roots(unit)
    written = settings.written_paths()
    assert written, "the keyed server writes api_tokens.yml"
    for path in written:
        absolute = work / path
        # The file and its folder: api_tokens.yml is written beside itself, then linked.
        assert any(absolute.parent.is_relative_to(root) for root in roots), (absolute, roots)


def test_directories_exist_before_the_start() -> None:
    unit = service()
    created = [d for kind in DIRECTORY_ROOTS for d in managed_directories(unit, kind)]
    # A ReadWritePaths entry that does not exist fails the namespace set-up (unless "-"-prefixed).
    for value in unit.get("ReadWritePaths", []):
        for path in value.split():
            assert path.startswith("-") or PurePosixPath(path) in created, path
    work = PurePosixPath(unit["WorkingDirectory"][-1])
    assert work in created
    _, config = server_settings(unit)
    assert any(PurePosixPath(config).is_relative_to(d) for d in created)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's program exists: point it at this venv's llmserve.
    program = Path(sys.executable).parent / "llmserve"
    text = UNIT.read_text().replace("/opt/llmserve/.venv/bin/llmserve", str(program))
    unit = tmp_path / "llmserve.service"
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "llmserve.service" not in result.stdout + result.stderr
