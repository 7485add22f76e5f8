"""Who may reach the server from where: loopback checks, the CORS policy and the Host guard.

Routes that answer without a key (everything under `disable_auth`, the Kobold routes under
`kobold_auth: false`, Ollama's under `ollama_auth: false`) would let any web page the user
visits drive the server: cross-origin through a permissive CORS policy, or same-origin through
DNS rebinding (an attacker's name that resolves to 127.0.0.1). On those routes browsers get
loopback origins only and the `Host` header must name this server, unless the operator
configures otherwise.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from llmserve.api.ollama.protocol import OLLAMA_PATHS
from llmserve.core.errors import PermissionDeniedError

if TYPE_CHECKING:
    from llmserve.api.errors import ErrorRenderers
    from llmserve.config import Settings

ANY = "*"
# Values of cors_origins that mean "any loopback origin, any port", as llama.cpp reads them.
LOOPBACK_ORIGIN_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
LOOPBACK_ORIGIN_REGEX = (
    r"https?://(localhost|[a-z0-9-]+\.localhost|127(\.[0-9]{1,3}){3}|\[::1\])(:[0-9]{1,5})?"
)
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})
KOBOLD_PREFIXES = ("/api/v1/", "/api/extra/", "/api/latest/")
HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def is_loopback(host: str) -> bool:
    """True for localhost, names under .localhost and loopback addresses."""
    name = bare_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = _ip(name)
    return address is not None and address.is_loopback


def bare_name(host: str) -> str:
    """A host or address without brackets, trailing dot or case: `[::1]` -> `::1`."""
    return host.strip().strip("[]").rstrip(".").lower()


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_header_name(value: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `::1`."""
    value = value.strip()
    if value.startswith("["):
        return bare_name(value.partition("]")[0])
    return bare_name(value.partition(":")[0])


def checked_origin(value: str) -> str:
    """A cors_origins value as used: `*`, a loopback name, or `scheme://host[:port]`."""
    value = value.strip()
    if value == ANY or value.lower() in LOOPBACK_ORIGIN_NAMES:
        return value.lower()
    parts = urlsplit(value)
    valid = (
        parts.scheme in ("http", "https")
        and parts.hostname
        and not parts.username
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
    )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(
            f"{value!r} is not an origin: use `*`, `localhost` (any loopback origin) or "
            "scheme://host[:port] such as https://app.example or http://127.0.0.1:5173"
        )
    return f"{parts.scheme}://{parts.netloc.lower()}"


def checked_host(value: str) -> str:
    """An allowed_hosts value as used: `*`, an address, or a host name (no scheme, no port)."""
    name = bare_name(value)
    if value.strip() == ANY or _ip(name) is not None or HOST_NAME.fullmatch(name):
        return ANY if value.strip() == ANY else name
    raise ValueError(
        f"{value!r} is not a host name: use `*`, an address or a name such as llm.example "
        "(no scheme, no port)"
    )


@dataclass(frozen=True)
class OpenRoutes:
    """The paths served without a key: all of them, some prefixes, or none."""

    everything: bool
    prefixes: tuple[str, ...] = ()
    paths: frozenset[str] = frozenset()  # exact paths (`/`, which as a prefix is everything)

    @classmethod
    def of(cls, settings: Settings) -> OpenRoutes:
        """The open routes these settings make."""
        if settings.disable_auth:
            return cls(everything=True)
        prefixes = () if settings.kobold_auth else KOBOLD_PREFIXES
        if settings.ollama_auth:
            return cls(everything=False, prefixes=prefixes)
        # Ollama's routes open together with its banner at `/`.
        return cls(everything=False, prefixes=prefixes + OLLAMA_PATHS, paths=frozenset({"/"}))

    def covers(self, path: str) -> bool:
        """True when `path` answers without a key."""
        return self.everything or path in self.paths or path.startswith(self.prefixes)


