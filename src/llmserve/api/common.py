"""What every dialect shares: ids, chat message types, the error body, chat continuation.

Dialect packages import from here, never from each other. Message and error shapes follow
OpenAI's, which is also what routes outside any dialect (admin, health) answer in.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator

from llmserve.api.errors import retry_headers
from llmserve.core.errors import InvalidRequestError, LLMServeError
from llmserve.core.tools import ToolCall as CallTurn
from llmserve.core.tools import Turn


def new_id(prefix: str) -> str:
    """A unique response id such as `chatcmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix time in seconds, OpenAI's `created`."""
    return int(time.time())


class TextPart(BaseModel):
    """A text part of a message whose content is a list of parts."""

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    """A function call inside an assistant message's `tool_calls`."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """An assistant's tool call, in OpenAI's shape."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of a chat request."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """Images, audio and files are out of scope: say so instead of a type mismatch."""
        for index, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise ValueError(
                    f"part {index} is of type {kind!r}: only text parts are served "
                    "(no images, audio or files)"
                )
        return content

    def text(self) -> str:
        """The content as one string: text parts joined by newlines, as vLLM and llama.cpp do."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


def chat_turns(messages: list[ChatMessage]) -> list[Turn]:
    """Chat messages, dialect-neutral (developer messages are system messages)."""
    return [
        Turn(
            role="system" if m.role == "developer" else m.role,
            content=m.text(),
            name=m.name,
            tool_calls=tuple(
                CallTurn(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()
            ),
            tool_call_id=m.tool_call_id,
        )
        for m in messages
    ]


class ErrorInfo(BaseModel):
    """The body of an OpenAI error."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: {"error": {...}}."""

    error: ErrorInfo


def continues_final_message(
    messages: list[ChatMessage],
    continue_final: bool | None,
    add_generation_prompt: bool | None,
    *,
    explicit_prompt: bool,
) -> bool:
    """Whether a chat prompt ends inside its final assistant message (chat and /tokenize).

    As llama.cpp's server, a trailing assistant message is continued unless the request says
    otherwise (`continue_final_message: false` or an explicit `add_generation_prompt`);
    vLLM's `continue_final_message: true` asks for it outright.
    """
    if not messages:
        return False
    last = messages[-1]
    if continue_final is None:
        return last.role == "assistant" and not last.tool_calls and not explicit_prompt
    if not continue_final:
        return False
    if explicit_prompt and add_generation_prompt:
        raise InvalidRequestError(
            "`continue_final_message` and `add_generation_prompt` cannot both be true",
            param="continue_final_message",
        )
    if last.role != "assistant" or last.tool_calls:
        raise InvalidRequestError(
            "`continue_final_message` needs the last message to be an assistant message "
            "with text (no tool_calls) to continue",
            param="continue_final_message",
        )
    return True


def error_body(exc: LLMServeError) -> ErrorResponse:
    """An LLMServeError in OpenAI's error shape."""
    return ErrorResponse(
        error=ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    )


def error_response(exc: LLMServeError) -> JSONResponse:
    """An error as an OpenAI JSON response with its status (and Retry-After when useful)."""
    return JSONResponse(
        error_body(exc).model_dump(), status_code=exc.status, headers=retry_headers(exc)
    )
