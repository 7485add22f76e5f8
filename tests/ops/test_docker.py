"""Issue 17: the Dockerfile, compose.yaml and the proof script, checked without building."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from llmserve.cli import exposure_problem
from llmserve.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / "deploy" / "compose.env.example"
PROOF = ROOT / "deploy" / "docker-proof.sh"
SECRET_NAMES = re.compile(r"(API_KEY|ADMIN_KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)


@dataclass
class Stage:
    """One FROM ... AS name section of the Dockerfile, its instructions in order."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [value for key, value in self.instructions if key == keyword]

    def env(self) -> dict[str, str]:
        """Every ENV of this stage (the KEY=VALUE form), later ones winning."""
        result: dict[str, str] = {}
        for value in self.values("ENV"):
            for item in shlex.split(value):
                key, _, setting = item.partition("=")
                result[key] = setting
        return result


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions (keyword, rest), continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            result.append((keyword.upper(), rest.strip()))
            pending = ""
    return result


def parse_dockerfile() -> tuple[list[tuple[str, str]], dict[str, Stage]]:
    """The instructions before the first FROM (global ARGs) and the stages by name."""
    preamble: list[tuple[str, str]] = []
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            current = Stage(base.strip(), name.strip())
            stages[current.name] = current
        elif current is None:
            preamble.append((keyword, rest))
        else:
            current.instructions.append((keyword, rest))
    return preamble, stages


def global_args() -> dict[str, str]:
    preamble, _ = parse_dockerfile()
    return dict(rest.partition("=")[::2] for key, rest in preamble if key == "ARG")


def served_stages() -> list[Stage]:
    """The stages that run llmserve: the CPU runtime and the CUDA variant."""
    _, stages = parse_dockerfile()
    return [stages["runtime"], stages["cuda"]]


def compose_service() -> dict[str, object]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert list(services) == ["llmserve"]
    service: dict[str, object] = services["llmserve"]
    return service


