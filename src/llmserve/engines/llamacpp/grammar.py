"""Structured-output constraints (core/constraints' neutral values) compiled to GBNF for llama.cpp.

The engine compiles a request's constraint once, before its first token (a worker thread:
large schemas take time), and llama.cpp's grammar sampler enforces the result.

JSON schemas are converted by llama-cpp-python's `SchemaConverter` (a port of llama.cpp's
json-schema-to-grammar) with three repairs, and only after `_SchemaChecker` has rewritten the
schema into the subset the converter handles correctly. The converter silently ignores what it
does not know (`minimum`, `uniqueItems`, `maxLength` next to `pattern`, ...); the checker
refuses those instead, naming the keyword and where it is, so a response never claims a schema
it was not held to (integer bounds it does enforce, with a range rule of its own).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import RESERVED_NAMES, BuiltinRule, SchemaConverter

from llmserve.core import limits
from llmserve.core.constraints import (
    Choice,
    Constraint,
    Grammar,
    JsonObject,
    JsonSchema,
    Regex,
    ToolCalls,
    call_schema,
)
from llmserve.core.errors import InvalidRequestError
from llmserve.engines.llamacpp.regex_gbnf import RegexError, gbnf_literal, regex_to_gbnf

MAX_COUNT = 1000  # largest maxLength/maxItems: each unit of the bound becomes grammar rules
MAX_DIGITS = 16  # integers have at most this many digits, as the converter's own rule says
INT_RANGE = "x-llmserve-int-range"  # checked-schema key: [low, high] bounds of an integer
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

# JSON-string characters: anything but `"`, `\` and control characters, or an escape. The
# converter's own rule lets raw control characters through, which JSON parsers reject.
JSON_CHAR_RULE = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "$defs",
        "definitions",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",  # OpenAPI; the alternatives it names are still enforced through oneOf
        "nullable",  # OpenAPI 3.0; generating non-null values only is always valid
        "contentEncoding",
        "contentMediaType",
        "strict",
    }
)
# Keywords whose constraint the grammar cannot express: refused by name.
UNSUPPORTED = frozenset(
    {
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "minProperties",
        "maxProperties",
        "patternProperties",
        "propertyNames",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "if",
        "then",
        "else",
        "not",
        "unevaluatedItems",
        "unevaluatedProperties",
        "$dynamicRef",
        "$recursiveRef",
    }
)
NEUTRAL = {"uniqueItems": False}  # unsupported keywords that constrain nothing at these values
TYPE_KEYWORDS = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "prefixItems", "additionalItems", "minItems", "maxItems"}),
    "string": frozenset({"pattern", "format", "minLength", "maxLength"}),
    "number": frozenset(),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "boolean": frozenset(),
    "null": frozenset(),
}
COMBINATORS = frozenset({"$ref", "allOf", "anyOf", "oneOf", "const", "enum"})
NATIVE_FORMATS = frozenset(
    {"date", "time", "date-time", "uuid", "uuid1", "uuid3", "uuid4", "uuid5"}
)
# Formats the converter lacks, as patterns generating a conservative subset of valid values.
FORMAT_PATTERNS = {
    "email": r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63}){1,4}$",
    "ipv4": r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$",
    "hostname": r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?){0,4}$",
    "uri": r"^https?://[A-Za-z0-9.-]{1,253}(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]{0,200})?$",
}
ANY_VALUE: dict[str, Any] = {
    "anyOf": [{"type": t} for t in ("object", "array", "string", "number", "boolean", "null")]
}
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "null": (type(None),),
}


class SchemaError(InvalidRequestError):
    """A JSON schema uses a feature this compiler cannot enforce (named in the message)."""

    code = "unsupported_schema"


# ---- public API -------------------------------------------------------------------------------


def compile_constraint(constraint: Constraint) -> str:
    """GBNF enforcing `constraint`; refuses (400 naming its field) what GBNF cannot hold."""
    match constraint:
        case JsonSchema():
            return json_schema_grammar(constraint.schema, constraint.param)
        case JsonObject():
            return _convert({"type": "object"}, constraint.param)
        case Regex():
            return regex_grammar(constraint.pattern, constraint.param)
        case Choice():
            return choice_grammar(constraint.choices, constraint.param)
        case Grammar():
            return constraint.text
        case ToolCalls():
            return tool_calls_grammar(constraint)


def json_schema_grammar(schema: Mapping[str, Any], param: str) -> str:
    """GBNF for values valid against `schema`; refuses what it can't hold."""
    checked = check_schema(schema, param)
    return schema_grammar(checked.body, checked.defs, param)


