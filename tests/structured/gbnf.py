"""Neutral constraints compiled by the llama.cpp engine's GBNF compiler, one call each (tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmserve.core.constraints import Choice, Grammar, JsonObject, JsonSchema, Regex
from llmserve.core.tools import ToolPlan
from llmserve.engines.llamacpp.grammar import FORMAT_PATTERNS, compile_constraint

__all__ = ["FORMAT_PATTERNS"]


def json_schema_grammar(schema: Any, param: str) -> str:
    """A schema (object or JSON text) as the engine compiles it."""
    return compile_constraint(JsonSchema.of(schema, param))


def json_object_grammar() -> str:
    """Any JSON object."""
    return compile_constraint(JsonObject())


def regex_grammar(pattern: str, param: str) -> str:
    """A full-match regex."""
    return compile_constraint(Regex(pattern, param))


def choice_grammar(choices: Sequence[str], param: str) -> str:
    """One of `choices`."""
    return compile_constraint(Choice(tuple(choices), param))


def gbnf_grammar(text: str | None, param: str = "grammar") -> str | None:
    """A client's own GBNF as it reaches the engine (None when blank)."""
    grammar = Grammar.of(text, param)
    return None if grammar is None else compile_constraint(grammar)


def tool_grammar(plan: ToolPlan) -> str | None:
    """The forced-call grammar of a tool plan (None when no call is forced)."""
    constraint = plan.constraint()
    return None if constraint is None else compile_constraint(constraint)
