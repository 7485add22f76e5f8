"""Tool calling, dialect-neutral: tool prompt, call constraint, and reading calls out of the output.

A call is the JSON object `{"name": <tool>, "arguments": {...}}` (several: a JSON array of them).
Templates that render `tools` themselves get them; for the others (ChatML has no tools) a system
prompt section describes the tools and this format. `required` and a named function constrain
the whole output with a constraint built from the tools' parameter schemas, so the call always
parses; with `auto` the model answers freely and its output counts as a call only if it is one.
That keeps ordinary answers free of any grammar cost, and a grammar allowing "text or a call"
would guarantee nothing about the text either.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from llmserve.core.constraints import ToolCalls, ToolSchema, canonical_json
from llmserve.core.errors import InvalidRequestError
from llmserve.core.limits import check_schema_depth

ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3.1 style models say "parameters"
# A function declared without parameters takes none: its call carries `"arguments": {}`.
NO_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}
# Wrappers models put around calls: Hermes/Qwen tags, Mistral's marker, markdown fences.
TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
PREFIXES = ("[TOOL_CALLS]", "```json", "```")


def new_call_id() -> str:
    """A tool call id in OpenAI's style, `call_<24 hex>`."""
    return f"call_{secrets.token_hex(12)}"


class ToolChoice(StrEnum):
    """Whether and how the model must call a tool."""

    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    FUNCTION = "function"  # the one named in ToolPlan.function


@dataclass(frozen=True)
class ToolFunction:
    """A function the model may call; `parameters` is a JSON schema."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None

    def spec(self) -> dict[str, Any]:
        """The function as templates and the tool prompt show it."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = dict(self.parameters or NO_PARAMETERS)
        return out


@dataclass(frozen=True)
class ToolCall:
    """One call the model made; `arguments` is JSON text, as the model wrote it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed call: the first carries id and name, later ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class Turn:
    """One chat message, dialect-neutral."""

    role: str
    content: str = ""
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ToolPlan:
    """The tools of a request and what the model must do with them."""

    tools: tuple[ToolFunction, ...]
    choice: ToolChoice = ToolChoice.AUTO
    function: str | None = None
    parallel: bool = True

    def __post_init__(self) -> None:
        names = [tool.name for tool in self.tools]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise InvalidRequestError(f"tool {duplicate!r} is defined twice", param="tools")
        if self.choice is ToolChoice.FUNCTION and self.function not in names:
            raise InvalidRequestError(
                f"tool_choice names function {self.function!r}, which is not in `tools`",
                param="tool_choice",
            )
        if not self.tools and self.choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION):
            raise InvalidRequestError(
                "tool_choice requires a tool but `tools` is empty", param="tool_choice"
            )
        for index, tool in enumerate(self.tools):
            # Templates and the call grammar walk these schemas recursively.
            check_schema_depth(tool.parameters, f"tools[{index}].function.parameters")

    @property
    def active(self) -> bool:
        """The model is offered tools (and their output is read for calls)."""
        return bool(self.tools) and self.choice is not ToolChoice.NONE

    @property
    def forced(self) -> bool:
        """The output must be a call, enforced by a constraint."""
        return self.choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION)

    def callable_tools(self) -> tuple[ToolFunction, ...]:
        """The tools the model may call under this choice."""
        if self.choice is ToolChoice.FUNCTION:
            return tuple(t for t in self.tools if t.name == self.function)
        return self.tools

    def constraint(self) -> ToolCalls | None:
        """The call(s) the output must be when a call is forced, else None."""
        if not self.forced:
            return None
        callable_tools = self.callable_tools()
        return ToolCalls(
            tools=tuple(
                ToolSchema(
                    tool.name,
                    canonical_json(tool.parameters or NO_PARAMETERS),
                    f"tools[{index}].function.parameters",
                )
                for index, tool in enumerate(self.tools)
                if tool in callable_tools
            ),
            parallel=self.parallel and self.choice is ToolChoice.REQUIRED,
        )

    def instructions(self) -> str:
        """The system prompt section for templates that do not render tools."""
        lines = [
            "# Tools",
            "",
            "You can call these tools (JSON descriptions, one per line):",
            *(json.dumps(tool.spec(), ensure_ascii=False) for tool in self.tools),
            "",
            "To call a tool, reply with only a JSON object, with nothing before or after it:",
            '{"name": "<tool name>", "arguments": {<the arguments, as the tool\'s parameters '
            "describe them>}}",
        ]
        if self.parallel and self.choice is not ToolChoice.FUNCTION:
            lines.append("To call several tools at once, reply with a JSON array of such objects.")
        lines.append(self._choice_line())
        lines.append('Results of tool calls come back in messages starting with "Tool result".')
        return "\n".join(lines)

    def _choice_line(self) -> str:
        if self.choice is ToolChoice.FUNCTION:
            return f'You must call the tool "{self.function}" now.'
        if self.choice is ToolChoice.REQUIRED:
            return "You must call a tool now."
        return "If no tool is needed, answer in plain text instead."


# ---- messages for the template ----------------------------------------------------------------


def template_messages(
    turns: Sequence[Turn], plan: ToolPlan | None, native: bool
) -> list[dict[str, Any]]:
    """Messages for the chat template; tool turns are folded into text unless `native`."""
    if native:
        return [_native_message(turn, turns) for turn in turns]
    messages = _folded_messages(turns)
    if plan is not None and plan.active:
        messages = _with_system_section(messages, plan.instructions())
    return messages


def template_tools(plan: ToolPlan | None) -> list[dict[str, Any]] | None:
    """The tools as templates expect them (OpenAI's shape), or None when none are offered."""
    if plan is None or not plan.active:
        return None
    return [{"type": "function", "function": tool.spec()} for tool in plan.tools]


def _native_message(turn: Turn, turns: Sequence[Turn]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": turn.role, "content": turn.content}
    if turn.name:
        message["name"] = turn.name
    if turn.tool_calls:
        # Templates read arguments as a mapping (Hugging Face's convention), not JSON text.
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments_value(call.arguments)},
            }
            for call in turn.tool_calls
        ]
    if turn.role == "tool":
        message["tool_call_id"] = turn.tool_call_id
        message.setdefault("name", _called_name(turn.tool_call_id, turns))
    return message


