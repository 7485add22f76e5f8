"""Schemathesis on the real engine: generated requests may not get a 5xx or a malformed answer.

The fake-engine pass (test_schemathesis.py) covers the HTTP layer; this one sends bodies that
pass validation on to the real default model, for the generation routes of every dialect and
the token routes. It is bounded: derandomized (the same cases in every run), a few dozen
examples per route, every generation cut to GENERATED_TOKENS, no shrinking.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import response_schema_conformance
from schemathesis.core.transport import Response
from schemathesis.generation import GenerationMode

from tests.server import RunningServer

GENERATION_ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/api/v1/generate",
    "/api/extra/generate/stream",
    "/inference",
)
TOKEN_ROUTES = (
    "/v1/token/encode",
    "/v1/token/decode",
    "/tokenize",
    "/detokenize",
    "/api/extra/tokencount",
)
EXAMPLES = 30  # schema-valid bodies per route
INVALID_EXAMPLES = 20  # schema-violating bodies per route (the fake-engine pass has more)
GENERATED_TOKENS = 4  # the most any fuzzed request may generate, per choice
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_length", "min_tokens")
# The field that bounds a generation where it is not `max_tokens` (Kobold's default is 180).
LIMIT_FIELDS = {"/api/v1/generate": "max_length", "/api/extra/generate/stream": "max_length"}
CLIENT_ERROR_STATUSES = {400, 401, 403, 404, 405, 409, 413, 415, 422, 429}
Problems = list[str]


def shorten(case: schemathesis.Case) -> schemathesis.Case:
    """Keep a real-model case short (a few tokens, one choice) and its prompt non-empty."""
    if isinstance(case.body, dict):
        for field in TOKEN_LIMITS:
            value = case.body.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool):
                # Floats too: 1e6 passes as an integer, and an unbounded generation is slow.
                case.body[field] = max(1, min(value, GENERATED_TOKENS))
        case.body.setdefault(LIMIT_FIELDS.get(case.path, "max_tokens"), GENERATED_TOKENS)
        case.body["n"] = 1
        case.body.pop("best_of", None)
        if case.body.get("prompt") in ("", []):
            # Generated prompts are often empty: a 400 the fake-engine pass already covers.
            case.body["prompt"] = "Hi"
    return case


def header(response: Response, name: str) -> str:
    """One response header, whatever its case."""
    for key, values in response.headers.items():
        if key.lower() == name:
            return values[0] if values else ""
    return ""


def error_problems(path: str, status: int, text: str) -> Problems:
    """What is wrong with a 4xx: its status, or a body not in the dialect's error shape."""
    if status not in CLIENT_ERROR_STATUSES:
        return [f"unexpected status {status}: {text[:300]}"]
    try:
        body = json.loads(text)
    except ValueError:
        return [f"{status} is not JSON: {text[:300]}"]
    if path.startswith("/api/"):  # KoboldCpp: {"detail": {"msg", "type"}}
        detail = body.get("detail") if isinstance(body, dict) else None
        if not (isinstance(detail, dict) and isinstance(detail.get("msg"), str)):
            return [f"{status} not in Kobold's error shape: {text[:300]}"]
        return [] if detail.get("type") != "server_error" else [f"{status} says server_error"]
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(error, dict) and isinstance(error.get("message"), str)):
        return [f"{status} not in OpenAI's error shape: {text[:300]}"]
    return [] if error.get("type") != "server_error" else [f"{status} says server_error"]


def stream_problems(path: str, text: str) -> Problems:
    """What is wrong with an SSE body: data that is not JSON, a late server error, no end."""
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    if not data:
        return [f"a stream without data: {text[:300]}"]
    problems = [problem for item in data if item != "[DONE]" for problem in event_problems(item)]
    if problems:
        return problems
    if not path.startswith("/api/"):
        return [] if data[-1] == "[DONE]" else [f"no [DONE] at the end: {data[-1][:300]}"]
    # Kobold has no [DONE]: its last event carries the finish reason.
    last = json.loads(data[-1]) if data[-1] != "[DONE]" else {}
    return [] if last.get("finish_reason") else [f"no finish_reason at the end: {data[-1][:300]}"]


def event_problems(item: str) -> Problems:
    """What is wrong with one event's data: not JSON, or a server error."""
    try:
        event = json.loads(item)
    except ValueError:
        return [f"stream data is not JSON: {item[:300]}"]
    if not isinstance(event, dict):
        return [f"stream data is not an object: {item[:300]}"]
    if "server_error" in json.dumps(event.get("error") or event.get("detail") or {}):
        return [f"stream ended in a server error: {item[:300]}"]
    return []


def response_problems(case: schemathesis.Case, response: Response) -> Problems:
    """Everything wrong with one answer; empty when it is fine."""
    status = response.status_code
    if status >= 500:
        return [f"{status}: {response.text[:500]}"]
    if status >= 300:
        return error_problems(case.path, status, response.text)
    if "text/event-stream" in header(response, "content-type"):
        return stream_problems(case.path, response.text)
    try:
        case.validate_response(response, checks=[response_schema_conformance])
    except Exception as failure:  # schemathesis raises a group of check failures
        return [f"{status} not as documented: {str(failure)[:500]}"]
    return []


def fuzz(server: RunningServer, path: str, mode: GenerationMode, examples: int) -> Problems:
    """Send `examples` generated bodies to POST `path`; every problem, with its request."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operation = schema[path]["POST"]
    problems: Problems = []

    @given(operation.as_strategy(generation_mode=mode).map(shorten))
    @settings(
        max_examples=examples,
        derandomize=True,  # the same cases in every run, so CI is reproducible
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # problems are collected, never shrunk
        suppress_health_check=list(HealthCheck),
    )
    def one(case: schemathesis.Case) -> None:
        response = case.call(timeout=120)
        for problem in response_problems(case, response):
            problems.append(f"POST {path} {case.body!r}: {problem}")

    one()
    return problems


Fuzzer = Callable[[str, GenerationMode, int], Problems]


@pytest.fixture(scope="module")
def fuzzer(real_server: RunningServer) -> Fuzzer:
    """`fuzz` against the session's real server."""
    return lambda path, mode, examples: fuzz(real_server, path, mode, examples)


@pytest.mark.parametrize("path", GENERATION_ROUTES + TOKEN_ROUTES)
def test_valid_bodies_get_valid_answers(fuzzer: Fuzzer, path: str) -> None:
    problems = fuzzer(path, GenerationMode.POSITIVE, EXAMPLES)
    assert not problems, "\n".join(problems[:5])


@pytest.mark.parametrize("path", GENERATION_ROUTES + TOKEN_ROUTES)
def test_invalid_bodies_get_client_errors(fuzzer: Fuzzer, path: str) -> None:
    problems = fuzzer(path, GenerationMode.NEGATIVE, INVALID_EXAMPLES)
    assert not problems, "\n".join(problems[:5])
