"""Wire shapes of the web UI's own routes."""

from __future__ import annotations

from pydantic import BaseModel, Field


class UiConfig(BaseModel):
    """GET /ui/config.json: which parts of the UI this app serves (no secrets)."""

    version: str
    playground: bool = Field(description="The chat playground (the main app only).")
    console: bool = Field(description="The admin console (admin key; absent without admin_api).")
    auth: bool = Field(description="Whether requests need a key.")


class ConsoleModel(BaseModel):
    """A model file or loaded model, as the admin console lists it."""

    id: str
    state: str = Field(description="loaded, loading, failed or available")
    aliases: list[str] = []
    context_length: int | None = None
    path: str | None = None


class ConsoleModelList(BaseModel):
    """GET /v1/console/models: loaded models first, then the loadable files of models_dir."""

    object: str = "list"
    data: list[ConsoleModel]


class RecentRequest(BaseModel):
    """One access record of GET /v1/requests/recent (never a prompt or a key)."""

    time: float = Field(description="When the request ended (Unix seconds).")
    request_id: str
    method: str
    route: str
    dialect: str | None = None
    path: str | None = None
    status: int
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float | None = None
    duration_ms: float = 0.0


class RecentRequestList(BaseModel):
    """GET /v1/requests/recent: the newest access records first."""

    object: str = "list"
    size: int = Field(description="How many records the ring keeps.")
    data: list[RecentRequest]
