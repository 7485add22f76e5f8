"""The `llmserve` command: `serve` (default) and `config --example`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from llmserve.config import EngineOptions, Settings, example_config, load_settings
from llmserve.core.errors import LLMServeError
from llmserve.exposure import is_loopback
from llmserve.keys_cli import add_keys_parser, run_keys
from llmserve.models.catalog import ModelEntry

if TYPE_CHECKING:
    import uvicorn

    from llmserve.engines.base import EngineFactory

log = logging.getLogger("llmserve")


# Where each group of settings starts, in Settings' field order; engine settings form their own.
GROUP_STARTS = {
    "host": "server",
    "model": "model",
    "request_timeout": "limits",
    "data_dir": "data",
    "api_tokens_file": "auth",
    "log_level": "logging",
}
OTHER_COMMANDS = (
    "other commands: `llmserve config [--example]` shows the configuration (or a commented "
    "config.yml), `llmserve keys` prints the keys of api_tokens.yml, `llmserve keys "
    "create|list|revoke|usage` manages database keys and shows usage, `llmserve "
    "convert-default` writes the bundled model as an HF folder for the vLLM engine."
)
# Other spellings of a setting's flag: vLLM's name for the context length.
FLAG_ALIASES = {"ctx_size": ("--max-model-len",)}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, typed from its annotation, help from its description."""
    groups = {
        name: parser.add_argument_group(f"{name} settings")
        for name in ("server", "model", "engine", "limits", "data", "auth", "logging")
    }
    group = "server"
    for name, field in Settings.model_fields.items():
        group = GROUP_STARTS.get(name, group)
        target = groups["engine" if name in EngineOptions.model_fields else group]
        _add_flag(target, name, field.annotation, field.description, FLAG_ALIASES.get(name, ()))
    groups["server"].add_argument("--config", type=Path, help="config.yml to read settings from.")


def _add_flag(
    group: Any, name: str, kind: Any, description: str | None, aliases: tuple[str, ...] = ()
) -> None:
    flags = ["--" + name.replace("_", "-"), *aliases]
    if kind is bool or kind == bool | None:
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, help=description)
    elif kind == list[ModelEntry] or (isinstance(kind, type) and issubclass(kind, BaseModel)):
        return  # mappings: config.yml or the environment (as JSON) only
    elif get_origin(kind) is list or list in get_args(kind):
        group.add_argument(*flags, action="append", help=f"{description} (repeatable)")
    else:
        group.add_argument(*flags, help=description)


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser; `llmserve --help` shows the server's flags."""
    parser = argparse.ArgumentParser(prog="llmserve", description="Serve a GGUF model over HTTP.")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser(
        "serve",
        help="Run the server (the default).",
        description="Serve a GGUF model over HTTP (`llmserve [serve] [flags]`).",
        epilog=OTHER_COMMANDS,
    )
    _add_setting_flags(serve)
    config = commands.add_parser("config", help="Show configuration.")
    config.add_argument("--example", action="store_true", help="Print a commented config.yml.")
    add_keys_parser(commands)
    convert = commands.add_parser(
        "convert-default",
        help="Write the bundled model as an HF folder (for --engine vllm).",
        description="Convert the bundled SmolLM2 GGUF into a Hugging Face folder under "
        "data_dir/converted/ (once; `llmserve --engine vllm` does it on first start too).",
    )
    convert.add_argument("--data-dir", type=Path, help="Folder that holds what llmserve writes.")
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    commands = {"serve", "config", "keys", "convert-default"}
    if not argv or argv[0] not in commands:  # `llmserve --help` too: the server's flags
        argv = ["serve", *argv]
    return build_parser().parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }


def check_engine(settings: Settings) -> None:
    """Exit at once when `engine` names no engine this installation has."""
    from llmserve.engines.base import InvalidEngineSettingError
    from llmserve.engines.registry import default_registry

    try:
        default_registry().get(settings.engine)
    except InvalidEngineSettingError as exc:
        raise SystemExit(f"llmserve: invalid configuration: {exc.message}") from None


