"""``anonpipectl``: the operator's client of the daemon's control socket.

The protocol is one JSON object per line each way: the request ``{"command": ..., "args": {...}}``
and the reply ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. This module
only parses the command line, sends one request and prints the reply; the daemon does the work.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anonpipe import __version__
from anonpipe.config import ConfigError, load_settings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
REPLY_LIMIT = 16 * 1024 * 1024


class ControlError(Exception):
    """The daemon could not be reached or refused the request."""


def request(socket_path: Path, command: str, args: dict[str, Any], timeout: float = 30.0) -> Any:
    """Send one control request and return the daemon's ``result``.

    Raises
    ------
    ControlError
        When the socket is absent or refuses us, or the daemon answers with an error.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
            reply = sock.makefile("rb").readline(REPLY_LIMIT)
    except FileNotFoundError:
        raise ControlError(
            f"no control socket at {socket_path}: is the daemon running? "
            "(systemctl status anonpipe, or start `anonpipe daemon`)"
        ) from None
    except PermissionError:
        raise ControlError(
            f"permission denied on {socket_path}: run as the anonpipe user or a member of its group"
        ) from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the daemon at {socket_path}: {exc.strerror}") from None
    if not reply:
        raise ControlError(f"the daemon at {socket_path} closed the connection without a reply")
    answer = json.loads(reply)
    if not answer.get("ok", False):
        raise ControlError(str(answer.get("error", "the daemon refused the request")))
    return answer.get("result")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the contract: ``anonpipectl [-c CONFIG | --socket PATH] COMMAND``."""
    parser = argparse.ArgumentParser(prog="anonpipectl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"anonpipectl {__version__}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", type=Path, help="configuration file (finds the socket)")
    where.add_argument("--socket", type=Path, help="control socket path")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", help="daemon state, current run, peers, last errors")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser("runs", help="list runs")
    show = commands.add_parser("show", help="one run in detail")
    show.add_argument("run")
    restart = commands.add_parser("restart-run", help="resume a failed or stopped run")
    restart.add_argument("run", nargs="?", help="run name (default: the newest)")
    commands.add_parser("pause", help="finish the current step, start nothing new")
    commands.add_parser("resume", help="undo pause")
    commands.add_parser("poll", help="poll the review database now")
    echo = commands.add_parser("echo", help="C-ECHO a peer")
    echo.add_argument("peer", choices=["staging", "research"])
    return parser


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    return load_settings(args.config, os.environ).control.socket


def _print(result: Any, as_json: bool) -> None:
    if as_json or not isinstance(result, dict):
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    width = max((len(str(key)) for key in result), default=0)
    for key, value in result.items():
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        print(f"{key:<{width}}  {shown}")


_STUDY_COLUMNS = (
    "study",
    "step",
    "expected",
    "landed",
    "clean",
    "quarantined",
    "duplicates",
    "pushed",
    "reason",
    "notes",
)


def format_status(status: dict[str, Any]) -> str:
    """``anonpipectl status`` as a readable table (``--json`` prints the raw reply)."""
    run = status.get("run") or {}
    scp = status.get("scp") or {}
    lines = [f"state     {status.get('state', '?')}"]
    if status.get("misroute"):
        lines.append(f"MISROUTE  {status['misroute']}")
    if run:
        error = f"  ({run['error']})" if run.get("error") else ""
        lines.append(f"run       {run.get('name')}: {run.get('state')}{error}")
    if scp:
        lines.append(
            f"scp       {scp.get('ae_title')} on {scp.get('bind')}:{scp.get('port')}, "
            f"{'listening' if scp.get('listening') else 'NOT listening'}, "
            f"{scp.get('active_associations', 0)} active, {scp.get('landed', 0)} landed"
            + (f", refused {scp['refused']}" if scp.get("refused") else "")
            + (
                f", rejected {scp['rejected_associations']}"
                if scp.get("rejected_associations")
                else ""
            )
        )
    for name, peer in sorted((status.get("peers") or {}).items()):
        state = "ok" if peer.get("ok") else f"UNREACHABLE: {peer.get('error')}"
        lines.append(f"{name:<9} {peer.get('peer')}: {state}")
    studies = status.get("studies") or []
    if studies:
        rows = [
            [str(s.get(c) if s.get(c) is not None else "") for c in _STUDY_COLUMNS] for s in studies
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_STUDY_COLUMNS)]
        lines.append("")
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(_STUDY_COLUMNS, widths, strict=True)).rstrip()
        )
        lines += [
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
    held = status.get("held") or []
    if held:
        lines.append("")
        lines.append("held back (reviews conflict):")
        lines += [f"  study {h.get('study')}: {h.get('reason')}" for h in held]
    deferred = status.get("deferred") or []
    if deferred:
        lines.append("")
        lines.append("deferred (failed again; tried later):")
        lines += [
            f"  study {d.get('study')}: next try {d.get('next_try')} after {d.get('failures')} "
            f"failures ({d.get('reason')})"
            for d in deferred
        ]
    errors = status.get("errors") or []
    if errors:
        lines.append("")
        lines.append("last errors:")
        lines += [f"  {e}" for e in errors[-5:]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anonpipectl``; returns the exit code."""
    args = build_parser().parse_args(argv)
    request_args = {
        key: value
        for key, value in vars(args).items()
        if key not in {"command", "config", "socket", "json"} and value is not None
    }
    try:
        result = request(_socket_path(args), args.command, request_args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        print(f"anonpipectl: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.command == "status" and not args.json and isinstance(result, dict):
        print(format_status(result))
    else:
        _print(result, getattr(args, "json", False))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
