"""API and admin keys: api_tokens.yml plus --api-key, checked in constant time."""

from __future__ import annotations

import errno
import hmac
import logging
import os
import secrets
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import yaml
from fastapi import Request

from llmserve.core.errors import AuthenticationError, PermissionDeniedError
from llmserve.models.leases import allow_model_loading, restrict_models
from llmserve.usage.keys import KeyRecord, Role
from llmserve.usage.middleware import current_meter
from llmserve.usage.service import FileKey, RateLimitedError, UsageService

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


# The stamp of a file that does not exist (real stamps have an inode number).
MISSING = (0, 0, 0)


class TokensFileError(ValueError):
    """api_tokens.yml cannot be used; the message never quotes the file's content."""


def create_tokens_file(path: Path) -> bool:
    """Write a new api_tokens.yml with random keys, owner-only; False if one appeared first.

    The file is written whole under a temporary name and then linked into place: a reader
    never sees it half-written, and of two servers starting at once the second keeps (and
    reads) the first one's keys instead of failing or overwriting them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    content = yaml.safe_dump({"api_key": secrets.token_hex(16), "admin_key": secrets.token_hex(16)})
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:  # mkstemp's mode is 0600
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        return _link_new(temporary, path, content)
    finally:
        os.unlink(temporary)


def _link_new(temporary: str, path: Path, content: str) -> bool:
    """Put `temporary` in place as `path` unless `path` exists; False if it does."""
    try:
        os.link(temporary, path)  # unlike rename, never replaces a file that appeared meanwhile
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    # A file system without hard links: exclusive creation, written at once.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)
    return True


def _as_tuple(value: object, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, dict | list) for item in items):
        raise TokensFileError(f"{field} must be a key or a list of keys")
    if any(len(str(item).split()) > 1 for item in items):
        # Keys travel in headers; a space inside one is a lost line break or a cut-off file.
        raise TokensFileError(f"a key in {field} contains whitespace")
    return tuple(str(item) for item in items if item)


def parse_tokens(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The API and admin keys in an api_tokens.yml text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Not str(exc): PyYAML quotes the offending line, which may hold a key.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TokensFileError(f"not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise TokensFileError("expected a mapping with api_key and admin_key")
    api, admin = (
        _as_tuple(data.get("api_key"), "api_key"),
        _as_tuple(data.get("admin_key"), "admin_key"),
    )
    if not api and not admin:
        # Most likely caught between truncation and write; deleting the file revokes keys.
        raise TokensFileError("holds neither api_key nor admin_key")
    return api, admin


def read_tokens_text(path: Path) -> str:
    """The text of api_tokens.yml (TokensFileError when unreadable or not UTF-8)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokensFileError("not UTF-8 text") from None
    except OSError as exc:
        raise TokensFileError(exc.strerror or type(exc).__name__) from None


class KeyStore:
    """Reads api_tokens.yml (again whenever it changes) and adds the command-line API keys.

    A file that cannot be read or parsed (half-written, mistyped) leaves the last good keys in
    force, logs why once per change and shows in `problem` (and so in /health).
    """

    def __init__(self, path: Path, extra_api_keys: list[str], disabled: bool):
        self.path = path
        self.disabled = disabled
        self._extra = tuple(extra_api_keys)
        self._stamp: tuple[int, int, int] | None = None
        self._keys = Keys(self._extra, ())
        self._loaded = False  # whether the file was ever read successfully
        self.problem: str | None = None

    def ensure_file(self) -> None:
        """Create the tokens file on first start; say where it is, never what it holds."""
        if self.disabled:
            log.warning(
                "authentication is DISABLED: anyone who can reach this server can use it, "
                "including the admin API"
            )
            return
        if not self.path.exists():
            if create_tokens_file(self.path):
                log.info("created %s with new API and admin keys", self.path)
            else:
                log.info("%s was created by another process meanwhile; using it", self.path)
        log.info("keys are in %s (mode 0600); `llmserve keys` prints them", self.path)
        self.keys()

    def keys(self) -> Keys:
        """The current keys, re-read if the file changed since the last call."""
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self._reload(stamp != MISSING)
        return self._keys

    def _file_stamp(self) -> tuple[int, int, int]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return MISSING
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _reload(self, exists: bool) -> None:
        if not exists:
            # A deleted file revokes its keys; only the command line's remain.
            self._keys, self._loaded = Keys(self._extra, ()), False
            self.problem = f"{self.path} does not exist; only --api-key keys are accepted"
            log.warning("%s", self.problem)
            return
        try:
            api, admin = parse_tokens(read_tokens_text(self.path))
        except TokensFileError as exc:
            kept = "keeping the last good keys" if self._loaded else "only --api-key keys work"
            self.problem = f"{self.path}: {exc}; {kept}"
            log.error("cannot use %s", self.problem)
            return
        self._keys, self._loaded = Keys(self._extra + api, admin), True
        if self.problem is not None:
            log.info("%s is usable again", self.path)
        self.problem = None

    def permission(self, presented: list[str]) -> Permission:
        """The highest permission any presented key grants."""
        return self.match(presented)[0]

    def match(self, presented: list[str]) -> tuple[Permission, FileKey | None]:
        """The highest permission any presented key grants, and that key."""
        if self.disabled:
            return Permission.ADMIN, None
        keys = self.keys()
        best, found = Permission.NONE, None
        pools = ((Permission.ADMIN, keys.admin), (Permission.API, keys.api))
        # Compare against every key, without stopping early, so timing says nothing.
        for candidate in presented:
            for permission, pool in pools:
                for key in pool:
                    if hmac.compare_digest(candidate.encode(), key.encode()) and permission > best:
                        best, found = permission, self._file_key(key, permission)
        return best, found

    def file_keys(self) -> list[FileKey]:
        """Every key of api_tokens.yml and --api-key now in force."""
        if self.disabled:
            return []
        keys = self.keys()
        admin = [self._file_key(key, Permission.ADMIN) for key in keys.admin]
        return admin + [self._file_key(key, Permission.API) for key in keys.api]

    def _file_key(self, key: str, permission: Permission) -> FileKey:
        role: Role = "admin" if permission is Permission.ADMIN else "api"
        return FileKey(key, role, "cli" if key in self._extra else "file")


