"""The models a server may serve: configured ones (config.yml's `models:`) and the models folder.

Names: a model answers to its id and aliases, and to Ollama's `name:tag` spelling with the tag
`latest` left out (`llama3:latest` is `llama3`). Durations (`keep_alive`) are seconds or
strings such as `90s`, `5m`, `1h`; negative means never, 0 means right after the request.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

DEFAULT_TAG = ":latest"
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or a `5m`-style string; None (never) for negative values."""
    if value is None or isinstance(value, bool):
        return None if value is None else _refuse(value)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            return _refuse(value)
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return None if seconds < 0 else seconds


def _refuse(value: Any) -> float:
    raise ValueError(f"{value!r} is not a duration (seconds, or a number with ms/s/m/h)")


Duration = Annotated[float | None, BeforeValidator(parse_duration)]


def _lora_spec(value: Any) -> Any:
    # A bare name is the adapter at full strength.
    return {"name": value} if isinstance(value, str) else value


class LoraRef(BaseModel):
    """An adapter of loras_dir applied when the model loads, and its strength."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Its file name in loras_dir (suffix optional).")
    scaling: float = Field(default=1.0, description="How strongly it applies (1: as trained).")


LoraEntry = Annotated[LoraRef, BeforeValidator(_lora_spec)]


def bare_name(name: str) -> str:
    """`name` without Ollama's default tag."""
    return name[: -len(DEFAULT_TAG)] if name.endswith(DEFAULT_TAG) else name


class ModelEntry(BaseModel):
    """One configured model; engine settings (ctx_size, parallel, engine, ...) may sit beside."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, description="The name requests use (also its /v1/models id).")
    path: Path | None = Field(
        default=None, description="The model file; empty: the file called `id` in models_dir."
    )
    aliases: list[str] = Field(default=[], description="Other names it answers to.")
    chat_template: Path | None = Field(
        default=None, description="A Jinja template file of its own."
    )
    autoload: bool = Field(
        default=False,
        description="Load it when any key's request names it (else only the admin key's).",
    )
    pinned: bool = Field(default=False, description="Never unload it to make room or when idle.")
    keep_alive: Duration = Field(
        default=None, description="Unload it when idle this long (empty: the server's keep_alive)."
    )
    preset: str | None = Field(
        default=None,
        description="A sampling preset of sampler_overrides_dir for its requests (their own "
        "fields still win, unless the preset forces a value).",
    )
    loras: list[LoraEntry] = Field(
        default=[],
        description="LoRA adapters of loras_dir applied when it loads: names, or "
        "{name, scaling} entries.",
    )

    @property
    def names(self) -> tuple[str, ...]:
        """Every name it answers to."""
        return (self.id, *self.aliases)

    def engine_overrides(self) -> dict[str, Any]:
        """The engine settings given beside the entry's own fields."""
        return dict(self.model_extra or {})