def _folded_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """Assistant calls become their JSON; tool results become one user message per run."""
    messages: list[dict[str, Any]] = []
    previous_was_tool = False
    for turn in turns:
        if turn.role == "tool":
            text = _tool_result_text(turn, turns)
            if previous_was_tool:
                messages[-1]["content"] += "\n\n" + text
            else:
                messages.append({"role": "user", "content": text})
            previous_was_tool = True
            continue
        previous_was_tool = False
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.name:
            message["name"] = turn.name
        if turn.tool_calls:
            message["content"] = "\n".join(filter(None, [turn.content, calls_text(turn)]))
        messages.append(message)
    return messages


def calls_text(turn: Turn) -> str:
    """An assistant turn's calls in the format the tool prompt teaches."""
    calls = [
        {"name": call.name, "arguments": _arguments_value(call.arguments)}
        for call in turn.tool_calls
    ]
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


def _tool_result_text(turn: Turn, turns: Sequence[Turn]) -> str:
    name = turn.name or _called_name(turn.tool_call_id, turns)
    label = ", ".join(filter(None, [name, turn.tool_call_id and f"call {turn.tool_call_id}"]))
    return f"Tool result ({label}):\n{turn.content}" if label else f"Tool result:\n{turn.content}"


def _called_name(call_id: str | None, turns: Sequence[Turn]) -> str | None:
    for turn in turns:
        for call in turn.tool_calls:
            if call.id == call_id:
                return call.name
    return None


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _with_system_section(messages: list[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{section}" if first["content"] else section
        return [first, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


# ---- reading calls ----------------------------------------------------------------------------


def split_tool_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[ToolCall]]:
    """A finished output as (content, calls): content None when the output is a call."""
    if plan.forced:
        reader = ToolCallReader()
        reader.feed(text)
        return (None, reader.calls()) if _read_calls(reader, plan) else (text, [])
    parsed = parse_tool_calls(text, plan)
    return (text, []) if parsed is None else (None, parsed)


def _read_calls(reader: ToolCallReader, plan: ToolPlan) -> bool:
    """Whether a forced output was read to the end as calls of the plan's tools."""
    calls = reader.calls()
    names = {tool.name for tool in plan.callable_tools()}
    return (
        reader.complete
        and not reader.failed
        and bool(calls)
        and all(call.name in names for call in calls)
    )


def parse_tool_calls(text: str, plan: ToolPlan) -> list[ToolCall] | None:
    """The calls in an unconstrained output, or None when it is not (only) calls."""
    bodies = _call_bodies(text)
    names = {tool.name for tool in plan.callable_tools()}
    calls: list[ToolCall] = []
    for body in bodies:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        items = value if isinstance(value, list) else [value]
        if not items or not all(_is_call(item, names) for item in items):
            return None
        reader = ToolCallReader()
        reader.feed(body)
        calls += [ToolCall(c.id, c.name, _arguments_text(c.arguments)) for c in reader.calls()]
    return calls or None


def _call_bodies(text: str) -> list[str]:
    stripped = text.strip()
    tagged = TAGGED_CALL.findall(stripped)
    if tagged and not TAGGED_CALL.sub("", stripped).strip():
        return [str(body) for body in tagged]
    for prefix in PREFIXES:
        if stripped.startswith(prefix):
            stripped = stripped.removeprefix(prefix).removesuffix("```").strip()
            break
    return [stripped]


def _is_call(item: Any, names: set[str]) -> bool:
    if not isinstance(item, dict) or item.get("name") not in names:
        return False
    arguments: Any = next((item[k] for k in ARGUMENT_KEYS if k in item), {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return False
    return isinstance(arguments, dict)


def _arguments_text(raw: str) -> str:
    """Arguments written as a JSON string holding JSON are unwrapped; absent ones are `{}`."""
    if not raw:
        return "{}"
    if raw.startswith('"'):
        inner = json.loads(raw)
        return inner if isinstance(inner, str) else raw
    return raw


class ToolStream:
    """Splits one choice's streamed output into content and call deltas.

    A forced call is read as it streams. Under `auto`, output that could still become a call
    (it starts with `{`, `[`, `<tool_call>` or a code fence) is held back until the end, then
    sent as calls if it parses as calls, else as content; anything else streams as content.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._reader = ToolCallReader() if plan.forced else None
        self._held: list[str] = []
        self._is_content = False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Content to send now and call deltas to send now."""
        if self._reader is not None:
            return "", self._reader.feed(text)
        if self._is_content:
            return text, []
        self._held.append(text)
        held = "".join(self._held)
        if _may_be_call(held):
            return "", []
        self._is_content = True
        self._held = []
        return held, []

    def finish(self) -> tuple[str, list[ToolCallDelta], bool]:
        """At the end: content and call deltas still to send, and whether the output was calls."""
        if self._reader is not None:
            return "", [], _read_calls(self._reader, self.plan)
        held = "".join(self._held)
        self._held = []
        calls = parse_tool_calls(held, self.plan) if held else None
        if calls is None:
            return held, [], False
        deltas = [ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)]
        return "", deltas, True


def _may_be_call(text: str) -> bool:
    """Whether output starting with `text` may turn out to be a call."""
    stripped = text.lstrip()
    if not stripped or stripped[0] in "{[":
        return True
    for marker in ("<tool_call>", *PREFIXES):
        if marker.startswith(stripped):
            return True
        if stripped.startswith(marker):
            rest = stripped.removeprefix(marker).lstrip()
            if not rest or rest[0] in "{[":
                return True
    return False


class ToolCallReader:
    """Reads `{"name": ..., "arguments": ...}` objects (or an array of them) as they stream in.

    Argument text is passed on as the model writes it, fragment by fragment, once the call's
    name is known; so the concatenated fragments equal the non-streamed `arguments`.
    """

    def __init__(self) -> None:
        self._state = _State.START
        self._array = False
        self._calls: list[_Call] = []
        self._key = _Value()
        self._field = ""
        self._value = _Value()
        self.complete = False  # the last call (or the array) is closed
        self.failed = False  # the text is not in the call format

    def calls(self) -> list[ToolCall]:
        """Every call whose name has been read."""
        return [ToolCall(c.id, c.name, "".join(c.arguments)) for c in self._calls if c.name]

    def feed(self, text: str) -> list[ToolCallDelta]:
        """Read more output; return what it adds to the calls."""
        out: list[ToolCallDelta] = []
        for char in text:
            if not self.failed:
                self._step(char, out)
        return _merged(out)

    def _step(self, char: str, out: list[ToolCallDelta]) -> None:
        state = self._state
        if state is _State.VALUE:
            if self._value.take(char):
                self._on_value_char(char, out)
                if self._value.done:
                    self._end_value(out)
                return
            self._end_value(out)  # a number/literal ended at this separator
            self._state = _State.AFTER_VALUE
            self._step(char, out)
            return
        if state is _State.KEY:
            self._key.take(char)
            if self._key.done:
                self._field = str(json.loads(self._key.text()))
                self._state = _State.COLON
            return
        if char.isspace():
            return
        self._structural(char, out)

    def _structural(self, char: str, out: list[ToolCallDelta]) -> None:
        state = self._state
        if state is _State.START and char == "[":
            self._array = True
            self._state = _State.BETWEEN
        elif state in (_State.START, _State.BETWEEN) and char == "{":
            self._calls.append(_Call(new_call_id()))
            self._state = _State.KEY_OR_END
        elif state is _State.BETWEEN and char in ",]":
            self.complete = char == "]"
        elif state is _State.KEY_OR_END and char == '"':
            self._key = _Value()
            self._key.take(char)
            self._state = _State.KEY
        elif state is _State.COLON and char == ":":
            self._state = _State.VALUE_START
        elif state is _State.VALUE_START:
            self._value = _Value()
            self._state = _State.VALUE
            self._step(char, out)
        elif state is _State.AFTER_VALUE and char == ",":
            self._state = _State.KEY_OR_END
        elif state in (_State.KEY_OR_END, _State.AFTER_VALUE) and char == "}":
            self._state = _State.BETWEEN if self._array else _State.DONE
            self.complete = not self._array
        elif state is not _State.DONE:
            self.failed = True

    def _on_value_char(self, char: str, out: list[ToolCallDelta]) -> None:
        if self._field not in ARGUMENT_KEYS:
            return
        call = self._calls[-1]
        call.arguments.append(char)
        if call.name:
            out.append(ToolCallDelta(len(self._calls) - 1, arguments=char))

    def _end_value(self, out: list[ToolCallDelta]) -> None:
        self._state = _State.AFTER_VALUE
        call = self._calls[-1]
        if self._field != "name" or call.name:
            return
        try:
            name = json.loads(self._value.text())
        except json.JSONDecodeError:
            name = None
        if not isinstance(name, str) or not name:
            self.failed = True
            return
        call.name = name
        index = len(self._calls) - 1
        out.append(ToolCallDelta(index, call.id, name, "".join(call.arguments)))


class _State(StrEnum):
    START = "start"  # nothing read yet
    BETWEEN = "between"  # inside the array, between calls
    KEY_OR_END = "key_or_end"  # in a call object, expecting a key or `}`
    KEY = "key"  # reading a key string
    COLON = "colon"
    VALUE_START = "value_start"
    VALUE = "value"
    AFTER_VALUE = "after_value"  # expecting `,` or `}`
    DONE = "done"  # the single call object is closed


@dataclass
class _Call:
    id: str
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Value:
    """One JSON value being read: tracks strings and nesting to know where it ends."""

    chars: list[str] = field(default_factory=list)
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False

    def take(self, char: str) -> bool:
        """Add `char` if it belongs to the value (False: the value ended before it)."""
        if self.in_string:
            self._string_char(char)
        elif char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            if self.depth == 0:
                return False
            self.depth -= 1
        elif self.depth == 0 and (char == "," or char.isspace()):
            return False  # the end of a number or literal
        self.chars.append(char)
        self.done = self.depth == 0 and not self.in_string and char in '"}]'
        return True

    def _string_char(self, char: str) -> None:
        if self.escaped:
            self.escaped = False
        elif char == "\\":
            self.escaped = True
        elif char == '"':
            self.in_string = False

    def text(self) -> str:
        """The value's text so far."""
        return "".join(self.chars)


def _merged(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Adjacent argument fragments of one call joined into one delta."""
    out: list[ToolCallDelta] = []
    for delta in deltas:
        last = out[-1] if out else None
        if last is not None and last.index == delta.index and delta.id is None:
            out[-1] = ToolCallDelta(
                last.index, last.id, last.name, last.arguments + delta.arguments
            )
        else:
            out.append(delta)
    return out
