"""One settings object: config.yml < environment (LLMSERVE_*) < command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from llmserve import exposure
from llmserve.engines.llamacpp.settings import LlamaCppSettings
from llmserve.engines.vllm.settings import VllmSettings
from llmserve.models.catalog import Duration, ModelEntry
from llmserve.usage.database import default_url, sqlite_path
from llmserve.usage.keys import KeyLimits

# A list setting read from the environment as "a,b,c" rather than as JSON.
StrList = Annotated[list[str], NoDecode]


class EngineOptions(LlamaCppSettings, VllmSettings):
    """Every engine's settings: what `engine`, ctx_size, parallel, ... mean for each engine.

    A load may override any of them (the admin API's load request); the chosen engine's own
    settings model validates the result.
    """


class Settings(BaseSettings, EngineOptions):
    """Everything llmserve can be told; each description is also the --help text and example."""

    model_config = SettingsConfigDict(env_prefix="LLMSERVE_", extra="forbid")

    # Network
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    cors_origins: StrList = Field(
        [],
        description="Origins allowed to call the API from a browser (CORS): `*`, an origin "
        "such as https://app.example, or `localhost` for any loopback origin. Empty: `*` on "
        "routes that need a key, loopback origins only on routes open without one.",
    )
    allowed_hosts: StrList = Field(
        [],
        description="Host header names accepted on routes open without a key, besides "
        "loopback names and the listening addresses (DNS rebinding guard); `*` accepts any.",
    )

    # Model
    model: str | None = Field(
        None, description="GGUF file to serve; empty means the bundled SmolLM2-135M-Instruct."
    )
    served_model_name: StrList = Field(
        [], description="Names the model is listed and addressed by (first is its id)."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template that overrides the model's own: a Jinja file, or a built-in "
        "name (chatml, llama3, llama2, mistral, gemma, phi3, qwen2) when no such file exists.",
    )
    strict_model_names: bool = Field(
        False, description="Answer 404 to a request naming a model that is not loaded."
    )
    models_dir: Path = Field(
        Path("models"), description="Folder of loadable GGUF models (and one level of sub-folders)."
    )
    loras_dir: Path = Field(
        Path("loras"),
        description="Folder of LoRA adapters: GGUF files (llama.cpp), PEFT folders (vLLM).",
    )
    templates_dir: Path = Field(Path("templates"), description="Folder of Jinja chat templates.")
    sampler_overrides_dir: Path = Field(
        Path("sampler_overrides"), description="Folder of YAML sampling presets."
    )
    models: list[ModelEntry] = Field(
        [],
        description="Configured models (id, path, aliases, chat_template, autoload, pinned, "
        "keep_alive, preset, loras, and engine settings such as ctx_size or parallel), served "
        "by name; a request naming one that is not loaded loads it with the admin key, or with "
        "any key when it is `autoload` (files of models_dir load by name with the admin key).",
    )
    max_loaded_models: int = Field(
        1,
        ge=1,
        description="Models loaded at once; loading another evicts the least recently used idle "
        "one (with 1, a load replaces the loaded model, as TabbyAPI does).",
    )
    memory_budget_mb: int | None = Field(
        None,
        ge=1,
        description="MiB that loaded models (weights + KV cache, estimated) may use together; "
        "beyond it the least recently used idle model is unloaded first.",
    )
    keep_alive: Duration = Field(
        None,
        description="Unload a model idle this long (seconds or 90s/5m/1h; empty or negative: "
        "never); the default model stays.",
    )
    fallback_model: str | None = Field(
        None,
        description="With several models configured, the one that answers names matching none "
        "(else those are 404).",
    )
    admin_api: bool = Field(True, description="Serve the admin API (model/LoRA/template/preset).")
    admin_host: str | None = Field(
        None, description="Address for the admin API when it has its own port (default: host)."
    )
    admin_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve the admin API on this port only, apart from the rest.",
    )

    # Limits
    request_timeout: float | None = Field(
        None, gt=0, description="Seconds a generation may run; then it ends as if out of tokens."
    )
    shutdown_grace: float = Field(
        30, ge=0, description="Seconds in-flight requests get to finish after SIGTERM/SIGINT."
    )
    header_timeout: float = Field(
        30,
        gt=0,
        description="Seconds a client has to send a request's headers; then the connection "
        "is closed.",
    )
    max_body_bytes: int = Field(
        8 << 20, ge=1024, description="Largest request body accepted (413 beyond)."
    )

    # Data
    data_dir: Path | None = Field(
        None,
        description="Folder for what the server writes: api_tokens.yml, the usage database and "
        "converted models; default: the folder of config.yml, or the current folder.",
    )
    database_url: str | None = Field(
        None,
        description="Database of keys, limits and usage, e.g. postgresql://user:pass@host/db "
        "(shared by replicas); default: SQLite file llmserve.db in data_dir.",
    )
    record_usage: bool = Field(
        True,
        description="Keep a usage record per request and enforce per-key limits (in the "
        "database); false: no database, only the keys of api_tokens.yml and --api-key.",
    )
    anonymous_limits: KeyLimits = Field(
        KeyLimits(),
        description="Limits for requests served without a key (Kobold or Ollama auth off, "
        "disable_auth), all counted as one principal, `anonymous`: rpm, tpm, max_concurrent, "
        "quota_tokens, quota_period.",
    )

    # Auth
    api_tokens_file: Path | None = Field(
        None,
        description="api_tokens.yml holding api_key and admin_key; default: in data_dir. "
        "Created with random keys when missing.",
    )
    api_key: StrList = Field([], description="API keys accepted in addition to api_tokens.yml.")
    disable_auth: bool = Field(False, description="Serve without any key check (open to anyone).")
    i_know_this_is_public: bool = Field(
        False, description="Allow disable_auth on an address other than loopback."
    )
    kobold_auth: bool = Field(
        True,
        description="Require an API key on the KoboldAI routes (/api/v1, /api/extra, "
        "/api/latest); false opens them alone, for SillyTavern, which sends no key there.",
    )
    ollama_auth: bool = Field(
        True,
        description="Require an API key on Ollama's routes (/api/chat, /api/generate, "
        "/api/tags, /api/show, /api/ps, ...); false opens them alone, for clients that "
        "cannot send one (VS Code Copilot, Home Assistant, Open WebUI's Ollama connection).",
    )

    # Logging
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log verbosity."
    )

    @field_validator("cors_origins", "allowed_hosts", "served_model_name", "api_key", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        return [exposure.checked_origin(origin) for origin in value]

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        return [exposure.checked_host(host) for host in value]

    def engine_options(self) -> dict[str, Any]:
        """The configured engine settings, by name (a load's overrides go on top)."""
        return self.model_dump(include=set(EngineOptions.model_fields))

    def data_path(self) -> Path:
        """The folder that holds what the server writes."""
        return self.data_dir or Path(".")

    def tokens_path(self) -> Path:
        """Where api_tokens.yml lives."""
        return self.api_tokens_file or self.data_path() / "api_tokens.yml"

    def usage_database_url(self) -> str | None:
        """The usage database's URL (None when usage is not recorded)."""
        if not self.record_usage:
            return None
        return self.database_url or default_url(self.data_path())

    def written_paths(self) -> list[Path]:
        """Every file the server may create or rewrite (with its folder): for deployments."""
        paths = [] if self.disable_auth else [self.tokens_path()]
        url = self.usage_database_url()
        database = sqlite_path(url) if url else None
        return paths + ([database] if database is not None else [])

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (passed as init values) beat the environment, which beats config.yml."""
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from `config_file` (if any), the environment and `overrides` (CLI flags)."""
    if config_file is None:
        return Settings(**overrides)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=config_file)

    settings = FileSettings(**overrides)
    # Only here, so that data_dir in config.yml (or the environment) still counts.
    if settings.data_dir is None:
        settings.data_dir = default_data_dir(config_file)
    return settings


def default_data_dir(config_file: Path) -> Path:
    """The folder of config.yml, unless a setting names another."""
    return config_file.parent


def example_config() -> str:
    """A commented config.yml listing every setting with its description and default."""
    lines = ["# llmserve configuration. Environment LLMSERVE_<NAME> and flags override it.", ""]
    # model_construct: the defaults alone, not this machine's environment or files.
    defaults = Settings.model_construct().model_dump(mode="json")
    for name, field in Settings.model_fields.items():
        lines.append(f"# {field.description}")
        lines.append(yaml.safe_dump({name: defaults[name]}, default_flow_style=False).strip())
        if name == "models":
            lines.extend(_model_entry_example())
        lines.append("")
    return "\n".join(lines)


def _model_entry_example() -> list[str]:
    """A commented `models:` entry listing every field of ModelEntry."""
    lines = ["# models:"]
    for index, (name, field) in enumerate(ModelEntry.model_fields.items()):
        lead = "#   - " if index == 0 else "#     "
        value = "my-model" if name == "id" else field.default
        text = yaml.safe_dump({name: value}, default_flow_style=True).strip().strip("{}")
        lines.append(f"{lead}{text}  # {field.description}")
    lines.append("#     ctx_size: 8192  # and any engine setting above, for this model alone")
    return lines
