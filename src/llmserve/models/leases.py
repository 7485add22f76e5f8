"""Leases: a loaded model is freed only once no request still uses it.

A request takes a lease on a model when it picks it (`ModelManager.resolve` / `acquire`,
before any templating or tokenizing) and gives it back when its HTTP response has been sent
completely: `LeaseScope`, an ASGI middleware, opens one `RequestScope` per request and releases
every lease in it when the ASGI call returns, i.e. after the last delta of a stream, after an
error response, or once a disconnected client's handler has ended. The scope travels in a
context variable, so the dialects' call sites stay `self.models.resolve(name)`: no argument to
thread through, nothing to forget to release. A swapped-out or unloaded model is closed when
its last lease is released (bounded by the manager's drain timeout); outside a request
(tests, background work) nothing is leased and the drain falls back to the engine's counts.

The scope also carries what the caller's key may do (load models; use only some models): the auth
dependency records it, so the manager can refuse a model load, or a model, to an API key without
the dialects passing it down. It records the model the request was given, too, so that a
model's own sampling preset applies to the request.
The context variable holds no state of its own: each request's scope lives in its context.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

Release = Callable[[], None]
# ASGI's types, spelled out so this module needs no web framework.
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class LeaseCount:
    """How many requests hold a model right now."""

    def __init__(self) -> None:
        self.count = 0

    def take(self) -> Release:
        """Count one more user; the returned function gives the lease back (once)."""
        self.count += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.count -= 1

        return release


@dataclass
class RequestScope:
    """What one HTTP request holds: its leases, what its key may do, the model it was given."""

    releases: list[Release] = field(default_factory=list)
    may_load_models: bool = False
    allowed_models: frozenset[str] | None = None  # names (ids or aliases); None: every model
    model: str | None = None  # the id of the model that serves it, once one was picked

    def release_all(self) -> None:
        """Give every lease back."""
        releases, self.releases = self.releases, []
        for release in releases:
            release()


_CURRENT: ContextVar[RequestScope | None] = ContextVar("llmserve_request_scope", default=None)


def current_scope() -> RequestScope | None:
    """The scope of the HTTP request being served (None outside one)."""
    return _CURRENT.get()


def allow_model_loading(allowed: bool) -> None:
    """Record whether the current request's key may load models (the auth layer calls this)."""
    scope = _CURRENT.get()
    if scope is not None:
        scope.may_load_models = allowed


def restrict_models(names: Iterable[str] | None) -> None:
    """Record the models the current request's key may use, by id or alias (None: all)."""
    scope = _CURRENT.get()
    if scope is not None:
        scope.allowed_models = None if names is None else frozenset(names)


def allowed_models() -> frozenset[str] | None:
    """The models the current request may use (None: every model, also outside a request)."""
    scope = _CURRENT.get()
    return None if scope is None else scope.allowed_models


def record_model(model_id: str) -> None:
    """Note the model that serves the current request."""
    scope = _CURRENT.get()
    if scope is not None:
        scope.model = model_id


def current_model() -> str | None:
    """The id of the model serving the current request, once it was picked."""
    scope = _CURRENT.get()
    return None if scope is None else scope.model


def may_load_models() -> bool:
    """True when the current request may load a model (always, outside a request)."""
    scope = _CURRENT.get()
    return scope is None or scope.may_load_models


def lease(count: LeaseCount) -> None:
    """Hold `count` for the rest of the current request (nothing outside a request)."""
    scope = _CURRENT.get()
    if scope is not None:
        scope.releases.append(count.take())


class LeaseScope:
    """ASGI middleware: one RequestScope per HTTP request, released when the response is done."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request inside its own scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_scope = RequestScope()
        token = _CURRENT.set(request_scope)
        try:
            await self.app(scope, receive, send)
        finally:
            _CURRENT.reset(token)
            request_scope.release_all()
