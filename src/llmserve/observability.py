"""Prometheus metrics, one structured log line per request, and X-Request-Id."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.engines.base import EngineStats

log = logging.getLogger("llmserve.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# The `route` label of requests no route matched: raw paths would grow the registry forever.
UNMATCHED = "unmatched"
REDACTED = "[REDACTED]"
# Query parameters that carry keys (`?api_key=`, `?key=`, `?token=`, ...), and header-like
# `Authorization: ...` / `x-api-key=...` values or bare `Bearer ...` tokens anywhere in a line.
SECRET_QUERY = re.compile(
    r"(?i)([?&;](?:api[_-]?key|key|token|access[_-]?token|auth|authorization|password|secret)"
    r"=)[^&;#\s\"']*"
)
SECRET_VALUE = re.compile(
    r"(?i)\b((?:authorization|proxy-authorization|x-api-key|x-admin-key)[\"']?\s*[:=]\s*[\"']?)"
    r"(?:(?:bearer|basic|token)\s+)?[^\s\"',&;]+"
)
BEARER = re.compile(r"(?i)\b(bearer\s+)[a-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """`text` with key-carrying query parameters and authorization values replaced."""
    text = SECRET_QUERY.sub(rf"\1{REDACTED}", text)
    text = SECRET_VALUE.sub(rf"\1{REDACTED}", text)
    return BEARER.sub(rf"\1{REDACTED}", text)


class RedactSecrets(logging.Filter):
    """A logging filter that redacts keys from a record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place (keeping uvicorn's access-log argument tuple); keep it."""
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _redact_arg(arg) for key, arg in record.args.items()}
        return True


def _redact_arg(arg: object) -> object:
    if isinstance(arg, str):
        return redact(arg)
    if arg is None or isinstance(arg, int | float):
        return arg
    text = str(arg)  # URLs, headers objects: replace only when they hold a secret
    cleaned = redact(text)
    return arg if cleaned == text else cleaned


# Loggers whose records carry request lines; uvicorn's do not propagate to the root logger.
REQUEST_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn", "llmserve.access")


def install_redaction() -> None:
    """Redact keys in every log line: on the request loggers and on the root handlers."""
    targets: list[logging.Filterer] = [logging.getLogger(name) for name in REQUEST_LOGGERS]
    targets += logging.getLogger().handlers
    for target in targets:
        if not any(isinstance(f, RedactSecrets) for f in target.filters):
            target.addFilter(RedactSecrets())


@dataclass
class RequestRecord:
    """What one HTTP request did, filled in as it runs and logged when it ends."""

    request_id: str
    method: str
    route: str
    dialect: str | None = None  # which API the path belongs to (openai, kobold, ...)
    path: str | None = None  # only for requests no route matched
    status: int = 0
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float | None = None
    duration_ms: float = 0.0


class RecentRequests:
    """A bounded ring of the last `size` finished requests, for the admin console.

    Records hold no prompt, output or key; routes under `skip_prefixes` (the UI's own polling)
    are not kept.
    """

    def __init__(self, size: int = 200, skip_prefixes: tuple[str, ...] = ()):
        self.size = size
        self.skip_prefixes = skip_prefixes
        self._ring: deque[tuple[float, RequestRecord]] = deque(maxlen=size)

    def add(self, record: RequestRecord) -> None:
        """Keep `record`, stamped with the time it ended (the oldest falls out when full)."""
        if not record.route.startswith(self.skip_prefixes):
            self._ring.append((time.time(), record))

    def newest(self, limit: int) -> list[tuple[float, RequestRecord]]:
        """Up to `limit` records, newest first."""
        return list(reversed(self._ring))[:limit]


# The record of the request being served in this task (None outside requests).
current_request: ContextVar[RequestRecord | None] = ContextVar("current_request", default=None)