@dataclass(frozen=True)
class Caller:
    """Who presented what: the permission, and the key that grants it (file or database)."""

    permission: Permission
    file_key: FileKey | None = None
    record: KeyRecord | None = None


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


def identify(request: Request) -> Caller:
    """The caller of a request: api_tokens.yml and --api-key first, then database keys."""
    store: KeyStore = request.app.state.keys
    presented = presented_keys(request)
    permission, file_key = store.match(presented)
    usage: UsageService | None = request.app.state.usage
    if permission is Permission.NONE and usage is not None:
        record = usage.database_key(presented)
        if record is not None:
            return Caller(_granted(record), None, record)
    return Caller(permission, file_key)


def key_permission(request: Request, key: str) -> Permission:
    """The permission one presented key grants (file, command line or database)."""
    store: KeyStore = request.app.state.keys
    permission = store.permission([key])
    usage: UsageService | None = request.app.state.usage
    if permission is Permission.NONE and usage is not None:
        record = usage.database_key([key])
        if record is not None:
            return _granted(record)
    return permission


def _granted(record: KeyRecord) -> Permission:
    """What a database key may do."""
    return Permission.ADMIN if record.role == "admin" else Permission.API


def request_permission(request: Request) -> Permission:
    """The permission of the key a request presents."""
    return identify(request).permission


async def require_api(request: Request) -> Permission:
    """Dependency: an API or admin key (401 otherwise)."""
    caller = identify(request)
    if caller.permission < Permission.API:
        raise AuthenticationError("a valid API key is required (Authorization: Bearer KEY)")
    _scope(caller)
    return caller.permission


def _scope(caller: Caller) -> None:
    """Tell the model manager what this caller may load and use."""
    allow_model_loading(caller.permission >= Permission.ADMIN)  # on-demand loads: admin key
    record = caller.record
    if record is not None and record.allowed_models is not None:
        restrict_models(record.allowed_models)  # else the request's scope keeps its default


async def require_admin(request: Request) -> Permission:
    """Dependency: the admin key (401 without a valid key, 403 with an API key)."""
    permission = await require_api(request)
    if permission < Permission.ADMIN:
        raise PermissionDeniedError("this route needs the admin key")
    return permission


def metered(open_route: bool = False) -> Callable[[Request], Awaitable[Permission]]:
    """Dependency for the dialects' routes: `require_api`, then the key's limits and metering.

    On an `open_route` (Kobold or Ollama with their auth off) a caller without a valid key is
    served as the anonymous principal, with its own limits.
    """

    async def meter_request(request: Request) -> Permission:
        caller = identify(request)
        if caller.permission < Permission.API and not open_route:
            raise AuthenticationError("a valid API key is required (Authorization: Bearer KEY)")
        _scope(caller)
        await _admit(request, caller)
        return caller.permission

    return meter_request


async def _admit(request: Request, caller: Caller) -> None:
    """Count the request against its principal's limits (429 beyond one)."""
    usage: UsageService | None = request.app.state.usage
    meter = current_meter.get()
    if usage is None or meter is None or meter.key is not None:
        return  # not metered here, or already admitted by another of the route's dependencies
    principal = caller.record
    if principal is None and caller.permission >= Permission.API and caller.file_key is not None:
        principal = await usage.file_principal(caller.file_key)
    principal = principal or usage.anonymous
    if principal is None:
        return
    meter.key = principal
    try:
        meter.admission = await usage.admit(principal)
    except RateLimitedError as exc:
        meter.refusal = exc.refusal
        raise
