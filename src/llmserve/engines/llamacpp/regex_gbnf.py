"""Regular expressions → GBNF, for `guided_regex`, `regex_pattern` and JSON-schema `pattern`.

The pattern is parsed by Python's own regex parser (`re._parser`, the one `re.compile` uses), so
escapes, classes, groups and quantifiers mean exactly what they mean to Python (and to
`jsonschema`, which validates `pattern` with `re.search`). Whatever llama.cpp's grammar cannot
express (lookarounds, backreferences, word boundaries, case-insensitive matching...) is refused
by name rather than approximated.

The grammar always generates a *full* match: an unanchored pattern is anchored, which only
narrows what may be generated (every full match is also a search match). Inside a JSON string,
characters that JSON must escape are generated escaped, and classes leave out control
characters, so the string decodes to a value that still matches.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from llmserve.core.limits import MAX_REPEAT_PRODUCT

# re._parser is private but is the parser of the `re` module itself; it has no type stubs.
_parser: Any = importlib.import_module("re._parser")
_sre: Any = importlib.import_module("re._constants")

MAX_REPEAT_COUNT = 1000  # larger counted repetitions make grammars too big to be useful
MAX_CODE_POINT = 0x10FFFF
ASCII_MAX = 0x7F
JSON_CONTROL_MAX = 0x1F  # JSON strings must escape U+0000..U+001F

Ranges = list[tuple[int, int]]  # sorted, non-overlapping, inclusive code point ranges

_DIGIT: Ranges = [(0x30, 0x39)]
_WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE: Ranges = [(0x09, 0x0D), (0x20, 0x20)]
_JSON_UNSAFE: Ranges = [(0x00, JSON_CONTROL_MAX), (0x22, 0x22), (0x5C, 0x5C)]
_JSON_SHORT_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n"}
_JSON_SHORT_ESCAPES |= {0x0D: "\\r", 0x09: "\\t"}


class RegexError(ValueError):
    """The pattern is invalid or uses a feature the grammar cannot enforce (named in `feature`)."""

    def __init__(self, message: str, feature: str) -> None:
        super().__init__(message)
        self.feature = feature


def regex_to_gbnf(pattern: str, *, json_string: bool = False) -> str:
    """A GBNF expression generating full matches of `pattern` (JSON-escaped if `json_string`)."""
    try:
        parsed = _parser.parse(pattern)
        flags = int(parsed.state.flags)
        _check_flags(flags)
        translator = _Translator(json_string)
        return translator.sequence(list(parsed.data), bool(flags & re.DOTALL), True, True)
    except re.error as exc:
        raise RegexError(f"invalid regular expression {pattern!r}: {exc}", "pattern") from None
    except RecursionError:
        raise RegexError("the regular expression is nested too deeply", "nesting") from None


def gbnf_literal(text: str) -> str:
    """`text` as a quoted GBNF string literal."""
    return '"' + "".join(_literal_char(ord(c)) for c in text) + '"'


def _check_flags(flags: int) -> None:
    if flags & re.IGNORECASE:
        raise RegexError("case-insensitive matching (?i) cannot be enforced by the grammar", "(?i)")


def _literal_char(cp: int) -> str:
    if cp == 0x22:
        return '\\"'
    if cp == 0x5C:
        return "\\\\"
    if 0x20 <= cp < ASCII_MAX:
        return chr(cp)
    return _hex_escape(cp)


def _class_char(cp: int) -> str:
    if chr(cp).isascii() and chr(cp).isalnum():
        return chr(cp)
    return _hex_escape(cp)


def _hex_escape(cp: int) -> str:
    if cp <= 0xFF:
        return f"\\x{cp:02X}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04X}"
    return f"\\U{cp:08X}"


def _json_text(cp: int) -> str:
    """How code point `cp` appears inside a JSON string."""
    short = _JSON_SHORT_ESCAPES.get(cp)
    if short is not None:
        return short
    if cp <= JSON_CONTROL_MAX:
        return f"\\u{cp:04x}"
    return chr(cp)


# ---- code point sets ------------------------------------------------------------------------


def _normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    merged: Ranges = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _complement(ranges: Ranges, top: int) -> Ranges:
    """Code points 0..top not in `ranges`."""
    out: Ranges = []
    start = 0
    for lo, hi in _normalize(ranges):
        if lo > top:
            break
        if lo > start:
            out.append((start, lo - 1))
        start = max(start, hi + 1)
    if start <= top:
        out.append((start, top))
    return out


def _subtract(ranges: Ranges, removed: Ranges) -> Ranges:
    keep = _complement(removed, MAX_CODE_POINT)
    out: Ranges = []
    for lo, hi in ranges:
        for klo, khi in keep:
            if klo <= hi and lo <= khi:
                out.append((max(lo, klo), min(hi, khi)))
    return _normalize(out)


def _intersect(ranges: Ranges, other: Ranges) -> Ranges:
    return _subtract(ranges, _complement(other, MAX_CODE_POINT))


def _category(name: str) -> Ranges:
    """ASCII subsets of \\d \\w \\s; negated categories are complemented within ASCII only.

    Python's categories are Unicode-aware; these subsets (and ASCII-only complements) never
    produce a character the pattern would reject.
    """
    table = {
        "CATEGORY_DIGIT": _DIGIT,
        "CATEGORY_WORD": _WORD,
        "CATEGORY_SPACE": _SPACE,
        "CATEGORY_NOT_DIGIT": _complement(_DIGIT, ASCII_MAX),
        "CATEGORY_NOT_WORD": _complement(_WORD, ASCII_MAX),
        "CATEGORY_NOT_SPACE": _complement([(0x00, 0x20), (0x7F, 0x7F)], ASCII_MAX),
    }
    found = table.get(name)
    if found is None:
        raise RegexError(f"character category {name} is not supported", name)
    return found


# ---- translation ----------------------------------------------------------------------------


class _Translator:
    """Walks the parsed pattern and writes one GBNF expression."""

    def __init__(self, json_string: bool) -> None:
        self.json_string = json_string
        self.repeat_product = 1  # product of the counts of the repetitions enclosing this item

    def sequence(self, items: Sequence[Any], dotall: bool, at_start: bool, at_end: bool) -> str:
        """A sequence of pattern items; anchors are allowed only where nothing precedes/follows."""
        parts: list[str] = []
        literal: list[int] = []
        consumed_before = False
        consuming = [i for i, (op, _) in enumerate(items) if str(op) != "AT"]
        last_consuming = consuming[-1] if consuming else -1
        for index, (op, arg) in enumerate(items):
            name = str(op)
            first = at_start and not consumed_before
            last = at_end and index >= last_consuming
            if name == "AT":
                self._anchor(str(arg), first, last)
                continue
            consumed_before = True
            if name == "LITERAL":
                literal.append(int(arg))
                continue
            if literal:
                parts.append(self._literal(literal))
                literal = []
            parts.append(self.item(name, arg, dotall, first, last))
        if literal:
            parts.append(self._literal(literal))
        return " ".join(parts) if parts else '""'

    @staticmethod
    def _anchor(kind: str, at_start: bool, at_end: bool) -> None:
        if kind in ("AT_BEGINNING", "AT_BEGINNING_STRING") and at_start:
            return
        if kind in ("AT_END", "AT_END_STRING") and at_end:
            return
        if kind in ("AT_BOUNDARY", "AT_NON_BOUNDARY"):
            raise RegexError("word boundaries (\\b, \\B) cannot be enforced by the grammar", "\\b")
        raise RegexError("^ and $ are only supported at the start and end of the pattern", "^ $")

    def item(self, name: str, arg: Any, dotall: bool, at_start: bool, at_end: bool) -> str:
        """One non-literal pattern item."""
        if name == "NOT_LITERAL":
            return self._char_class([(int(arg), int(arg))], negated=True)
        if name == "ANY":
            return self._char_class([] if dotall else [(0x0A, 0x0A)], negated=True)
        if name == "IN":
            return self._in(arg)
        if name == "BRANCH":
            alternatives = [self.sequence(list(alt), dotall, at_start, at_end) for alt in arg[1]]
            return "(" + " | ".join(alternatives) + ")"
        if name == "SUBPATTERN":
            return self._group(arg, dotall, at_start, at_end)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            return self._repeat(arg, dotall)
        raise RegexError(*_unsupported(name))

    def _group(self, arg: Any, dotall: bool, at_start: bool, at_end: bool) -> str:
        _group_id, add_flags, del_flags, body = arg
        _check_flags(int(add_flags))
        if add_flags & re.DOTALL:
            dotall = True
        if del_flags & re.DOTALL:
            dotall = False
        return "(" + self.sequence(list(body), dotall, at_start, at_end) + ")"

    def _repeat(self, arg: Any, dotall: bool) -> str:
        low, high, body = arg
        unbounded = high == _sre.MAXREPEAT
        if low > MAX_REPEAT_COUNT or (not unbounded and high > MAX_REPEAT_COUNT):
            raise RegexError(
                f"repetition counts above {MAX_REPEAT_COUNT} are not supported", "{m,n}"
            )
        factor = max(low, 1) if unbounded else high
        if factor > 1 and _nullable(body):
            # Each count may match nothing: every split of the text between them is a stack.
            raise RegexError(
                "a counted repetition of something that can match the empty string cannot be "
                "enforced efficiently (write the inner part without ?, * or {0,n})",
                "{m,n}",
            )
        enclosing = self.repeat_product
        if enclosing * factor > MAX_REPEAT_PRODUCT:
            raise RegexError(
                f"nested repetitions allow {enclosing * factor} combinations of counts; at most "
                f"{MAX_REPEAT_PRODUCT} are supported",
                "{m,n}",
            )
        self.repeat_product = enclosing * factor
        try:
            inner = "(" + self.sequence(list(body), dotall, False, False) + ")"
        finally:
            self.repeat_product = enclosing
        if unbounded:
            suffix = {0: "*", 1: "+"}.get(low, f"{{{low},}}")
        elif (low, high) == (0, 1):
            suffix = "?"
        else:
            suffix = f"{{{low}}}" if low == high else f"{{{low},{high}}}"
        return inner + suffix

    def _in(self, items: Sequence[Any]) -> str:
        negated = False
        has_category = False
        ranges: Ranges = []
        for op, arg in items:
            name = str(op)
            if name == "NEGATE":
                negated = True
            elif name == "LITERAL":
                ranges.append((int(arg), int(arg)))
            elif name == "RANGE":
                ranges.append((int(arg[0]), int(arg[1])))
            elif name == "CATEGORY":
                has_category = True
                ranges.extend(_category(str(arg)))
            else:
                raise RegexError(*_unsupported(name))
        if negated and has_category:
            # A negated Unicode category excludes non-ASCII characters we cannot list: stay ASCII.
            return self._char_class(_complement(ranges, ASCII_MAX), negated=False)
        return self._char_class(_normalize(ranges), negated=negated)

    def _literal(self, code_points: Sequence[int]) -> str:
        if not self.json_string:
            return '"' + "".join(_literal_char(cp) for cp in code_points) + '"'
        return gbnf_literal("".join(_json_text(cp) for cp in code_points))

    def _char_class(self, ranges: Ranges, *, negated: bool) -> str:
        if not self.json_string:
            return _class_expr(ranges, negated)
        if negated:
            return _class_expr(_normalize(ranges + _JSON_UNSAFE), negated=True)
        # `"` and `\` are generated escaped; control characters are left out of classes.
        safe = _subtract(ranges, _JSON_UNSAFE)
        escaped = [cp for cp in (0x22, 0x5C) if _intersect(ranges, [(cp, cp)])]
        options = ([_class_expr(safe, False)] if safe else []) + [
            gbnf_literal(_json_text(cp)) for cp in escaped
        ]
        if not options:
            raise RegexError(
                "a character class that only matches control characters cannot appear in a "
                "JSON string",
                "control characters",
            )
        return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"


def _nullable(items: Sequence[Any]) -> bool:
    """Whether a parsed pattern sequence can match the empty string."""
    return all(_item_nullable(str(op), arg) for op, arg in items)


def _item_nullable(name: str, arg: Any) -> bool:
    if name == "AT":
        return True
    if name == "BRANCH":
        return any(_nullable(list(alternative)) for alternative in arg[1])
    if name == "SUBPATTERN":
        return _nullable(list(arg[3]))
    if name in ("MAX_REPEAT", "MIN_REPEAT"):
        low, _high, body = arg
        return bool(low == 0 or _nullable(list(body)))
    return False  # characters, classes; unsupported items fail translation anyway


def _class_expr(ranges: Ranges, negated: bool) -> str:
    if not ranges and not negated:
        raise RegexError("an empty character class matches nothing", "empty class")
    body = "".join(
        _class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}" for lo, hi in ranges
    )
    if negated and not body:
        return f"[\\x00-{_hex_escape(MAX_CODE_POINT)}]"
    return f"[{'^' if negated else ''}{body}]"


def _unsupported(name: str) -> tuple[str, str]:
    features = {
        "ASSERT": "lookahead/lookbehind",
        "ASSERT_NOT": "negative lookahead/lookbehind",
        "GROUPREF": "backreferences",
        "GROUPREF_EXISTS": "conditional groups",
        "ATOMIC_GROUP": "atomic groups",
        "POSSESSIVE_REPEAT": "possessive quantifiers",
    }
    feature = features.get(name, name)
    return f"{feature} cannot be enforced by the grammar", feature