def tool_calls_grammar(calls: ToolCalls) -> str:
    """GBNF for a call (or, when parallel, an array of calls) of one of the tools."""
    alternatives: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for index, tool in enumerate(calls.tools):
        checked = check_schema(tool.parameters_schema, tool.param, f"t{index}-")
        alternatives.append(call_schema(tool.name, checked.body))
        defs |= checked.defs
    call = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    if calls.parallel:
        call = {"anyOf": [call, {"type": "array", "items": call, "minItems": 1}]}
    return schema_grammar(call, defs, calls.param)


@dataclass(frozen=True)
class CheckedSchema:
    """A schema rewritten for the converter: its body and the `$defs` its references point to."""

    body: dict[str, Any]
    defs: dict[str, Any]


def check_schema(schema: Mapping[str, Any], param: str, ref_prefix: str = "") -> CheckedSchema:
    """Rewrite `schema` into what the converter handles; raise SchemaError naming what it can't.

    References become `#/$defs/<ref_prefix>ref-<n>-<name>`, so several checked schemas (one per
    tool) can share one document without their definitions colliding.
    """
    limits.check_schema_depth(schema, param)
    checker = _SchemaChecker(schema, param, ref_prefix)
    try:
        body = checker.node(schema, "#")
    except RecursionError:
        raise SchemaError(f"{param}: the schema is nested too deeply", param=param) from None
    return CheckedSchema(body, checker.defs)


def schema_grammar(body: Mapping[str, Any], defs: Mapping[str, Any], param: str) -> str:
    """GBNF for a checked schema body whose references point into `defs`."""
    if "$ref" in body:
        # The converter does not look for references inside a document whose root is one.
        body = {"anyOf": [body]}
    return _convert({**body, "$defs": defs} if defs else body, param)


def regex_grammar(pattern: str, param: str) -> str:
    """GBNF for text that fully matches the regular expression `pattern`."""
    try:
        grammar = "root ::= " + regex_to_gbnf(pattern)
    except RegexError as exc:
        raise SchemaError(f"{param}: {exc}", param=param) from None
    limits.check_compiled_grammar(grammar, param)
    return grammar


def choice_grammar(choices: Sequence[str], param: str) -> str:
    """GBNF for exactly one of `choices`."""
    grammar = "root ::= " + " | ".join(gbnf_literal(choice) for choice in choices)
    limits.check_compiled_grammar(grammar, param)
    return grammar


# ---- conversion -------------------------------------------------------------------------------


class _Converter(SchemaConverter):  # type: ignore[misc]  # untyped third-party base
    """llama-cpp-python's converter with three repairs (its literal escaping, strings, patterns).

    - literals (property names, enum/const values) escape backslashes, which it did not;
    - string characters exclude raw control characters, which JSON does not allow;
    - `pattern` goes through our regex translator, which knows \\d, \\w, \\s and keeps the value
      JSON-escaped (its own emits invalid GBNF for \\d and unescaped quotes for `.`);
    and one addition: integers with bounds (it ignores minimum/maximum).
    """

    def _format_literal(self, literal: str) -> str:
        return gbnf_literal(literal)

    def _add_primitive(self, name: str, rule: Any) -> str:
        if name == "char":
            rule = BuiltinRule(JSON_CHAR_RULE, [])
        return str(super()._add_primitive(name, rule))

    def visit(self, schema: Any, name: str) -> str:
        """Integer bounds get our range rule; everything else the converter's own handling."""
        bounds = schema.get(INT_RANGE) if isinstance(schema, Mapping) else None
        if bounds is None:
            return str(super().visit(schema, name))
        rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
        return str(self._add_rule(rule_name, integer_range_gbnf(*bounds) + " space"))

    def _visit_pattern(self, pattern: str, name: str) -> str:
        body = regex_to_gbnf(pattern, json_string=True)
        return str(self._add_rule(name, f'"\\"" {body} "\\"" space'))


