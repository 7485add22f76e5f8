"""Sampling presets (TabbyAPI's "sampler overrides"): defaults or forced values for requests."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from llmserve.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from llmserve.core.errors import InvalidRequestError

R = TypeVar("R", bound=BaseModel)

# What a preset may set: generation fields of either OpenAI request, not what the request is.
NOT_OVERRIDABLE = {"model", "prompt", "messages", "stream", "stream_options", "user", "suffix"}
OVERRIDABLE = (
    set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
) - NOT_OVERRIDABLE


class OverrideValue(BaseModel):
    """One preset entry: a value that is a default requests may change, or forced."""

    override: Any
    force: bool = False


class SamplingOverrides:
    """The sampling preset in force (TabbyAPI's "sampler overrides"), held on app.state."""

    def __init__(self) -> None:
        self.preset: str | None = None
        self.values: dict[str, OverrideValue] = {}

    def set(self, preset: str | None, values: dict[str, OverrideValue]) -> None:
        """Validate and switch to `values`; unknown sampler names or bad values are a 400."""
        unknown = sorted(set(values) - OVERRIDABLE)
        if unknown:
            raise InvalidRequestError(f"unknown sampler overrides: {unknown}", param="overrides")
        probe = {name: value.override for name, value in values.items()}
        for request_type in (CompletionRequest, ChatCompletionRequest):
            fields = {k: v for k, v in probe.items() if k in request_type.model_fields}
            _validate(request_type, fields)
        self.preset, self.values = preset, dict(values)
        self.preset, self.values = preset, dict(values)

    def clear(self) -> None:
        """Back to plain request values."""
        self.preset, self.values = None, {}

    def apply(self, body: R) -> R:
        """`body` with preset values filled in where unset, and forced ones always."""
        fields = type(body).model_fields
        update = {
            name: value.override
            for name, value in self.values.items()
            if name in fields and (value.force or getattr(body, name) is None)
        }
        return body.model_copy(update=update) if update else body


def _validate(request_type: type[BaseModel], fields: dict[str, Any]) -> None:
    required = (
        {"prompt": "x"} if request_type is CompletionRequest else {"messages": [{"role": "user"}]}
    )
    try:
        # `messages` is a request-shape check on chat; the completions model ignores it as extra.
        request_type.model_validate({**required, **fields})
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid override: {exc}", param="overrides") from None
