"""The ``anonpipe`` command: argument parsing and exit codes, nothing else.

Each subcommand is a :class:`Subcommand` in :data:`SUBCOMMANDS`: a function that adds its options
to an argparse parser and a function that takes the parsed arguments and returns an exit code.
Adding a command is one function pair and one entry. Work is done elsewhere; errors are mapped to
exit codes here (0 success, 1 failure, 2 usage or configuration error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from anonpipe import __version__
from anonpipe.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    load_settings,
    settings_as_dict,
)

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2

Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True, slots=True)
class Subcommand:
    """One ``anonpipe NAME`` command: its help line, its options and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Run


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help=f"configuration file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})",
    )


def _toml_value(value: Any) -> str:
    """Render a JSON-able value as TOML, so that check-config's output can be read back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid in TOML
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _check_config(args: argparse.Namespace) -> int:
    """Print the effective settings, one ``section.key = value`` line each, secrets redacted."""
    settings = load_settings(args.config, os.environ)
    print(f"# anonpipe configuration from {settings.source}: valid")
    for section, table in settings_as_dict(settings).items():
        for key, value in table.items():
            print(f"{section}.{key} = {_toml_value(value)}")
    if not settings.local.allowed_peers:
        peers = [{"ae_title": p.ae_title, "host": p.host} for p in settings.allowed_peers]
        print(f"# local.allowed_peers is empty, so the effective peers are {_toml_value(peers)}")
    return EXIT_OK


SUBCOMMANDS: Final[tuple[Subcommand, ...]] = (
    Subcommand(
        "check-config",
        "validate the configuration file and print the effective settings",
        _add_config_option,
        _check_config,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser from :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="anonpipe",
        description="Resident DICOM de-identification service (staging PACS to research PACS).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``anonpipe`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code.

    Notes
    -----
    Logging is deliberately not configured here or for check-config, which only prints.
    Daemon-type subcommands (daemon, run-once, anonymize) configure it once, first thing in their
    ``run`` function right after :func:`~anonpipe.config.load_settings`, with
    ``anonpipe.logs.configure_logging(settings.logging.level, settings.logging.format)``.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Run = args.run
    try:
        return run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