def _convert(schema: Mapping[str, Any], param: str) -> str:
    converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "schema")
        converter.visit(resolved, "")
    except RegexError as exc:
        raise SchemaError(f"{param}: {exc}", param=param) from None
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SchemaError(
            f"{param}: the schema cannot be turned into a grammar: {exc}", param=param
        ) from None
    grammar = str(converter.format_grammar())
    limits.check_compiled_grammar(grammar, param)
    return grammar


# ---- checking ---------------------------------------------------------------------------------


class _SchemaChecker:
    """Rewrites a schema into the converter's safe subset, refusing what that subset lacks.

    Every `$ref` is resolved against the original document and its target moved under
    `$defs/<prefix>ref-<n>-<name>`, so rule names cannot collide with property names.
    """

    def __init__(self, root: Mapping[str, Any], param: str, ref_prefix: str) -> None:
        self.root = root
        self.param = param
        self.ref_prefix = ref_prefix
        self.defs: dict[str, Any] = {}
        self.ref_names: dict[str, str] = {}

    def fail(self, path: str, what: str) -> SchemaError:
        """The error for an unsupported feature at `path`."""
        return SchemaError(
            f"{self.param}: {what} (at {path}) cannot be enforced by structured output",
            param=self.param,
        )

    def node(self, schema: Any, path: str) -> dict[str, Any]:
        """One (sub)schema."""
        if schema is True:
            return ANY_VALUE
        if not isinstance(schema, Mapping):
            raise self.fail(path, "a schema that is not an object (or `true`)")
        for key in sorted(UNSUPPORTED & set(schema)):
            if NEUTRAL.get(key, object()) != schema[key]:
                raise self.fail(path, f"`{key}`")
        present = COMBINATORS & set(schema)
        if present:
            return self.combinator(schema, path, present)
        return self.typed_or_any(schema, path)

    def constraint_keys(self, schema: Mapping[str, Any], allowed: set[str]) -> list[str]:
        """Keys of `schema` that constrain and are not in `allowed` (annotations never do)."""
        known = COMBINATORS | {"type"} | set().union(*TYPE_KEYWORDS.values())
        return sorted(k for k in schema if k in known and k not in allowed | ANNOTATIONS)

    def combinator(
        self, schema: Mapping[str, Any], path: str, present: frozenset[str]
    ) -> dict[str, Any]:
        """`$ref`, `allOf`, `anyOf`/`oneOf`, `const`, `enum`: each alone (plus annotations)."""
        if "allOf" in present:
            return self.all_of(schema, path)
        key = next(k for k in ("$ref", "anyOf", "oneOf", "const", "enum") if k in present)
        allowed: set[str] = {key, "type"} if key in ("const", "enum") else {key}
        extra = self.constraint_keys(schema, allowed)
        if extra:
            raise self.fail(path, f"`{extra[0]}` next to `{key}`")
        if key == "$ref":
            return {"$ref": self.ref(schema["$ref"], path)}
        if key in ("anyOf", "oneOf"):
            return self.any_of(schema[key], f"{path}/{key}")
        if key == "const":
            return {"const": schema["const"]}
        return self.enum(schema, path)

    def all_of(self, schema: Mapping[str, Any], path: str) -> dict[str, Any]:
        """A one-element allOf (pydantic v1 wraps `$ref`s so) is merged into its parent."""
        parts = schema["allOf"]
        if not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], Mapping):
            raise self.fail(path, "`allOf` with more than one schema")
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        clash = self.constraint_keys(rest, set()) and self.constraint_keys(parts[0], set())
        if clash:
            raise self.fail(path, "`allOf` next to other constraints")
        return self.node({**rest, **parts[0]}, f"{path}/allOf/0")

    def any_of(self, options: Any, path: str) -> dict[str, Any]:
        """anyOf; oneOf too: its alternatives are taken to be disjoint, as generated models' are."""
        if not isinstance(options, list) or not options:
            raise self.fail(path, "an empty or malformed list of alternatives")
        return {"anyOf": [self.node(option, f"{path}/{i}") for i, option in enumerate(options)]}

    def enum(self, schema: Mapping[str, Any], path: str) -> dict[str, Any]:
        """enum values, keeping only those of the declared type(s)."""
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise self.fail(path, "an empty `enum`")
        types = schema.get("type")
        if types is not None:
            names = types if isinstance(types, list) else [types]
            values = [v for v in values if any(_is_type(v, str(t)) for t in names)]
            if not values:
                raise self.fail(path, "an `enum` with no value of its `type`")
        return {"enum": values}

    def ref(self, pointer: Any, path: str) -> str:
        """The rewritten `$ref` for a local JSON pointer."""
        if not isinstance(pointer, str) or not (pointer == "#" or pointer.startswith("#/")):
            raise self.fail(path, f"`$ref` {pointer!r} (only local references `#/...` work)")
        name = self.ref_names.get(pointer)
        if name is None:
            last = pointer.rsplit("/", 1)[-1] or "root"
            name = f"{self.ref_prefix}ref-{len(self.ref_names)}-{last}"
            self.ref_names[pointer] = name
            self.defs[name] = self.node(self.resolve(pointer, path), pointer)
        return f"#/$defs/{name}"

    def resolve(self, pointer: str, path: str) -> Any:
        """The target of a local JSON pointer in the original schema."""
        target: Any = self.root
        for raw in pointer[2:].split("/") if pointer != "#" else []:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise self.fail(path, f"`$ref` {pointer!r}, which points nowhere")
        return target

    def typed_or_any(self, schema: Mapping[str, Any], path: str) -> dict[str, Any]:
        """A schema by its `type` (a list becomes anyOf; none is inferred from the keywords)."""
        types = schema.get("type")
        if types is None:
            implied = [t for t, keys in TYPE_KEYWORDS.items() if keys & set(schema)]
            if len(implied) > 1:
                raise self.fail(path, f"keywords of several types ({', '.join(implied)})")
            if not implied:
                return ANY_VALUE
            types = implied[0]
        if isinstance(types, list):
            if not types:
                raise self.fail(path, "an empty `type` list")
            options = [self.typed(schema, str(t), path) for t in types]
            return options[0] if len(options) == 1 else {"anyOf": options}
        return self.typed(schema, str(types), path)

    def typed(self, schema: Mapping[str, Any], type_name: str, path: str) -> dict[str, Any]:
        """One type with the keywords that apply to it."""
        if type_name not in TYPE_KEYWORDS:
            raise self.fail(path, f"`type` {type_name!r}")
        if type_name == "object":
            return self.object(schema, path)
        if type_name == "array":
            return self.array(schema, path)
        if type_name == "string":
            return self.string(schema, path)
        if type_name == "integer":
            return self.integer(schema, path)
        bound = next((key for key in BOUNDS if key in schema), None)
        if type_name == "number" and bound is not None:
            raise self.fail(path, f"`{bound}` on a number (integers only)")
        return {"type": type_name}

    def integer(self, schema: Mapping[str, Any], path: str) -> dict[str, Any]:
        """Integers, with inclusive bounds from minimum/maximum and their exclusive forms."""
        low = self.bound(schema, "minimum", "exclusiveMinimum", path, 1)
        high = self.bound(schema, "maximum", "exclusiveMaximum", path, -1)
        if low is None and high is None:
            return {"type": "integer"}
        if low is not None and high is not None and low > high:
            raise self.fail(path, "integer bounds that no integer satisfies")
        return {"type": "integer", INT_RANGE: [low, high]}

    def bound(
        self, schema: Mapping[str, Any], inclusive: str, exclusive: str, path: str, side: int
    ) -> int | None:
        """The tightest integer bound on one side (`side` 1: lower, -1: upper), or None."""
        found: list[int] = []
        flag = schema.get(exclusive)
        if schema.get(inclusive) is not None:
            value = self.number(schema[inclusive], inclusive, path)
            found.append(_integer_bound(value, side, strict=flag is True))  # draft 4: a flag
        if flag is not None and not isinstance(flag, bool):
            found.append(_integer_bound(self.number(flag, exclusive, path), side, strict=True))
        if not found:
            return None
        result = max(found) if side > 0 else min(found)
        if len(str(abs(result))) > MAX_DIGITS:
            raise self.fail(path, f"`{inclusive}` beyond {MAX_DIGITS} digits")
        return result

    def number(self, value: Any, key: str, path: str) -> float:
        """A bound's value, checked to be a finite number."""
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.fail(path, f"`{key}` that is not a number")
        return value

    def object(self, schema: Mapping[str, Any], path: str) -> dict[str, Any]:
        """Declared properties only; without any, a generic object or a typed map."""
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        additional = schema.get("additionalProperties")
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            raise self.fail(path, "malformed `properties` or `required`")
        if len(properties) > limits.MAX_SCHEMA_PROPERTIES:
            raise self.fail(
                path, f"an object with more than {limits.MAX_SCHEMA_PROPERTIES} properties"
            )
        missing = [name for name in required if name not in properties]
        if missing:
            raise self.fail(path, f"`required` property {missing[0]!r} without a schema")
        if properties:
            # Extra keys are never generated next to declared ones: a generated extra key could
            # repeat a declared name with a value that does not fit its schema.
            return {
                "type": "object",
                "properties": {
                    name: self.node(sub, f"{path}/properties/{name}")
                    for name, sub in properties.items()
                },
                "required": list(required),
            }
        if additional is False:
            return {"type": "object", "properties": {}}
        if isinstance(additional, Mapping):
            value = self.node(additional, f"{path}/additionalProperties")
            return {"type": "object", "additionalProperties": value}
        return {"type": "object"}

    def array(self, schema: Mapping[str, Any], path: str) -> dict[str, Any]:
        """Arrays: `items` with min/maxItems, or a fixed tuple from `prefixItems`."""
        low = self.count(schema, "minItems", path, 0) or 0
        high = self.count(schema, "maxItems", path, None)
        items = schema.get("items")
        prefix = schema.get("prefixItems")
        if isinstance(items, list):  # draft 4-7 tuples
            prefix, items = items, None
        if prefix is not None:
            if not isinstance(prefix, list) or len(prefix) < low or (high and len(prefix) > high):
                raise self.fail(path, "`prefixItems` whose length breaks minItems/maxItems")
            # Exactly the prefix is generated: valid whatever `items` says about later ones.
            return {
                "type": "array",
                "prefixItems": [
                    self.node(s, f"{path}/prefixItems/{i}") for i, s in enumerate(prefix)
                ],
            }
        if items is False:
            return {"type": "array", "prefixItems": []}
        out: dict[str, Any] = {
            "type": "array",
            "items": self.node(True if items is None else items, f"{path}/items"),
        }
        if low:
            out["minItems"] = low
        if high is not None:
            out["maxItems"] = high
        return out

    def string(self, schema: Mapping[str, Any], path: str) -> dict[str, Any]:
        """Strings: one of pattern, format, or min/maxLength."""
        pattern = schema.get("pattern")
        fmt = schema.get("format")
        if fmt in FORMAT_PATTERNS:
            if pattern is not None:
                raise self.fail(path, f"`format` {fmt!r} together with `pattern`")
            pattern, fmt = FORMAT_PATTERNS[fmt], None
        if fmt is not None and fmt not in NATIVE_FORMATS:
            raise self.fail(path, f"`format` {fmt!r}")
        lengths = [k for k in ("minLength", "maxLength") if k in schema]
        kinds = [k for k, v in (("pattern", pattern), ("format", fmt)) if v is not None] + lengths
        if pattern is not None and len(kinds) > 1:
            raise self.fail(path, f"`{kinds[1]}` together with `pattern`")
        if fmt is not None and len(kinds) > 1:
            raise self.fail(path, f"`{kinds[1]}` together with `format`")
        if pattern is not None:
            self.check_pattern(pattern, path)
            return {"type": "string", "pattern": pattern}
        if fmt is not None:
            return {"type": "string", "format": fmt}
        out: dict[str, Any] = {"type": "string"}
        low = self.count(schema, "minLength", path, 0)
        high = self.count(schema, "maxLength", path, None)
        if low:
            out["minLength"] = low
        if high is not None:
            out["maxLength"] = high
        return out

    def check_pattern(self, pattern: Any, path: str) -> None:
        """Fail early (with the path) on a pattern the translator refuses."""
        if not isinstance(pattern, str):
            raise self.fail(path, "a `pattern` that is not a string")
        try:
            regex_to_gbnf(pattern, json_string=True)
        except RegexError as exc:
            message = f"{self.param}: `pattern` {pattern!r} (at {path}): {exc}"
            raise SchemaError(message, param=self.param) from None

    def count(
        self, schema: Mapping[str, Any], key: str, path: str, default: int | None
    ) -> int | None:
        """A non-negative integer bound, at most MAX_COUNT."""
        value = schema.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(path, f"`{key}` that is not a non-negative integer")
        if value > MAX_COUNT:
            raise self.fail(path, f"`{key}` above {MAX_COUNT}")
        return value