def env_file_settings() -> dict[str, str]:
    """The uncommented KEY=VALUE lines of the example env file."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def seconds(duration: str) -> float:
    """A compose duration (45s, 2m, 1m30s, 1h) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"not a duration: {duration!r}"
    hours, minutes, secs = (float(p) if p else 0.0 for p in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def test_base_images_are_args_with_official_default() -> None:
    args = global_args()
    assert args["BASE"].startswith("python:3.11-slim")
    assert args["CUDA_BASE"].startswith("nvidia/cuda:")
    _, stages = parse_dockerfile()
    assert stages["builder"].base == stages["runtime"].base == "${BASE}"
    assert stages["cuda"].base == "${CUDA_BASE}"


def test_python_comes_from_apt_when_the_base_has_none() -> None:
    _, stages = parse_dockerfile()
    for stage in (stages["builder"], stages["runtime"]):
        run = " ".join(stage.values("RUN"))
        assert "command -v python3" in run and "python3" in run.split("||", 1)[1], stage.name
    assert "python3-venv" in " ".join(stages["builder"].values("RUN"))


def test_llama_cpp_is_built_portable_at_the_pinned_version() -> None:
    _, stages = parse_dockerfile()
    builder = dict(arg.partition("=")[::2] for arg in stages["builder"].values("ARG"))
    assert "-DGGML_NATIVE=OFF" in builder["LLAMA_CPP_CMAKE_ARGS"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = [d for d in deps if d.startswith("llama-cpp-python==")]
    assert pinned == [f"llama-cpp-python=={builder['LLAMA_CPP_PYTHON_VERSION']}"]
    run = " ".join(stages["builder"].values("RUN"))
    assert 'CMAKE_ARGS="$LLAMA_CPP_CMAKE_ARGS"' in run and "--no-binary llama-cpp-python" in run


def test_runtime_copies_the_venv_and_has_curl() -> None:
    _, stages = parse_dockerfile()
    runtime = stages["runtime"]
    assert "--from=builder /opt/llmserve /opt/llmserve" in runtime.values("COPY")
    assert re.search(r"\bcurl\b", " ".join(runtime.values("RUN")))
    assert not any("build-essential" in run for run in runtime.values("RUN"))


@pytest.mark.parametrize("stage", served_stages(), ids=lambda s: s.name)
def test_runs_as_a_non_root_user(stage: Stage) -> None:
    users = stage.values("USER")
    assert users, "no USER: the server would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    # Nothing after the last USER switches back.
    keywords = [key for key, _ in stage.instructions]
    assert "RUN" not in keywords[len(keywords) - keywords[::-1].index("USER") :]


@pytest.mark.parametrize("stage", served_stages(), ids=lambda s: s.name)
def test_healthcheck_stop_signal_volumes_port(stage: Stage) -> None:
    (health,) = stage.values("HEALTHCHECK")
    assert "curl" in health and "/health" in health and "--start-period=" in health
    assert "127.0.0.1:${LLMSERVE_PORT}/health" in health
    assert stage.values("STOPSIGNAL") == ["SIGTERM"]
    env = stage.env()
    assert env["LLMSERVE_DATA_DIR"] == "/data" and env["LLMSERVE_MODELS_DIR"] == "/models"
    assert stage.values("VOLUME") == ['["/models", "/data"]']
    assert stage.values("EXPOSE") == [env["LLMSERVE_PORT"]]
    assert stage.values("ENTRYPOINT") == ['["llmserve"]']


@pytest.mark.parametrize("stage", served_stages(), ids=lambda s: s.name)
def test_every_llmserve_variable_is_a_setting(stage: Stage) -> None:
    names = [n for n in stage.env() if n.startswith("LLMSERVE_")]
    assert names
    service = compose_service()
    names += [n for n in dict(service.get("environment") or {}) if n.startswith("LLMSERVE_")]
    names += [n for n in env_file_settings() if n.startswith("LLMSERVE_")]
    commented = re.findall(r"^# *(LLMSERVE_[A-Z_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE)
    commented += re.findall(r"(LLMSERVE_[A-Z_]+):", COMPOSE.read_text())
    unknown = {n for n in names + commented if n[9:].lower() not in Settings.model_fields}
    assert not unknown


def test_image_settings_are_valid_and_safe_on_all_addresses() -> None:
    env = {k[9:].lower(): v for k, v in served_stages()[0].env().items() if k[:9] == "LLMSERVE_"}
    env |= {k[9:].lower(): v for k, v in env_file_settings().items()}
    settings = Settings(**env)
    assert settings.host == "0.0.0.0" and not settings.disable_auth
    assert exposure_problem(settings) is None
    # Auth off on 0.0.0.0 is refused unless the operator says it is meant to be public.
    assert exposure_problem(Settings(**env, disable_auth=True)) is not None


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in lines, "send only what the build needs"
    _, stages = parse_dockerfile()
    copied = {
        source.rstrip("/")
        for stage in stages.values()
        for value in stage.values("COPY")
        if not value.startswith("--from")
        for source in value.split()[:-1]
    }
    assert copied == {"pyproject.toml", "README.md", "src"}
    for source in copied:
        assert f"!{source}" in lines or f"!{source}/" in lines, source


def test_compose_ports_restart_and_healthcheck() -> None:
    service = compose_service()
    ports = service["ports"]
    assert isinstance(ports, list) and ports
    for port in ports:
        assert str(port).startswith("127.0.0.1:"), port
    assert service["restart"] == "unless-stopped"
    health = service["healthcheck"]
    assert isinstance(health, dict)
    assert any("/health" in part for part in health["test"])
    # The bundled model loads in a second; a large GGUF from a slow disk takes a minute or more.
    assert seconds(health["start_period"]) >= 60
    build = service["build"]
    assert isinstance(build, dict)
    assert build["target"] in parse_dockerfile()[1]


def test_compose_stop_grace_covers_the_shutdown_grace() -> None:
    service = compose_service()
    grace = float(Settings.model_fields["shutdown_grace"].default)
    for source in (served_stages()[0].env(), env_file_settings(), service.get("environment")):
        grace = max(grace, float(dict(source or {}).get("LLMSERVE_SHUTDOWN_GRACE", 0)))
    # cli.py gives uvicorn 10 s more than the grace for the streams' final events.
    assert seconds(str(service["stop_grace_period"])) >= grace + 10
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_volumes_for_models_and_data() -> None:
    service = compose_service()
    volumes = [str(v) for v in service["volumes"]]  # type: ignore[attr-defined]
    # SOURCE:TARGET[:MODE], where SOURCE may hold ${VAR:-default}.
    targets = {m.group(1) for v in volumes if (m := re.search(r":(/[^:]*)(?::r[ow])?$", v))}
    assert targets == {"/models", "/data"}
    assert "data:/data" in volumes, "the data_dir is a named volume"
    assert any(v.endswith(":/models:ro") for v in volumes)
    assert "data" in yaml.safe_load(COMPOSE.read_text())["volumes"]


def test_no_inline_keys() -> None:
    service = compose_service()
    environment = dict(service.get("environment") or {})
    inline = {k: v for k, v in environment.items() if SECRET_NAMES.search(k) and v}
    assert not inline
    assert not {k: v for k, v in env_file_settings().items() if SECRET_NAMES.search(k) and v}
    assert not {k for k in served_stages()[0].env() if SECRET_NAMES.search(k)}
    assert service.get("env_file"), "keys and settings come from an env file"


def test_no_address_but_loopback_or_any() -> None:
    for path in (DOCKERFILE, COMPOSE, ENV_EXAMPLE, PROOF):
        addresses = set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", path.read_text()))
        assert addresses <= {"127.0.0.1", "0.0.0.0"}, (path.name, addresses)


def test_proof_script_keeps_docker_off_the_network() -> None:
    text = PROOF.read_text()
    assert "--bridge=none" in text and "--iptables=false" in text
    assert "--network host" in text and "LLMSERVE_HOST=127.0.0.1" in text
    assert "debootstrap --variant=minbase bookworm" in text
    subprocess.run(["bash", "-n", str(PROOF)], check=True, timeout=30)
    assert os.access(PROOF, os.X_OK)


def compose_command() -> list[str] | None:
    """`docker compose` (the plugin) or `docker-compose`, whichever is installed."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates() -> None:
    command = compose_command()
    if command is None:
        # .ci/run does not install a compose client; the static checks above still run.
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    env["DEPLOY_ENV_FILE"] = str(ENV_EXAMPLE)
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]["llmserve"]
    published = rendered["ports"][0]
    host_ip = published["host_ip"] if isinstance(published, dict) else published.split(":")[0]
    assert host_ip == "127.0.0.1"
    assert rendered["environment"]["LLMSERVE_SHUTDOWN_GRACE"] == "30"
