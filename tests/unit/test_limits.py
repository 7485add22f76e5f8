"""Bounds on request sizes (core/limits.py): each one refused with a 400 naming the field."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from llmserve.core import limits, stops
from llmserve.core.constraints import Grammar
from llmserve.core.errors import InvalidRequestError
from llmserve.core.params import DrySettings, SamplingParams
from llmserve.core.stops import StopMatcher
from llmserve.core.tools import ToolChoice, ToolFunction, ToolPlan
from tests.structured import gbnf as constraints


def refused(call: Any, *args: Any, **kwargs: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        call(*args, **kwargs)
    assert caught.value.status == 400
    return caught.value


# ---- SamplingParams --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop": tuple(f"s{i}" for i in range(limits.MAX_STOP_STRINGS + 1))}, "stop"),
        ({"stop": ("x" * (limits.MAX_STOP_LENGTH + 1),)}, "stop"),
        ({"stop_token_ids": tuple(range(limits.MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
        ({"banned_token_ids": tuple(range(limits.MAX_BANNED_TOKENS + 1))}, "banned_tokens"),
        ({"logit_bias": dict.fromkeys(range(limits.MAX_LOGIT_BIAS + 1), 1.0)}, "logit_bias"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: -101.0}}, "logit_bias"),
        ({"logit_bias": {5: float("-inf")}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"logprobs": limits.MAX_LOGPROBS + 1}, "logprobs"),
        ({"prompt_logprobs": limits.MAX_LOGPROBS + 1}, "prompt_logprobs"),
        ({"penalty_range": -5}, "penalty_range"),
    ],
)
def test_sampling_params_past_a_limit_are_refused(fields: dict[str, Any], param: str) -> None:
    assert refused(SamplingParams, **fields).param == param


def test_grammar_constraints_are_bounded_however_they_are_made() -> None:
    deep = "root ::= " + "(" * 300 + '"a"' + ")" * 300
    assert refused(Grammar, deep).param == "grammar"
    assert refused(Grammar, 'start ::= "a"', "guided_grammar").param == "guided_grammar"


def test_sampling_params_at_the_limits_are_accepted() -> None:
    params = SamplingParams(
        stop=("x" * limits.MAX_STOP_LENGTH, *(f"s{i}" for i in range(limits.MAX_STOP_STRINGS - 1))),
        stop_token_ids=tuple(range(limits.MAX_STOP_TOKEN_IDS)),
        banned_token_ids=tuple(range(limits.MAX_BANNED_TOKENS)),
        logit_bias={1: -100.0, 2: 100.0, 3: 0},
        logprobs=limits.MAX_LOGPROBS,
        dry=DrySettings(
            multiplier=0.8,
            sequence_breakers=("z" * limits.MAX_DRY_BREAKER_LENGTH,)
            * limits.MAX_DRY_SEQUENCE_BREAKERS,
        ),
    )
    assert len(params.stop) == limits.MAX_STOP_STRINGS


@pytest.mark.parametrize(
    "breakers",
    [
        tuple(str(i) for i in range(limits.MAX_DRY_SEQUENCE_BREAKERS + 1)),
        ("y" * (limits.MAX_DRY_BREAKER_LENGTH + 1),),
    ],
)
def test_dry_breakers_past_a_limit_are_refused(breakers: tuple[str, ...]) -> None:
    error = refused(DrySettings, multiplier=0.8, sequence_breakers=breakers)
    assert error.param == "dry_sequence_breakers"


# ---- grammar text ----------------------------------------------------------------------------


def nested_grammar(depth: int) -> str:
    return "root ::= " + "(" * depth + '"a"' + ")" * depth


def test_grammar_depth_ignores_literals_classes_and_comments() -> None:
    text = 'root ::= ("(((" [(((] "\\"((" ) # ((((((\nx ::= ((("a"))) [\\](]'
    assert limits.grammar_depth(text) == 3
    # llama.cpp ends a comment at a carriage return: what follows it counts.
    assert limits.grammar_depth('root ::= "a" # ((((\r ((("b")))') == 3


@pytest.mark.parametrize("depth", [limits.MAX_GRAMMAR_DEPTH + 1, 40_000])
def test_deeply_nested_gbnf_is_refused_before_llama_cpp(depth: int) -> None:
    error = refused(constraints.gbnf_grammar, nested_grammar(depth), "guided_grammar")
    assert (error.param, error.code) == ("guided_grammar", "invalid_grammar")
    assert str(limits.MAX_GRAMMAR_DEPTH) in error.message


def test_the_crashing_grammar_is_refused() -> None:
    """About 60,000 nested groups (120 KB) overflowed llama.cpp's parser: SIGSEGV."""
    error = refused(constraints.gbnf_grammar, nested_grammar(60_000), "grammar")
    assert (error.param, error.code) == ("grammar", "invalid_grammar")