def cors_options(origins: list[str], open_routes: bool) -> dict[str, Any]:
    """CORSMiddleware's allow_origins / allow_origin_regex for configured `origins`."""
    if not origins:
        origins = list(LOOPBACK_ORIGIN_NAMES) if open_routes else [ANY]
    loopback = any(origin in LOOPBACK_ORIGIN_NAMES for origin in origins)
    listed = [origin for origin in origins if origin not in LOOPBACK_ORIGIN_NAMES]
    return {
        "allow_origins": [ANY] if ANY in listed else listed,
        "allow_origin_regex": LOOPBACK_ORIGIN_REGEX if loopback else None,
        "allow_methods": ["*"],
        "allow_headers": ["*"],
        "allow_credentials": False,
    }


def origin_allowed(options: dict[str, Any], origin: str) -> bool:
    """Whether the CORS policy made by `cors_options` lets `origin` in."""
    if ANY in options["allow_origins"] or origin in options["allow_origins"]:
        return True
    regex = options["allow_origin_regex"]
    return regex is not None and re.fullmatch(regex, origin) is not None


class PathCORS:
    """ASGI middleware: the CORS policy of open routes on them, the keyed one elsewhere."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.routes = OpenRoutes.of(settings)
        self.open = CORSMiddleware(app, **cors_options(settings.cors_origins, True))
        self.keyed = CORSMiddleware(app, **cors_options(settings.cors_origins, False))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_open = scope["type"] == "http" and self.routes.covers(scope["path"])
        await (self.open if is_open else self.keyed)(scope, receive, send)


@dataclass(frozen=True)
class AllowedHosts:
    """Host header names this server answers to on open routes."""

    names: frozenset[str]
    any_name: bool = False
    any_address: bool = False

    @classmethod
    def of(cls, settings: Settings) -> AllowedHosts:
        """Loopback names, the listening addresses and `allowed_hosts`."""
        configured = frozenset(settings.allowed_hosts)
        bound = frozenset(bare_name(h) for h in (settings.host, settings.admin_host) if h)
        wildcard = bool(bound & WILDCARD_ADDRESSES)
        names = (configured | bound) - WILDCARD_ADDRESSES - {ANY}
        if wildcard:
            # Listening on every interface: this machine's name is one of its addresses' names.
            names |= {socket.gethostname().lower()}
        return cls(frozenset(names), ANY in configured, wildcard)

    def accepts(self, host_header: str) -> bool:
        """True when a request with this Host header is for this server."""
        name = host_header_name(host_header)
        if self.any_name or is_loopback(name) or name in self.names:
            return True
        # An address literal cannot be rebound by DNS; on a wildcard bind it is ours.
        return self.any_address and _ip(name) is not None


@dataclass
class BrowserGuard:
    """ASGI middleware: 403 on open routes for a foreign `Host` or a disallowed `Origin`.

    CORS only stops a page from reading answers: a "simple" cross-origin POST (text/plain, a
    form) still runs, so an open route refuses any request whose Origin its CORS policy would
    not admit. A `Host` naming neither loopback nor this server is DNS rebinding.
    """

    app: ASGIApp
    settings: Settings
    renderers: ErrorRenderers

    def __post_init__(self) -> None:
        self.routes = OpenRoutes.of(self.settings)
        self.hosts = AllowedHosts.of(self.settings)
        self.origins = cors_options(self.settings.cors_origins, open_routes=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.routes.covers(scope["path"]):
            error = self._refusal(_header(scope, b"host"), _header(scope, b"origin"))
            if error is not None:
                await self.renderers.for_path(scope["path"])(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, host: str | None, origin: str | None) -> PermissionDeniedError | None:
        # No Host at all (HTTP/1.0) is no browser: rebinding always carries the name.
        if host is not None and not self.hosts.accepts(host):
            return PermissionDeniedError(
                f"Host {host[:100]!r} is not allowed without a key; add it with "
                "--allowed-hosts, or require keys",
                code="host_not_allowed",
            )
        if origin is not None and not self._origin_allowed(origin, host):
            return PermissionDeniedError(
                f"Origin {origin[:100]!r} is not allowed without a key; add it with "
                "--cors-origins, or require keys",
                code="origin_not_allowed",
            )
        return None

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        # Same origin (a page this server served, e.g. its web UI) passes with its Host.
        same = host is not None and _netloc(origin) == host.strip().lower()
        return same or origin_allowed(self.origins, origin)


def _netloc(origin: str) -> str:
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address
        return ""


def _header(scope: Scope, name: bytes) -> str | None:
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers") or ()
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None
