"""Structured-output constraints as engine-neutral values.

A dialect turns what the client sent (OpenAI's `response_format`, vLLM's `guided_*`, Kobold's
`grammar`, a forced tool call, ...) into one of these values and puts it in
`SamplingParams.constraint`. Each engine compiles it its own way (llama.cpp: to a GBNF grammar)
and declares in its capabilities which kinds it can enforce; the others are refused with a 400
naming `param`, the request field the constraint came from.

Checks that hold for every engine (JSON text, schema size and depth, grammar size) run here,
when the value is made; what an engine's compiler cannot express it refuses itself, also
naming `param`. Values are frozen and hashable (schemas are kept as canonical JSON text), so an
engine can cache what it compiled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from llmserve.core import limits
from llmserve.core.errors import InvalidRequestError


class ConstraintKind(StrEnum):
    """The kinds of constraint an engine may declare it can enforce."""

    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"  # GBNF text, llama.cpp's grammar syntax
    TOOL_CALLS = "tool_calls"


def canonical_json(value: Any) -> str:
    """One spelling of a JSON value, so equal schemas compare (and hash) equal.

    Keys keep their order: the order of `properties` is the order the output is written in.
    """
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def load_schema(schema: Any, param: str) -> Mapping[str, Any]:
    """A schema sent as an object or as JSON text, as a bounded mapping."""
    if isinstance(schema, str):
        schema = limits.load_json_text(schema, param)
    if isinstance(schema, bool) or not isinstance(schema, Mapping):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    limits.check_schema_depth(schema, param)
    return schema


@dataclass(frozen=True)
class JsonSchema:
    """Output is JSON valid against a schema."""

    text: str  # the schema as canonical JSON
    param: str
    kind: ClassVar[ConstraintKind] = ConstraintKind.JSON_SCHEMA

    @classmethod
    def of(cls, schema: Any, param: str) -> JsonSchema:
        """From a schema object or its JSON text, checked against the bounds."""
        return cls(canonical_json(load_schema(schema, param)), param)

    @property
    def schema(self) -> dict[str, Any]:
        """The schema as a fresh mapping."""
        value: dict[str, Any] = json.loads(self.text)
        return value


@dataclass(frozen=True)
class JsonObject:
    """Output is any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""

    param: str = "response_format"
    kind: ClassVar[ConstraintKind] = ConstraintKind.JSON_OBJECT


@dataclass(frozen=True)
class Regex:
    """Output fully matches a regular expression."""

    pattern: str
    param: str
    kind: ClassVar[ConstraintKind] = ConstraintKind.REGEX

    def __post_init__(self) -> None:
        """Bounded like a client's grammar: the pattern becomes rules per character."""
        limits.check_grammar_size(self.pattern, self.param, limits.MAX_GRAMMAR_BYTES)


@dataclass(frozen=True)
class Choice:
    """Output is exactly one of the choices."""

    choices: tuple[str, ...]
    param: str
    kind: ClassVar[ConstraintKind] = ConstraintKind.CHOICE

    def __post_init__(self) -> None:
        """At least one choice, and no more text in all than a client's grammar."""
        if not self.choices:
            message = f"{self.param} must list at least one choice"
            raise InvalidRequestError(message, param=self.param)
        limits.check_grammar_size("".join(self.choices), self.param, limits.MAX_GRAMMAR_BYTES)


@dataclass(frozen=True)
class Grammar:
    """Output follows a GBNF grammar (llama.cpp's syntax) with a `root` rule."""

    text: str
    param: str = "grammar"
    kind: ClassVar[ConstraintKind] = ConstraintKind.GRAMMAR

    def __post_init__(self) -> None:
        """Bounded before any parser sees it: llama.cpp's recurses per nested group.

        Whether it parses is the engine's to say (a 400 before any token).
        """
        limits.check_grammar_text(self.text, self.param)
        if "root" not in self.text:
            raise InvalidRequestError(f"{self.param} must define a `root` rule", param=self.param)

    @classmethod
    def of(cls, text: str | None, param: str = "grammar") -> Grammar | None:
        """A client's own grammar, or None when the field is blank."""
        if text is None or not text.strip():
            return None
        return cls(text, param)


@dataclass(frozen=True)
class ToolSchema:
    """One tool a forced call may name, with its parameters' schema."""

    name: str
    parameters: str  # the JSON schema of the arguments, canonical JSON
    param: str  # where the schema came from, e.g. `tools[2].function.parameters`

    @property
    def parameters_schema(self) -> dict[str, Any]:
        """The parameters' schema as a fresh mapping."""
        value: dict[str, Any] = json.loads(self.parameters)
        return value


@dataclass(frozen=True)
class ToolCalls:
    """Output is a call `{"name": ..., "arguments": {...}}` of one of the tools.

    With `parallel`, a JSON array of one or more such calls is allowed too.
    """

    tools: tuple[ToolSchema, ...]
    parallel: bool = False
    param: str = "tools"
    kind: ClassVar[ConstraintKind] = ConstraintKind.TOOL_CALLS

    def json_schema(self) -> dict[str, Any]:
        """The same constraint as one JSON schema, for engines that enforce schemas natively."""
        calls = [call_schema(tool.name, tool.parameters_schema) for tool in self.tools]
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel:
            return {"anyOf": [call, {"type": "array", "items": call, "minItems": 1}]}
        return call


def call_schema(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The schema of one call of the tool `name` whose arguments follow `arguments`."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": arguments},
        "required": ["name", "arguments"],
    }


Constraint = JsonSchema | JsonObject | Regex | Choice | Grammar | ToolCalls


def only_one(given: Sequence[tuple[str, Constraint | None]]) -> Constraint | None:
    """The one constraint among a request's fields; 400 naming the second when several are set."""
    present = [(name, value) for name, value in given if value is not None]
    if len(present) > 1:
        names = ", ".join(name for name, _ in present)
        raise InvalidRequestError(
            f"give at most one output constraint; got {names}", param=present[1][0]
        )
    return present[0][1] if present else None
