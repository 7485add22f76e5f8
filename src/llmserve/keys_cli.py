"""`llmserve keys`: print api_tokens.yml, or create, list, revoke keys and show usage."""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine

from llmserve.config import Settings, load_settings
from llmserve.models.catalog import parse_duration
from llmserve.usage import keys as key_table
from llmserve.usage.database import open_database
from llmserve.usage.keys import KeyLimits, KeyRecord
from llmserve.usage.records import GROUP_COLUMNS, GroupBy, UsageFilter, usage_sums

RESERVED = ("anonymous", "file-", "cli-")


def add_keys_parser(commands: Any) -> None:
    """The `keys` command and its sub-commands."""
    keys = commands.add_parser(
        "keys",
        help="Print the keys of api_tokens.yml; create, list or revoke keys; show usage.",
        description="Without a sub-command: print the API and admin keys of api_tokens.yml.",
    )
    _add_location(keys)
    actions = keys.add_subparsers(dest="keys_command")
    create = actions.add_parser("create", help="Create a key (printed once, stored hashed).")
    create.add_argument("name")
    create.add_argument("--owner")
    create.add_argument("--admin", action="store_true", help="An admin key, not an API key.")
    create.add_argument("--expires-in", help="Seconds, or 90s/30m/12h.")
    create.add_argument("--models", help="Comma-separated models the key may use.")
    for flag, help_text in (
        ("--rpm", "Requests per minute."),
        ("--tpm", "Tokens per minute."),
        ("--max-concurrent", "Requests in flight at once."),
        ("--quota-tokens", "Tokens per quota period."),
    ):
        create.add_argument(flag, type=int, help=help_text)
    create.add_argument("--quota-period", choices=["day", "week", "month"], default="month")
    actions.add_parser("list", help="List every key (never the keys themselves).")
    revoke = actions.add_parser("revoke", help="Revoke a key made with `keys create`.")
    revoke.add_argument("name")
    usage = actions.add_parser("usage", help="Sum usage by key, model and day.")
    usage.add_argument("--key")
    usage.add_argument("--model")
    usage.add_argument("--from", dest="day_from", type=dt.date.fromisoformat)
    usage.add_argument("--to", dest="day_to", type=dt.date.fromisoformat)
    usage.add_argument("--group-by", default="key,model,day")
    for action in (create, revoke, usage, actions.choices["list"]):
        _add_location(action)


def _add_location(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="config.yml to read settings from.")
    parser.add_argument("--api-tokens-file", type=Path, help="The api_tokens.yml to read.")
    parser.add_argument("--data-dir", type=Path, help="Folder of the usage database.")
    parser.add_argument("--database-url", help="The usage database, e.g. postgresql://...")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name)
        for name in ("api_tokens_file", "data_dir", "database_url")
        if getattr(args, name, None) is not None
    }
    return load_settings(args.config, **overrides)


def run_keys(args: argparse.Namespace) -> None:
    """Run `llmserve keys [create|list|revoke|usage]`."""
    settings = _settings(args)
    command = getattr(args, "keys_command", None)
    if command is None:
        print_tokens_file(settings)
        return
    url = settings.usage_database_url()
    if url is None:
        raise SystemExit("llmserve: record_usage is off: there is no key database")
    engine = open_database(url)
    try:
        {"create": _create, "list": _list, "revoke": _revoke, "usage": _usage}[command](
            engine, args
        )
    finally:
        engine.dispose()


def print_tokens_file(settings: Settings) -> None:
    """Show the keys of api_tokens.yml (the server's console never logs them)."""
    path = settings.tokens_path()
    if not path.is_file():
        raise SystemExit(f"llmserve: {path} does not exist yet; start the server once to create it")
    print(f"# {path}")
    print(path.read_text(encoding="utf-8"), end="")


def _create(engine: Engine, args: argparse.Namespace) -> None:
    if args.name.startswith(RESERVED):
        raise SystemExit(f"llmserve: `{args.name}` is reserved (anonymous, file-*, cli-*)")
    limits = KeyLimits(
        rpm=args.rpm,
        tpm=args.tpm,
        max_concurrent=args.max_concurrent,
        quota_tokens=args.quota_tokens,
        quota_period=args.quota_period,
    )
    try:
        seconds = parse_duration(args.expires_in) if args.expires_in else None
    except ValueError as exc:
        raise SystemExit(f"llmserve: --expires-in: {exc}") from None
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    secret = key_table.new_key()
    with engine.begin() as conn:
        if key_table.key_named(conn, args.name) is not None:
            raise SystemExit(f"llmserve: a key called `{args.name}` exists")
        key_table.insert_key(
            conn,
            name=args.name,
            key_hash=key_table.hash_key(secret),
            prefix=secret[: len(key_table.KEY_PREFIX) + 4],
            role="admin" if args.admin else "api",
            source="db",
            owner=args.owner,
            expires_at=time.time() + seconds if seconds is not None else None,
            allowed_models=models,
            limits=limits,
        )
    print(secret)
    print(f"# key `{args.name}` created; it is shown only this once", flush=True)


def _status(record: KeyRecord, now: float) -> str:
    if record.revoked_at is not None:
        return "revoked"
    return "active" if record.usable(now) else "expired"


def _limits_text(limits: KeyLimits) -> str:
    parts = [
        f"{name}={value}"
        for name, value in limits.model_dump(exclude={"quota_period"}).items()
        if value is not None
    ]
    if limits.quota_tokens:
        parts.append(f"per={limits.quota_period}")
    return " ".join(parts) or "-"


def _list(engine: Engine, args: argparse.Namespace) -> None:
    now = time.time()
    with engine.connect() as conn:
        records = key_table.all_keys(conn)
    rows = [
        [
            r.name,
            r.role,
            r.source,
            _status(r, now),
            r.prefix or "-",
            r.owner or "-",
            _limits_text(r.limits),
        ]
        for r in records
    ]
    _table(["name", "role", "source", "status", "prefix", "owner", "limits"], rows)


def _revoke(engine: Engine, args: argparse.Namespace) -> None:
    with engine.begin() as conn:
        record = key_table.key_named(conn, args.name)
        if record is None:
            raise SystemExit(f"llmserve: no key is called `{args.name}`")
        if record.source != "db":
            raise SystemExit(f"llmserve: `{args.name}` comes from {record.source}; remove it there")
        key_table.revoke_key(conn, args.name)
    print(f"revoked `{args.name}` (running servers stop accepting it within seconds)")


def _usage(engine: Engine, args: argparse.Namespace) -> None:
    groups = [g.strip() for g in args.group_by.split(",") if g.strip()]
    if any(g not in GROUP_COLUMNS for g in groups):
        raise SystemExit("llmserve: --group-by takes key, model and day")
    where = UsageFilter(
        key=args.key,
        model=args.model,
        day_from=args.day_from.isoformat() if args.day_from else None,
        day_to=args.day_to.isoformat() if args.day_to else None,
    )
    with engine.connect() as conn:
        sums = usage_sums(conn, where, cast(list[GroupBy], groups))
    columns = [*groups, "requests", "prompt", "cached", "completion", "errors", "cancelled"]
    rows = [
        [
            *(str(getattr(s, g) or "-") for g in groups),
            s.requests,
            s.prompt_tokens,
            s.cached_tokens,
            s.completion_tokens,
            s.errors,
            s.cancelled,
        ]
        for s in sums
    ]
    _table(columns, rows)


def _table(columns: list[str], rows: list[list[Any]]) -> None:
    cells = [columns, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
