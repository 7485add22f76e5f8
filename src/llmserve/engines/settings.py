"""Settings every engine takes; each engine adds its own in its package (`settings.py`).

Settings (config.yml, environment, flags) is built from these models, and a load's overrides
are validated by the chosen engine's model: each field is spelled out once, here or there.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_ENGINE = "llamacpp"


class EngineSettings(BaseModel):
    """The settings every engine understands."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field(
        DEFAULT_ENGINE,
        description="Engine that runs the model: llamacpp (GGUF files) or another registered one.",
    )
    ctx_size: int | None = Field(
        None, ge=16, description="Context length per sequence (prompt + output), in tokens."
    )
    parallel: int | None = Field(
        None, ge=1, le=256, description="Sequences decoded together; more requests wait in a queue."
    )
    max_queue: int | None = Field(
        None, ge=0, description="Requests allowed to wait for a slot; beyond it: 429."
    )
