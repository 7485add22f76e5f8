"""The metering middleware: rate-limit headers on every response, lease release, usage records.

It sits inside the access log (whose request record carries the model and token counts) and
outside the routes. The auth dependency fills the request's `Meter`; this middleware gives the
lease back and queues the usage record just before the response's last bytes go out, so a
client's next request finds its slot free, and once more at the end for responses that never
completed (a client that left, which is recorded as cancelled).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from llmserve.models.leases import ASGIApp, Receive, Scope, Send
from llmserve.observability import RequestRecord, current_request
from llmserve.usage.keys import KeyRecord
from llmserve.usage.limits import Admission, RateState, Refusal
from llmserve.usage.records import UsageRecord
from llmserve.usage.service import UsageService

Message = dict[str, object]


@dataclass
class Meter:
    """What the auth dependency decided for one request: its principal and admission."""

    started: float = field(default_factory=time.time)
    key: KeyRecord | None = None
    admission: Admission | None = None
    refusal: Refusal | None = None
    finished: bool = False

    def state(self) -> RateState | None:
        """The limits state to report in headers."""
        if self.refusal is not None:
            return self.refusal.state
        return self.admission.state if self.admission is not None else None


# The Meter of the request being served (None outside metered apps). The Meter is mutable:
# dependencies fill it in, so nothing is set on this variable below the middleware.
current_meter: ContextVar[Meter | None] = ContextVar("current_meter", default=None)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 1h2m3s."""
    whole = max(0, int(seconds + 0.999))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _instant(seconds: float) -> str:
    """Anthropic's reset format: the RFC 3339 moment."""
    moment = dt.datetime.fromtimestamp(time.time() + seconds, dt.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def _limits(state: RateState) -> list[tuple[str, int, int, float]]:
    """(kind, limit, remaining, seconds to reset) of each rate the key is limited in."""
    rates = (
        ("requests", state.limit_requests, state.remaining_requests, state.reset_requests),
        ("tokens", state.limit_tokens, state.remaining_tokens, state.reset_tokens),
    )
    return [
        (kind, limit, remaining, reset)
        for kind, limit, remaining, reset in rates
        if limit is not None and remaining is not None and reset is not None
    ]


def openai_headers(state: RateState) -> list[tuple[str, str]]:
    """x-ratelimit-* as OpenAI sends them."""
    headers = []
    for kind, limit, remaining, reset in _limits(state):
        headers += [
            (f"x-ratelimit-limit-{kind}", str(limit)),
            (f"x-ratelimit-remaining-{kind}", str(remaining)),
            (f"x-ratelimit-reset-{kind}", _duration(reset)),
        ]
    return headers


def anthropic_headers(state: RateState) -> list[tuple[str, str]]:
    """anthropic-ratelimit-* as Anthropic sends them."""
    headers = []
    for kind, limit, remaining, reset in _limits(state):
        headers += [
            (f"anthropic-ratelimit-{kind}-limit", str(limit)),
            (f"anthropic-ratelimit-{kind}-remaining", str(remaining)),
            (f"anthropic-ratelimit-{kind}-reset", _instant(reset)),
        ]
    return headers


@dataclass
class UsageMeter:
    """ASGI middleware: meters every request a dialect route admits (see the module doc)."""

    app: ASGIApp
    usage: UsageService
    dialect_of: Callable[[str], str]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        meter = Meter()
        token = current_meter.set(meter)
        dialect = self.dialect_of(scope["path"])

        async def metered_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = self._headers(meter, dialect, message.get("headers"))
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                self._finish(meter, scope, dialect, cancelled=False)
            await send(message)

        try:
            await self.app(scope, receive, metered_send)  # type: ignore[arg-type]
        finally:
            current_meter.reset(token)
            self._finish(meter, scope, dialect, cancelled=True)

    def _headers(self, meter: Meter, dialect: str, raw: object) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = list(raw or [])  # type: ignore[call-overload]
        state = meter.state()
        if state is None:
            return headers
        extra = anthropic_headers(state) if dialect == "anthropic" else openai_headers(state)
        if meter.refusal is not None:
            retry = str(max(1, int(meter.refusal.retry_after + 0.999)))
            headers = [(k, v) for k, v in headers if k.lower() != b"retry-after"]
            extra.append(("retry-after", retry))
        return headers + [(k.encode(), v.encode()) for k, v in extra]

    def _finish(self, meter: Meter, scope: Scope, dialect: str, cancelled: bool) -> None:
        if meter.finished or meter.key is None:
            return
        meter.finished = True
        if meter.admission is not None:
            self.usage.release(meter.admission)
        record = current_request.get()
        if record is not None:
            route = getattr(scope.get("route"), "path", None) or scope["path"]
            usage = usage_record(meter, record, dialect, route[:200], cancelled)
            self.usage.record(meter.key, usage)


def usage_record(
    meter: Meter, record: RequestRecord, dialect: str, route: str, cancelled: bool
) -> UsageRecord:
    """The usage of a request, from the access log's record of it."""
    assert meter.key is not None
    now = time.time()
    return UsageRecord(
        ts=now,
        key_name=meter.key.name,
        model=record.model,
        dialect=dialect,
        route=route,
        status=record.status or 499,
        prompt_tokens=record.prompt_tokens,
        cached_tokens=record.cached_tokens,
        completion_tokens=record.completion_tokens,
        duration_ms=round((now - meter.started) * 1000, 1),
        cancelled=cancelled,
        request_id=record.request_id,
    )
