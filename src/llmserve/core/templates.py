"""Chat templates: Jinja from GGUF metadata or a file, rendered in a sandbox.

A GGUF's chat template is untrusted input (CVE-2024-34359 ran code through one), so it is
rendered by Jinja's ImmutableSandboxedEnvironment, which blocks attribute access to internals
and mutation of the objects passed in.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmserve.core.errors import InvalidRequestError

# Used when a model ships no template: ChatML is what most small instruct models expect.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(InvalidRequestError):
    """The template failed to compile or to render these messages."""

    code = "chat_template_error"


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}", param="messages")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template plus the special-token strings it may reference."""

    source: str
    origin: str  # "gguf", "file:<name>", or "builtin:chatml"
    bos_token: str = ""
    eos_token: str = ""
    _compiled: jinja2.Template = field(init=False, repr=False, compare=False)
    supports_tools: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Compile once, at load/switch time, so a broken template fails there and not per request.
        object.__setattr__(self, "_compiled", _compile(self.source))
        object.__setattr__(self, "supports_tools", _reads_variable(self.source, "tools"))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Render `messages` into a prompt string."""
        try:
            return self._compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools else None,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **(extra or {}),
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed to render: {exc}", param="messages") from exc


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from exc


def _reads_variable(source: str, name: str) -> bool:
    """Whether the template reads the context variable `name` (e.g. renders `tools`)."""
    env = ImmutableSandboxedEnvironment()
    try:
        return name in jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateError:
        return False


def load_template(
    source: str | None, origin: str, bos_token: str = "", eos_token: str = ""
) -> ChatTemplate:
    """Build a ChatTemplate, falling back to ChatML when the model has none; checks it compiles."""
    if not source:
        return ChatTemplate(CHATML_TEMPLATE, "builtin:chatml", bos_token, eos_token)
    return ChatTemplate(source, origin, bos_token, eos_token)
