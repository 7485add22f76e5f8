"""Continuing the final assistant message (a prefill): the prompt ends inside that message.

As vLLM does, the chat is rendered closed (no generation prompt) and cut right after the final
message's text, so neither its end-of-turn token nor a new turn follow. To find the cut even
when that text also occurs earlier, or is empty, a random marker is appended to it before
rendering; a template that rewrites the marked text falls back to the last occurrence of the
text itself (stripped, too, for templates that trim).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from llmserve.core.templates import ChatTemplate, TemplateError


def render_continuation(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """`messages` rendered so that the text ends with the final message's content."""
    final = messages[-1]
    content = str(final.get("content") or "")
    marker = f"\u2063continue-{secrets.token_hex(8)}\u2063"
    marked = [*messages[:-1], {**final, "content": content + marker}]
    text = template.render(marked, add_generation_prompt=False, tools=tools, extra=extra)
    if text.count(marker) == 1:
        return text[: text.index(marker)]
    text = template.render(messages, add_generation_prompt=False, tools=tools, extra=extra)
    for candidate in (content, content.strip()):
        if candidate and candidate in text:
            return text[: text.rindex(candidate) + len(candidate)]
    raise TemplateError(
        "the chat template does not render the final message's text, so it cannot be continued",
        param="messages",
    )
