"""Constraints → GBNF, checked against llama.cpp's own grammar sampler (no generation)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from llmserve.core.errors import InvalidRequestError
from llmserve.engines.llamacpp.regex_gbnf import RegexError, regex_to_gbnf
from tests.structured import gbnf as constraints
from tests.structured.oracle import GrammarOracle

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "nick": {"type": ["string", "null"]},
    },
    "required": ["name", "age", "tags"],
}


def grammar(schema: dict[str, Any]) -> str:
    return constraints.json_schema_grammar(schema, "response_format.json_schema.schema")


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ('{"name": "Bo", "age": 3, "tags": ["a"]}', True),
        ('{"name": "Bo", "age": -12, "tags": [], "nick": null}', True),
        ('{"name": "Bo", "age": 3, "tags": ["a"], "nick": "x"}', True),
        ('{"name": "Bo", "age": 3}', False),  # required `tags` missing
        ('{"name": "Bo", "age": 3.5, "tags": []}', False),  # not an integer
        ('{"name": "Bo", "age": 3, "tags": ["c"]}', False),  # not in the enum
        ('{"name": "Bo", "age": 3, "tags": ["a", "b", "a"]}', False),  # maxItems
        ('{"name": "Bobbybobby", "age": 3, "tags": []}', False),  # maxLength
        ('{"name": "Bo", "age": 3, "tags": [], "x": 1}', False),  # undeclared property
        ('{"name": "B\no", "age": 3, "tags": []}', False),  # raw control character
    ],
)
def test_schema_grammar_accepts_exactly_valid_json(
    oracle: GrammarOracle, text: str, ok: bool
) -> None:
    assert oracle.accepts(grammar(PERSON), text) is ok


def test_enum_and_property_names_with_escapes(oracle: GrammarOracle) -> None:
    schema = {
        "type": "object",
        "properties": {'we"ird\\key': {"enum": ["line\nbreak", "back\\slash", 'qu"ote']}},
        "required": ['we"ird\\key'],
    }
    g = grammar(schema)
    for value in schema["properties"]['we"ird\\key']["enum"]:  # type: ignore[index]
        assert oracle.accepts(g, json.dumps({'we"ird\\key': value}))
    assert not oracle.accepts(g, '{"we\\"ird\\\\key": "line\nbreak"}')


def test_refs_recursion_and_defs(oracle: GrammarOracle) -> None:
    schema = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"v": {"type": "integer"}, "kids": {"$ref": "#/$defs/nodes"}},
                "required": ["v"],
            },
            "nodes": {"type": "array", "items": {"$ref": "#/$defs/node"}},
        },
        "$ref": "#/$defs/node",
    }
    g = grammar(schema)
    assert oracle.accepts(g, '{"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": []}]}')
    assert not oracle.accepts(g, '{"v": 1, "kids": [{"w": 2}]}')


def test_string_formats_and_patterns(oracle: GrammarOracle) -> None:
    schema = {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "mail": {"type": "string", "format": "email"},
            "code": {"type": "string", "pattern": r"^[A-Z]{2}-\d{3}$"},
            "quote": {"type": "string", "pattern": r'^say "\w+"$'},
        },
        "required": ["day", "id", "mail", "code", "quote"],
    }
    g = grammar(schema)
    good = {
        "day": "2024-02-29",
        "id": "123e4567-e89b-12d3-a456-426614174000",
        "mail": "ann.lee@example.org",
        "code": "AB-123",
        "quote": 'say "hi"',
    }
    assert oracle.accepts(g, json.dumps(good))
    for key, bad in [("day", "2024-2-29"), ("code", "AB-12"), ("mail", "no-at-sign")]:
        assert not oracle.accepts(g, json.dumps(good | {key: bad}))


@pytest.mark.parametrize(
    ("bounds", "inside", "outside"),
    [
        ({"minimum": 0}, [0, 7, 1234567], [-1]),
        ({"minimum": -3, "maximum": 12}, [-3, 0, 9, 12], [-4, 13, 100]),
        ({"exclusiveMinimum": 1, "exclusiveMaximum": 10}, [2, 9], [1, 10]),
        ({"minimum": 1.5, "maximum": 3.5}, [2, 3], [1, 4]),
        ({"minimum": 5, "exclusiveMinimum": True}, [6], [5]),  # draft 4 spelling
        ({"maximum": -100}, [-100, -5000], [-99, 0]),
    ],
)
def test_integer_bounds(
    oracle: GrammarOracle, bounds: dict[str, Any], inside: list[int], outside: list[int]
) -> None:
    g = grammar({"type": "integer", **bounds})
    for number in inside:
        assert oracle.accepts(g, str(number)), number
    for number in outside:
        assert not oracle.accepts(g, str(number)), number
    assert not oracle.accepts(g, "01")


def test_json_object_grammar(oracle: GrammarOracle) -> None:
    g = constraints.json_object_grammar()
    assert oracle.accepts(g, '{"a": [1, 2.5e3, true, null, {"b": "c\\u00e9"}]}')
    assert oracle.accepts(g, "{}")
    assert not oracle.accepts(g, "[1]")
    assert not oracle.accepts(g, '{"a": 1')


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "number", "minimum": 0}, "`minimum` on a number"),
        ({"type": "number", "multipleOf": 2}, "`multipleOf`"),
        ({"type": "array", "items": {}, "uniqueItems": True}, "`uniqueItems`"),
        ({"type": "object", "patternProperties": {"a": {}}}, "`patternProperties`"),
        ({"not": {"type": "string"}}, "`not`"),
        ({"if": {}, "then": {}}, "`if`"),
        ({"type": "string", "format": "ipv6"}, "`format` 'ipv6'"),
        ({"type": "string", "pattern": "a+", "maxLength": 3}, "`maxLength` together with"),
        ({"type": "string", "pattern": "(?=a)a"}, "lookahead"),
        ({"type": "string", "pattern": r"(a)\1"}, "backreferences"),
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "`allOf`"),
        ({"$ref": "https://example.com/schema.json"}, "`$ref`"),
        ({"type": "object", "required": ["a"]}, "`required` property 'a'"),
        ({"type": "string", "maxLength": 100000}, "`maxLength` above"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer satisfies"),
        ({"anyOf": [{"type": "string"}], "type": "string"}, "`type` next to `anyOf`"),
    ],
)
def test_unsupported_schema_features_are_named(schema: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        grammar(schema)
    assert named in caught.value.message
    assert caught.value.param == "response_format.json_schema.schema"
    assert caught.value.status == 400


def test_annotations_and_neutral_keywords_are_fine(oracle: GrammarOracle) -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "T",
        "description": "d",
        "type": "object",
        "properties": {"a": {"type": "string", "default": "x", "examples": ["y"]}},
        "additionalProperties": False,
        "x-vendor": 1,
    }
    assert oracle.accepts(grammar(schema), '{"a": "z"}')


@pytest.mark.parametrize(
    ("pattern", "text", "ok"),
    [
        (r"\d{3}-\d{4}", "555-1234", True),
        (r"\d{3}-\d{4}", "555-123", False),
        (r"^(cat|dog)s?$", "dogs", True),
        (r"^(cat|dog)s?$", "cow", False),
        (r"[^a-c]+", "xyz", True),
        (r"[^a-c]+", "xaz", False),
        (r"\w+@\w+\.com", "me@site.com", True),
        (r"a.c", "a\nc", False),
        (r"(?s)a.c", "a\nc", True),
        (r"[\D]", "x", True),
        (r"[\D]", "7", False),
        (r'"q"', '"q"', True),
        (r"x{2,}", "xxxx", True),
        (r"x{2,}", "x", False),
    ],
)
def test_regex_grammar_matches_like_python(
    oracle: GrammarOracle, pattern: str, text: str, ok: bool
) -> None:
    assert (re.fullmatch(pattern, text) is not None) is ok  # the oracle agrees with Python
    assert oracle.accepts(constraints.regex_grammar(pattern, "guided_regex"), text) is ok


@pytest.mark.parametrize(
    ("pattern", "feature"),
    [
        ("(?=a)a", "lookahead"),
        ("(?!a)b", "negative lookahead"),
        (r"(a)\1", "backreferences"),
        (r"\bword", r"\b"),
        ("a^b", "^ $"),
        ("(?i)abc", "(?i)"),
        ("a{5000}", "{m,n}"),
        ("(?>a)", "atomic groups"),
        ("a++", "possessive quantifiers"),
        ("[", "pattern"),
    ],
)
def test_regex_features_the_grammar_cannot_enforce(pattern: str, feature: str) -> None:
    with pytest.raises(RegexError) as caught:
        regex_to_gbnf(pattern)
    assert feature in caught.value.feature
    with pytest.raises(InvalidRequestError) as error:
        constraints.regex_grammar(pattern, "guided_regex")
    assert error.value.param == "guided_regex"


def test_json_string_patterns_stay_valid_json(oracle: GrammarOracle) -> None:
    g = grammar({"type": "string", "pattern": r"^.{1,6}$"})
    assert oracle.accepts(g, '"ab cd"')
    assert not oracle.accepts(g, '"a"b"')  # `.` must not end the string early
    assert not oracle.accepts(g, '"a\nb"')  # nor emit a raw control character
    quoted = grammar({"type": "string", "pattern": r'^a"b\\c$'})
    assert oracle.accepts(quoted, json.dumps('a"b\\c'))


def test_choice_grammar(oracle: GrammarOracle) -> None:
    g = constraints.choice_grammar(["yes", "no", 'sa"y'], "guided_choice")
    assert oracle.accepts(g, "no")
    assert oracle.accepts(g, 'sa"y')
    assert not oracle.accepts(g, "maybe")
    with pytest.raises(InvalidRequestError):
        constraints.choice_grammar([], "guided_choice")


def test_gbnf_passthrough_is_the_kobold_hook() -> None:
    assert constraints.gbnf_grammar(None) is None
    assert constraints.gbnf_grammar("   ") is None
    assert constraints.gbnf_grammar('root ::= "a"') == 'root ::= "a"'
    with pytest.raises(InvalidRequestError) as caught:
        constraints.gbnf_grammar('start ::= "a"', "guided_grammar")
    assert caught.value.param == "guided_grammar"


def test_schema_given_as_json_text() -> None:
    assert constraints.json_schema_grammar('{"type": "boolean"}', "guided_json")
    with pytest.raises(InvalidRequestError) as caught:
        constraints.json_schema_grammar("{not json", "guided_json")
    assert caught.value.param == "guided_json"