def _is_type(value: Any, type_name: str) -> bool:
    if type_name in ("number", "integer") and isinstance(value, bool):
        return False
    if type_name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, JSON_TYPES.get(type_name, ()))


# ---- integer ranges ---------------------------------------------------------------------------


def _integer_bound(value: float, side: int, strict: bool) -> int:
    """The first integer on the allowed side of `value` (at it if allowed and not `strict`)."""
    if side > 0:
        return math.floor(value) + 1 if strict else math.ceil(value)
    return math.ceil(value) - 1 if strict else math.floor(value)


def integer_range_gbnf(low: int | None, high: int | None) -> str:
    """GBNF for the decimal integers in [low, high] (None: unbounded), as JSON writes them."""
    options: list[str] = []
    if low is None or low < 0:
        # Negative numbers are "-" then a magnitude in [max(1, -high), -low].
        magnitude_low = 1 if high is None or high >= 0 else -high
        magnitude_high = None if low is None else -low
        options.append(f'"-" ({_natural_range(magnitude_low, magnitude_high)})')
    if high is None or high >= 0:
        options.append(_natural_range(max(low or 0, 0), high))
    return "(" + " | ".join(options) + ")"


def _natural_range(low: int, high: int | None) -> str:
    """Non-negative integers in [low, high] without leading zeros, one option per digit count."""
    top = 10**MAX_DIGITS - 1 if high is None else high
    options = []
    for width in range(len(str(low)), len(str(top)) + 1):
        start = max(low, 0 if width == 1 else 10 ** (width - 1))
        end = min(top, 10**width - 1)
        if start <= end:
            options.append(_same_width(str(start), str(end)))
    return " | ".join(options)


def _same_width(low: str, high: str) -> str:
    """Digit strings of one width from `low` to `high` (leading zeros allowed past the first)."""
    width = len(low)
    if low == "0" * width and high == "9" * width:
        return f"[0-9]{{{width}}}"
    if width == 1:
        return f"[{low}-{high}]"
    if low[0] == high[0]:
        return f'"{low[0]}" ({_same_width(low[1:], high[1:])})'
    options = [f'"{low[0]}" ({_same_width(low[1:], "9" * (width - 1))})']
    if int(low[0]) + 1 <= int(high[0]) - 1:
        options.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}] [0-9]{{{width - 1}}}")
    options.append(f'"{high[0]}" ({_same_width("0" * (width - 1), high[1:])})')
    return " | ".join(options)