def check_exposure(settings: Settings) -> None:
    """Refuse routes open without a key on a non-loopback address unless explicitly allowed."""
    problem = exposure_problem(settings)
    if problem is not None and not settings.i_know_this_is_public:
        raise SystemExit(
            f"llmserve: refusing to start with {problem}. Keep keys on, listen on 127.0.0.1, "
            "or pass --i-know-this-is-public."
        )


def exposure_problem(settings: Settings) -> str | None:
    """What these settings would open to anyone on a public address, if anything."""
    if settings.disable_auth:
        for address, what in listening(settings):
            if not is_loopback(address):
                return f"auth disabled on {address}: anyone who can reach it could use {what}"
    elif not is_loopback(settings.host):
        for flag, opened in (("kobold", settings.kobold_auth), ("ollama", settings.ollama_auth)):
            if not opened:
                return (
                    f"--no-{flag}-auth on {settings.host}: anyone who can reach it could use "
                    f"the {flag.capitalize()} routes without a key"
                )
    return None


def listening(settings: Settings) -> list[tuple[str, str]]:
    """Each address the server listens on, with what it serves there."""
    if not settings.admin_api:
        return [(settings.host, "the server")]
    if settings.admin_port is None:
        return [(settings.host, "the server and its admin API")]
    return [(settings.host, "the server"), (settings.admin_host or settings.host, "the admin API")]


def serve(settings: Settings) -> None:
    """Run uvicorn with the app built from `settings` until SIGTERM/SIGINT."""
    import asyncio

    from llmserve.app import create_admin_app, create_app
    from llmserve.shutdown import CompanionServer, GracefulServer

    app = create_app(settings)
    server = GracefulServer(
        _uvicorn_config(app, settings.host, settings.port, settings),
        app.state.models,
        settings.shutdown_grace,
    )
    if settings.admin_api and settings.admin_port is not None:
        admin_host = settings.admin_host or settings.host
        admin = CompanionServer(
            _uvicorn_config(create_admin_app(app), admin_host, settings.admin_port, settings)
        )
        server.companions.append(admin)
        asyncio.run(_serve_all(server, admin))
    else:
        server.run()


async def _serve_all(*servers: uvicorn.Server) -> None:
    import asyncio

    await asyncio.gather(*(s.serve() for s in servers))


def _uvicorn_config(app: Any, host: str, port: int, settings: Settings) -> uvicorn.Config:
    import uvicorn

    from llmserve.connections import with_head_timeout
    from llmserve.observability import install_redaction

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=settings.log_level,
        http=with_head_timeout(settings.header_timeout),
        timeout_keep_alive=30,
        # Past the grace period streams are aborted and end with a final event; this margin
        # lets those last events reach the clients before uvicorn cancels what is left.
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 10,
    )
    # After uvicorn.Config, which configures uvicorn's loggers: its access line shows the
    # query string, where some clients put their key.
    install_redaction()
    return config


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `llmserve` command."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.command == "config":
        print(example_config() if args.example else load_settings().model_dump_json(indent=2))
        return
    if args.command == "keys":
        run_keys(args)
        return
    if args.command == "convert-default":
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        data_dir = args.data_dir or load_settings().data_path()
        print(_engine_factory("vllm").prepare_default_model(data_dir))
        return
    try:
        settings = load_settings(args.config, **_overrides(args))
    except (ValidationError, FileNotFoundError) as exc:
        raise SystemExit(f"llmserve: invalid configuration:\n{exc}") from exc
    check_engine(settings)
    check_exposure(settings)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    prepare_default_model(settings)
    serve(settings)


def prepare_default_model(settings: Settings) -> None:
    """Make the engine's default model before serving when it is the one served (vLLM's HF
    folder is converted from the bundled GGUF on first start)."""
    if settings.model is None and not settings.models:
        try:
            _engine_factory(settings.engine).prepare_default_model(settings.data_path())
        except LLMServeError as exc:
            raise SystemExit(f"llmserve: {exc.message}") from None


def _engine_factory(name: str) -> EngineFactory:
    from llmserve.engines.registry import default_registry

    return default_registry().get(name)


if __name__ == "__main__":
    main()