class Metrics:
    """The app's Prometheus registry and instruments (one per app, no globals)."""

    def __init__(self, stats_source: Callable[[], Sequence[tuple[str, EngineStats]]]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmserve_requests",
            "HTTP requests by route, status and dialect",
            ["route", "status", "dialect"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "llmserve_tokens", "Tokens processed", ["kind"], registry=self.registry
        )
        self.ttft = Histogram(
            "llmserve_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "llmserve_inter_token_latency_seconds",
            "Time between output deltas",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineCollector(stats_source))


StatReader = Callable[[EngineStats], float]

# name (after "llmserve_"), help text, how to read it from an engine's stats
ENGINE_GAUGES: tuple[tuple[str, str, StatReader], ...] = (
    ("queue_depth", "Requests waiting for a slot", lambda s: s.waiting),
    ("running_sequences", "Sequences being decoded", lambda s: s.running),
    ("free_slots", "Free sequence slots", lambda s: s.free_slots),
    (
        "kv_cache_usage_ratio",
        "Used share of KV cache cells",
        lambda s: s.kv_cells_used / max(1, s.kv_cells_total),
    ),
    (
        "prefix_cache_hit_ratio",
        "Prompt tokens served from the prefix cache",
        lambda s: s.cached_prompt_tokens_total / max(1, s.prompt_tokens_total),
    ),
)
# busy - decode is the engine's own overhead per step (Python, sampling, delivery).
ENGINE_COUNTERS: tuple[tuple[str, str, StatReader], ...] = (
    ("engine_steps", "Batches decoded", lambda s: s.steps_total),
    ("engine_busy_seconds", "Engine thread time spent on steps", lambda s: s.busy_seconds_total),
    (
        "engine_decode_seconds",
        "Engine thread time inside the backend's forward pass",
        lambda s: s.decode_seconds_total,
    ),
)


class EngineCollector(Collector):
    """Gauges and counters read from each engine's stats at scrape time."""

    def __init__(self, stats_source: Callable[[], Sequence[tuple[str, EngineStats]]]):
        self._source = stats_source

    def collect(self) -> Iterable[Metric]:
        stats = list(self._source())
        yield from _families(GaugeMetricFamily, ENGINE_GAUGES, stats)
        yield from _families(CounterMetricFamily, ENGINE_COUNTERS, stats)


def _families(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    table: tuple[tuple[str, str, StatReader], ...],
    stats: list[tuple[str, EngineStats]],
) -> Iterable[Metric]:
    """One metric family per table row, with a sample per model."""
    for name, doc, read in table:
        family = kind(f"llmserve_{name}", doc, labels=["model"])
        for model, snapshot in stats:
            family.add_metric([model], float(read(snapshot)))
        yield family


@dataclass
class AccessLog:
    """ASGI middleware: X-Request-Id in and out, a request counter, one log line per request."""

    app: ASGIApp
    metrics: Metrics
    dialect_of: Callable[[str], str] = lambda path: "openai"
    skip_paths: tuple[str, ...] = field(default=("/metrics",))
    recent: RecentRequests | None = None  # the ring the admin console reads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        record = RequestRecord(request_id, scope["method"], scope["path"])
        token = current_request.set(record)
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            record.duration_ms = round((time.perf_counter() - start) * 1000, 1)
            current_request.reset(token)
            self._finish(scope, record)

    def _finish(self, scope: Scope, record: RequestRecord) -> None:
        template = getattr(scope.get("route"), "path", None)
        if template is None:
            record.route, record.path = UNMATCHED, record.route[:200]
        else:
            record.route = template
        record.dialect = self.dialect_of(scope["path"])
        status = str(record.status or 499)
        self.metrics.requests.labels(record.route, status, record.dialect).inc()
        if record.route not in self.skip_paths:
            if self.recent is not None:
                self.recent.add(record)
            log.info("%s", redact(json.dumps(_log_fields(record), separators=(",", ":"))))


def _log_fields(record: RequestRecord) -> dict[str, Any]:
    return {k: v for k, v in asdict(record).items() if v is not None}
