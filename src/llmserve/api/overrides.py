"""Sampling presets (TabbyAPI's "sampler overrides"): defaults or forced values for requests.

Every dialect's request derives from the shared sampler base (api/sampling.py), so one preset
applies to all of them: a forced `max_tokens: 5` caps OpenAI's `max_tokens` and
`max_completion_tokens`, Kobold's `max_length` and Together's `max_tokens` alike. Presets use
the base's field names; any dialect's spelling of a field (`rep_pen`, `max_length`, ...) is
accepted and stored under the base's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from llmserve.api.kobold.protocol import KoboldGenerateRequest
from llmserve.api.ollama.protocol import OllamaOptions
from llmserve.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from llmserve.api.responses.protocol import ResponsesRequest
from llmserve.api.sampling import SamplerFields, field_names
from llmserve.api.together.protocol import InferenceRequest
from llmserve.core.errors import InvalidRequestError

R = TypeVar("R", bound=SamplerFields)

# Each dialect's request with the fields it cannot do without, for checking preset values.
REQUEST_TYPES: dict[type[SamplerFields], dict[str, Any]] = {
    CompletionRequest: {"prompt": "x"},
    ChatCompletionRequest: {"messages": [{"role": "user"}]},
    KoboldGenerateRequest: {"prompt": "x"},
    InferenceRequest: {"prompt": "x"},
    OllamaOptions: {},  # Ollama's samplers sit in `options`, which the preset applies to
    ResponsesRequest: {"input": "x"},
}
# What a preset may set: generation fields of a request, not what the request is.
NOT_OVERRIDABLE = {
    "model",
    "prompt",
    "messages",
    "memory",
    "stream",
    "stream_options",
    "stream_tokens",
    "user",
    "suffix",
    "genkey",
    # Folded into `max_tokens` when the request is read; a preset names `max_tokens`.
    "max_completion_tokens",
    "max_output_tokens",
    # The Responses dialect's conversation and bookkeeping fields.
    "input",
    "instructions",
    "previous_response_id",
    "store",
    "background",
    "include",
    "reasoning",
    "metadata",
    "prompt_cache_key",
    "service_tier",
    "truncation",
    "safety_identifier",
}
OVERRIDABLE = {name for t in REQUEST_TYPES for name in t.model_fields} - NOT_OVERRIDABLE
# A preset may spell a field as any dialect does; it is stored under the base's name.
PRESET_NAMES = {
    **field_names(),
    "max_completion_tokens": "max_tokens",
    "max_output_tokens": "max_tokens",
}


class OverrideValue(BaseModel):
    """One preset entry: a value that is a default requests may change, or forced."""

    model_config = ConfigDict(extra="forbid")

    override: Any
    force: bool = False


class SamplingOverrides:
    """The sampling preset in force (TabbyAPI's "sampler overrides"), held on app.state."""

    def __init__(self) -> None:
        self.preset: str | None = None
        self.values: dict[str, OverrideValue] = {}
        # Presets of configured models (config.yml's `preset:`), validated, by preset name, and
        # the preset of the model a request names; the admin serving fills both in.
        self.model_presets: dict[str, dict[str, OverrideValue]] = {}
        self.preset_of: Callable[[str | None], str | None] = lambda model: None

    def set(self, preset: str | None, values: dict[str, OverrideValue]) -> None:
        """Validate and switch to `values`; unknown names or bad values are a 400, old kept."""
        named = {PRESET_NAMES.get(name, name): value for name, value in values.items()}
        unknown = sorted(set(named) - OVERRIDABLE)
        if unknown:
            raise InvalidRequestError(
                f"{_source(preset)}: unknown sampler overrides: {unknown}", param=_param(preset)
            )
        probe = {name: value.override for name, value in named.items()}
        for request_type, required in REQUEST_TYPES.items():
            fields = {k: v for k, v in probe.items() if k in request_type.model_fields}
            _validate(request_type, required, fields, preset)
        self.preset, self.values = preset, named

    def clear(self) -> None:
        """Back to plain request values."""
        self.preset, self.values = None, {}

    def apply(self, body: R) -> R:
        """`body` with preset values filled in where unset, and forced ones always.

        The serving model's own preset goes over the admin's (field by field).
        """
        fields = type(body).model_fields
        values = {**self.values, **self._model_values(body)}
        update = {
            name: value.override
            for name, value in values.items()
            if name in fields and (value.force or getattr(body, name) is None)
        }
        return body.model_copy(update=update) if update else body

    def _model_values(self, body: SamplerFields) -> dict[str, OverrideValue]:
        model = getattr(body, "model", None)  # Ollama's options and Kobold's bodies have none
        preset = self.preset_of(model if isinstance(model, str) else None)
        return self.model_presets.get(preset, {}) if preset is not None else {}


def _source(preset: str | None) -> str:
    return f"preset {preset!r}" if preset is not None else "overrides"


def _param(preset: str | None) -> str:
    return "preset" if preset is not None else "overrides"


def _validate(
    request_type: type[BaseModel],
    required: dict[str, Any],
    fields: dict[str, Any],
    preset: str | None,
) -> None:
    try:
        request_type.model_validate({**required, **fields})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise InvalidRequestError(
            f"{_source(preset)}: invalid override: {problems}", param=_param(preset)
        ) from None