def test_gbnf_at_the_depth_limit_is_accepted() -> None:
    text = nested_grammar(limits.MAX_GRAMMAR_DEPTH)
    assert constraints.gbnf_grammar(text, "grammar") == text


def test_oversized_gbnf_is_refused() -> None:
    text = 'root ::= "' + "a" * limits.MAX_GRAMMAR_BYTES + '"'
    error = refused(constraints.gbnf_grammar, text, "grammar")
    assert error.code == "invalid_grammar"
    assert str(limits.MAX_GRAMMAR_BYTES) in error.message


def test_size_is_counted_in_utf8_bytes() -> None:
    text = 'root ::= "' + "é" * (limits.MAX_GRAMMAR_BYTES // 2) + '"'
    assert len(text) < limits.MAX_GRAMMAR_BYTES
    assert refused(limits.check_grammar_text, text, "grammar").code == "invalid_grammar"


def test_choice_grammar_too_large_is_refused() -> None:
    choices = [f"choice number {i}" for i in range(60_000)]
    error = refused(constraints.choice_grammar, choices, "guided_choice")
    assert (error.param, error.code) == ("guided_choice", "invalid_grammar")


# ---- regexes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "((a{1,1000}){1,1000}){1,1000}",
        "(a{1,17}){1,16}",
        "(a{0,40}){0,40}",  # a body that may match nothing: every split is a grammar stack
        "(a?){0,100}",
        "(a*){2,5}",
        "(" * 300 + "a" + ")" * 300,
    ],
)
def test_regex_bombs_are_refused(pattern: str) -> None:
    error = refused(constraints.regex_grammar, pattern, "guided_regex")
    assert error.param == "guided_regex"


@pytest.mark.parametrize(
    "pattern",
    [*constraints.FORMAT_PATTERNS.values(), r"(\d{1,3}\.){3}\d{1,3}", "(a{1,16}){1,16}", "(a+)+"],
)
def test_ordinary_regexes_still_compile(pattern: str) -> None:
    assert constraints.regex_grammar(pattern, "guided_regex").startswith("root ::= ")


def test_schema_pattern_bomb_is_refused() -> None:
    schema = {"type": "string", "pattern": "^(a{0,40}){0,40}$"}
    assert refused(constraints.json_schema_grammar, schema, "guided_json").param == "guided_json"


# ---- schemas ---------------------------------------------------------------------------------


def nested_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def deep_json_text(levels: int) -> str:
    # json.dumps itself would recurse too deeply: write the text directly.
    opening = '{"type": "object", "required": ["a"], "properties": {"a": '
    return opening * levels + '{"type": "string"}' + "}}" * levels


@pytest.mark.parametrize("levels", [40, 5000])
def test_deep_schema_text_is_a_400_not_a_recursion_error(levels: int) -> None:
    error = refused(constraints.json_schema_grammar, deep_json_text(levels), "guided_json")
    assert (error.param, error.code) == ("guided_json", "unsupported_schema")
    assert str(limits.MAX_SCHEMA_DEPTH) in error.message


def test_deep_schema_object_is_refused_and_a_modest_one_compiles() -> None:
    error = refused(constraints.json_schema_grammar, nested_schema(40), "response_format")
    assert error.code == "unsupported_schema"
    assert "root ::=" in constraints.json_schema_grammar(nested_schema(10), "guided_json")


def test_deep_tool_parameters_are_refused() -> None:
    tool = ToolFunction(name="f", parameters=nested_schema(40))
    error = refused(ToolPlan, (tool,))
    assert error.param == "tools[0].function.parameters"


