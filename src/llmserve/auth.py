"""API and admin keys: api_tokens.yml plus --api-key, checked in constant time."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import yaml
from fastapi import Request

from llmserve.core.errors import AuthenticationError, PermissionDeniedError

log = logging.getLogger(__name__)


class Permission(IntEnum):
    """What a presented key may do; higher includes lower."""

    NONE = 0
    API = 1
    ADMIN = 2


@dataclass(frozen=True)
class Keys:
    """The keys in force at one moment."""

    api: tuple[str, ...]
    admin: tuple[str, ...]


def create_tokens_file(path: Path) -> None:
    """Write a new api_tokens.yml with random keys, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = yaml.safe_dump({"api_key": secrets.token_hex(16), "admin_key": secrets.token_hex(16)})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)


def _as_tuple(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    return tuple(str(item) for item in items if item)


class KeyStore:
    """Reads api_tokens.yml (again whenever it changes) and adds the command-line API keys."""

    def __init__(self, path: Path, extra_api_keys: list[str], disabled: bool):
        self.path = path
        self.disabled = disabled
        self._extra = tuple(extra_api_keys)
        self._stamp: tuple[int, int] | None = None
        self._keys = Keys(self._extra, ())

    def ensure_file(self) -> None:
        """Create the tokens file on first start; say where it is, never what it holds."""
        if self.disabled:
            log.warning(
                "authentication is DISABLED: anyone who can reach this server can use it, "
                "including the admin API"
            )
            return
        if not self.path.exists():
            create_tokens_file(self.path)
            log.info("created %s with new API and admin keys", self.path)
        log.info("keys are in %s (mode 0600); `llmserve keys` prints them", self.path)

    def keys(self) -> Keys:
        """The current keys, re-read if the file changed since the last call."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return Keys(self._extra, ())
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            data = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
            self._keys = Keys(
                self._extra + _as_tuple(data.get("api_key")), _as_tuple(data.get("admin_key"))
            )
            self._stamp = stamp
        return self._keys

    def permission(self, presented: list[str]) -> Permission:
        """The highest permission any presented key grants."""
        if self.disabled:
            return Permission.ADMIN
        keys = self.keys()
        best = Permission.NONE
        # Compare against every key, without stopping early, so timing says nothing.
        for candidate in presented:
            for key in keys.admin:
                if hmac.compare_digest(candidate.encode(), key.encode()):
                    best = max(best, Permission.ADMIN)
            for key in keys.api:
                if hmac.compare_digest(candidate.encode(), key.encode()):
                    best = max(best, Permission.API)
        return best


def presented_keys(request: Request) -> list[str]:
    """Keys a request carries in Authorization: Bearer, x-api-key or x-admin-key."""
    keys = []
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    for header in ("x-api-key", "x-admin-key"):
        if value := request.headers.get(header):
            keys.append(value.strip())
    return keys


def request_permission(request: Request) -> Permission:
    """The permission of the key a request presents."""
    store: KeyStore = request.app.state.keys
    return store.permission(presented_keys(request))


async def require_api(request: Request) -> Permission:
    """Dependency: an API or admin key (401 otherwise)."""
    permission = request_permission(request)
    if permission < Permission.API:
        raise AuthenticationError("a valid API key is required (Authorization: Bearer KEY)")
    return permission


async def require_admin(request: Request) -> Permission:
    """Dependency: the admin key (401 without a valid key, 403 with an API key)."""
    permission = await require_api(request)
    if permission < Permission.ADMIN:
        raise PermissionDeniedError("this route needs the admin key")
    return permission
