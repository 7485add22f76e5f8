"""Bounds on what one request may ask for: every size that becomes work or memory on the engine.

Each bound is generous next to what real clients send and small next to what would stall the
engine thread (which serves every stream) or let one request allocate without limit. They are
checked where every dialect passes (SamplingParams, and the constraint compilers), before any
engine sees the request; going past one is a 400 naming the field and the bound.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from llmserve.core.errors import InvalidRequestError

# OpenAI allows 4 stop strings; SillyTavern sends a dozen or more (instruct sequences, one
# "\nName:" per group member, custom stops) and KoboldCpp accepts 256. A token only touches the
# stop strings it continues or starts (core/stops.py), so the count costs little per token.
MAX_STOP_STRINGS = 256
MAX_STOP_LENGTH = 1000  # characters in one stop string (held back while it may still match)
MAX_STOP_TOKEN_IDS = 256  # checked for every sampled token
# Entries go into llama.cpp's logit-bias sampler, applied to every token of every sequence.
MAX_LOGIT_BIAS = 1024  # KoboldCpp: 512
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's and KoboldCpp's range; -100 already bans a token
# Banned token ids; Kobold's banned strings count once tokenized (KoboldCpp takes 768 strings).
MAX_BANNED_TOKENS = 4096
# Each DRY breaker costs a scan of the whole vocabulary when the sampler is built (on the engine
# thread, per choice: ~2 ms plus ~0.25 ms per character with a 49k vocabulary; 1,000 stalled
# every stream for 15 s). Clients send four by default (KoboldCpp would take 128); llama.cpp
# cuts a breaker at 40 characters anyway.
MAX_DRY_SEQUENCE_BREAKERS = 16
MAX_DRY_BREAKER_LENGTH = 40
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's and vLLM's maximum)

# llama.cpp's GBNF parser recurses once per nested group (about 400 bytes of C stack each): some
# 20,000 nested `(` overflow an 8 MB stack and kill the process. Text is bounded in UTF-8 bytes.
MAX_GRAMMAR_BYTES = 100_000  # a client's own GBNF
# Grammars compiled from schemas, tools, regexes and choices are ours: rules, shallow nesting,
# parsed in ~65 ms per 850 KB (128 tools). Their size only bounds parse time and memory.
MAX_COMPILED_GRAMMAR_BYTES = 1_000_000
MAX_GRAMMAR_DEPTH = 256  # nested ( ) groups, outside literals, classes and comments
# Containers nested in a JSON schema (an object property is two: the schema and `properties`):
# OpenAI's structured outputs allow 10 levels of objects, ~21 of these.
MAX_SCHEMA_DEPTH = 64
# The schema converter's work grows with the square of an object's optional properties (300 take
# 0.4 s; 1,000 exhaust its recursion).
MAX_SCHEMA_PROPERTIES = 256
# Counted repetitions nested in a regex multiply the grammar sampler's stacks: ("a"{1,32}){1,32}
# keeps ~1,000 alive and costs ~0.5 s per full-vocabulary check. The product of the upper bounds
# of nested repetitions is bounded; the shipped format patterns need 252.
MAX_REPEAT_PRODUCT = 256

GRAMMAR_ERROR_CODE = "invalid_grammar"

# GBNF tokens the depth scan must skip: a quoted literal, a [class], a # comment (escapes inside).
# (llama.cpp ends a comment at \r or \n.)
_GBNF_OPAQUE = re.compile(r'"(?:[^"\\]|\\.)*"?|\[(?:[^\]\\]|\\.)*\]?|#[^\r\n]*', re.DOTALL)
_NOT_PAREN = re.compile(r"[^()]+")


class GrammarLimitError(InvalidRequestError):
    """A grammar (given or compiled) is larger or deeper than the parser may safely see (400)."""

    code = GRAMMAR_ERROR_CODE


def check_grammar_text(grammar: str, param: str, max_bytes: int = MAX_GRAMMAR_BYTES) -> None:
    """Raise GrammarLimitError when `grammar` is over `max_bytes` or MAX_GRAMMAR_DEPTH."""
    check_grammar_size(grammar, param, max_bytes)
    check_grammar_depth(grammar, param)


def check_compiled_grammar(grammar: str, param: str) -> None:
    """The same for a grammar compiled from the field `param` (a schema, regex, tools...)."""
    check_grammar_size(
        grammar, param, MAX_COMPILED_GRAMMAR_BYTES, f"the grammar built from {param}"
    )
    check_grammar_depth(grammar, param, f"the grammar built from {param}")


def check_grammar_size(grammar: str, param: str, max_bytes: int, what: str = "") -> None:
    """Raise GrammarLimitError when `grammar` has more than `max_bytes` UTF-8 bytes."""
    size = len(grammar.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise GrammarLimitError(
            f"{what or param} has {size} bytes; at most {max_bytes} are accepted", param=param
        )


def check_grammar_depth(grammar: str, param: str, what: str = "") -> None:
    """Raise GrammarLimitError when `grammar` nests groups deeper than MAX_GRAMMAR_DEPTH."""
    depth = grammar_depth(grammar)
    if depth > MAX_GRAMMAR_DEPTH:
        raise GrammarLimitError(
            f"{what or param} nests groups {depth} levels deep; at most {MAX_GRAMMAR_DEPTH} are "
            "accepted",
            param=param,
        )


def grammar_depth(grammar: str) -> int:
    """The deepest nesting of ( ) groups in GBNF text, ignoring literals, classes and comments."""
    # Regexes (C) cut the text down to its grouping parentheses; only those are walked in Python.
    parens = _NOT_PAREN.sub("", _GBNF_OPAQUE.sub(" ", grammar))
    depth = deepest = 0
    for char in parens:
        if char == "(":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif depth:
            depth -= 1
    return deepest


def json_depth(value: Any) -> int:
    """How deeply containers nest in a JSON value (a scalar is 0), walked without recursion.

    The walk stops as soon as the depth exceeds MAX_SCHEMA_DEPTH: that is deep enough to refuse.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_SCHEMA_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_schema_depth(schema: Any, param: str) -> None:
    """Raise InvalidRequestError(code unsupported_schema) for a schema nested too deeply."""
    if json_depth(schema) > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(
            f"{param}: the schema nests more than {MAX_SCHEMA_DEPTH} levels deep",
            param=param,
            code="unsupported_schema",
        )


def load_json_text(text: str, param: str) -> Any:
    """Decode JSON sent inside a string field; too deep or invalid is a 400 naming `param`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidRequestError(
            f"{param}: the schema nests more than {MAX_SCHEMA_DEPTH} levels deep",
            param=param,
            code="unsupported_schema",
        ) from None
    except ValueError as exc:
        raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from None