def test_json_depth_counts_containers() -> None:
    assert limits.json_depth(3) == 0
    assert limits.json_depth({"a": [1, {"b": []}]}) == 4
    assert limits.json_depth(json.loads("[" * 50 + "]" * 50)) == 50


# ---- stop matching ---------------------------------------------------------------------------


def reference(text: str, stop_strings: tuple[str, ...]) -> tuple[str, str | None]:
    """What a stop matcher must produce: text before the first stop to end, longest on ties."""
    best: tuple[int, int, str] | None = None
    for stop in stop_strings:
        at = text.find(stop)
        if at >= 0:
            key = (at + len(stop), -len(stop), stop)
            best = key if best is None or key < best else best
    if best is None:
        return text, None
    end, _, stop = best
    return text[: end - len(stop)], stop


def run(matcher: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = []
    for piece in pieces:
        emitted, matched = matcher.feed(piece)
        out.append(emitted)
        if matched is not None:
            return "".join(out), matched
    return "".join(out) + matcher.flush(), None


def split_randomly(text: str, rng: random.Random) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        size = rng.randint(1, 6)
        pieces.append(text[start : start + size])
        start += size
    return pieces


def test_stop_matching_agrees_with_a_reference_on_long_outputs() -> None:
    rng = random.Random(7)
    for _ in range(300):
        stop_strings = tuple(
            "".join(rng.choice("ab") for _ in range(rng.randint(1, 8))) for _ in range(3)
        )
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 400)))
        assert run(StopMatcher(stop_strings), split_randomly(text, rng)) == reference(
            text, stop_strings
        )


def test_stop_matching_never_emits_a_partial_stop() -> None:
    matcher = StopMatcher(("END",))
    assert matcher.feed("abcE") == ("abc", None)
    assert matcher.feed("N") == ("", None)
    assert matcher.feed("D!") == ("", "END")


def test_stop_matching_work_per_piece_does_not_grow_with_held_back_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A held-back prefix of a long stop string is not rescanned per token, nor are stop
    strings the text does not touch."""
    steps = 0
    advance = stops._StopState.advance

    def counted(self: stops._StopState, char: str) -> bool:
        nonlocal steps
        steps += 1
        return advance(self, char)

    monkeypatch.setattr(stops._StopState, "advance", counted)
    long_stop = "a" * (limits.MAX_STOP_LENGTH - 1) + "b"
    others = [f"z{i}" for i in range(limits.MAX_STOP_STRINGS - 1)]
    matcher = StopMatcher((long_stop, *others))
    for _ in range(limits.MAX_STOP_LENGTH - 1):
        assert matcher.feed("a") == ("", None)  # all held back: it may still become the stop
    assert steps == limits.MAX_STOP_LENGTH - 1  # one step per character, for the one stop
    assert matcher.feed("b") == ("", long_stop)


def test_an_object_with_too_many_properties_is_refused() -> None:
    properties = {f"p{i}": {"type": "string"} for i in range(limits.MAX_SCHEMA_PROPERTIES + 1)}
    schema = {"type": "object", "properties": properties}
    error = refused(constraints.json_schema_grammar, schema, "guided_json")
    assert (error.param, error.code) == ("guided_json", "unsupported_schema")


def test_compiled_grammars_may_exceed_the_hand_written_size_bound() -> None:
    """A forced call among 50 tools compiles to ~330 KB of GBNF: ours, shallow, still accepted."""
    properties: dict[str, Any] = {f"p{j}": {"type": "string"} for j in range(6)}
    properties["mode"] = {"type": "string", "enum": ["fast", "slow"]}
    properties["count"] = {"type": "integer", "minimum": 0, "maximum": 1000}
    tools = tuple(
        ToolFunction(name=f"tool_{i}", parameters={"type": "object", "properties": properties})
        for i in range(50)
    )
    grammar = constraints.tool_grammar(ToolPlan(tools, ToolChoice.REQUIRED))
    assert grammar is not None
    assert limits.MAX_GRAMMAR_BYTES < len(grammar) < limits.MAX_COMPILED_GRAMMAR_BYTES
