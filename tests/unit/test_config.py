"""Settings precedence: config.yml < LLMSERVE_* environment < command-line flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmserve.cli import _overrides, _parse
from llmserve.config import example_config, load_settings


@pytest.fixture(autouse=True)
def _no_test_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check defaults: without the test session's LLMSERVE_DATA_DIR."""
    monkeypatch.delenv("LLMSERVE_DATA_DIR", raising=False)


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yml"
    config.write_text(
        yaml.safe_dump({"port": 9001, "ctx_size": 512, "log_level": "debug", "threads": 1})
    )
    monkeypatch.setenv("LLMSERVE_CTX_SIZE", "777")
    monkeypatch.setenv("LLMSERVE_API_KEY", "a,b")
    monkeypatch.setenv("LLMSERVE_THREADS", "2")
    args = _parse(["--config", str(config), "--threads", "3", "--api-key", "c"])
    settings = load_settings(args.config, **_overrides(args))
    assert settings.port == 9001  # file only
    assert settings.log_level == "debug"
    assert settings.ctx_size == 777  # environment beats the file
    assert settings.threads == 3  # flag beats environment and file
    assert settings.api_key == ["c"]
    assert settings.tokens_path() == tmp_path / "api_tokens.yml"  # in data_dir: config's folder


def test_unknown_or_bad_values_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"prot": 1}))
    with pytest.raises(ValueError, match="prot"):
        load_settings(config)
    with pytest.raises(ValueError, match="port"):
        load_settings(None, port=70000)


def test_example_config_lists_every_setting_with_its_description() -> None:
    text = example_config()
    parsed = yaml.safe_load(text)
    assert {"host", "port", "model", "ctx_size", "threads", "log_level"} <= set(parsed)
    assert "# Context length per sequence" in text


def test_allowed_hosts_and_cors_origins_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _parse(["--allowed-hosts", "llm.example", "--allowed-hosts", "127.0.0.2"])
    monkeypatch.setenv("LLMSERVE_CORS_ORIGINS", "localhost,https://App.example/")
    settings = load_settings(None, **_overrides(args))
    assert settings.allowed_hosts == ["llm.example", "127.0.0.2"]
    assert settings.cors_origins == ["localhost", "https://app.example"]
    monkeypatch.delenv("LLMSERVE_CORS_ORIGINS")
    assert load_settings(None).cors_origins == []  # chosen per route from the auth settings


def test_tokens_file_named_in_config_yml_is_used(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"api_tokens_file": "/var/lib/llmserve/api_tokens.yml"}))
    assert load_settings(config).api_tokens_file == Path("/var/lib/llmserve/api_tokens.yml")
    config.write_text(yaml.safe_dump({"port": 1}))
    assert load_settings(config).tokens_path() == tmp_path / "api_tokens.yml"
    config.write_text(yaml.safe_dump({"data_dir": "/srv/llmserve"}))
    settings = load_settings(config)
    assert settings.tokens_path() == Path("/srv/llmserve/api_tokens.yml")
    assert settings.usage_database_url() == "sqlite:////srv/llmserve/llmserve.db"


def test_an_unknown_engine_stops_the_server_before_it_starts(tmp_path: Path) -> None:
    from llmserve.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["--engine", "nope", "--api-tokens-file", str(tmp_path / "t.yml")])
    assert "no engine called 'nope'" in str(caught.value)
    assert "llamacpp" in str(caught.value)  # the engines there are


def test_engine_settings_are_settings_flags_and_config_keys() -> None:
    args = _parse(["--engine", "llamacpp", "--ctx-size", "512", "--no-kv-unified"])
    assert _overrides(args) == {"engine": "llamacpp", "ctx_size": "512", "kv_unified": False}
    assert load_settings(kv_unified=True).engine_options()["kv_unified"] is True


def test_help_shows_the_server_flags_grouped(capsys: pytest.CaptureFixture[str]) -> None:
    from llmserve.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    sections = [line for line in text.splitlines() if line.endswith("settings:")]
    assert sections == [
        "server settings:",
        "model settings:",
        "engine settings:",
        "limits settings:",
        "data settings:",
        "auth settings:",
        "logging settings:",
    ]
    engine = text.split("engine settings:")[1].split("limits settings:")[0]
    assert "--ctx-size" in engine and "--kv-unified" in engine and "--host" not in engine
    assert "--no-ollama-auth" in text.split("auth settings:")[1]
    assert "llmserve keys" in text  # the other commands are named
