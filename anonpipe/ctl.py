"""``anonpipectl``: the operator's client of the daemon's control socket.

The protocol is one JSON object per line each way: the request ``{"command": ..., "args": {...}}``
and the reply ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. This module
parses the command line, sends one request, reads the reply back into the daemon's typed models
(:mod:`anonpipe.daemon.status`) and prints it for people, or as JSON with ``--json``; the daemon
does the work.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from anonpipe import __version__
from anonpipe.closedpipe import quiet_on_closed_pipe
from anonpipe.config import ConfigError, load_settings
from anonpipe.daemon.states import StudyState
from anonpipe.daemon.status import (
    RunDetail,
    RunSummary,
    StatusReport,
    StudyStatus,
    from_json,
)
from anonpipe.scu.echo import EchoResult

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "ControlError",
    "DaemonUnreachable",
    "build_parser",
    "format_echo",
    "format_run",
    "format_runs",
    "format_status",
    "main",
    "request",
]

#: Exit codes: done; the daemon refused the request or it failed (an echo that failed, a reply
#: not understood); usage or configuration error; the daemon could not be reached.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
REPLY_LIMIT = 16 * 1024 * 1024

_EXIT_CODES = """\
exit codes:
  0  done (status, runs and show print what the daemon said, whatever its state)
  1  the daemon refused the request or it failed (no such run, an echo that failed)
  2  usage or configuration error
  3  the daemon could not be reached (not running, no permission on the socket, no reply)

Every command prints a readable result; --json prints the daemon's reply as JSON instead
(the contract: README, "anonpipectl and the control socket")."""


class ControlError(Exception):
    """The daemon refused the request, or could not be reached (:class:`DaemonUnreachable`)."""


class DaemonUnreachable(ControlError):
    """No daemon answered on the control socket."""


def request(socket_path: Path, command: str, args: dict[str, Any], timeout: float = 30.0) -> Any:
    """Send one control request and return the daemon's ``result`` (JSON values).

    Raises
    ------
    DaemonUnreachable
        When the socket is absent, refuses us, or closes or times out without a reply.
    ControlError
        When the daemon answers with an error, or not with a JSON reply.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
            reply = sock.makefile("rb").readline(REPLY_LIMIT)
    except FileNotFoundError:
        raise DaemonUnreachable(
            f"no control socket at {socket_path}: is the daemon running? "
            "(systemctl status anonpipe, or start `anonpipe daemon`)"
        ) from None
    except PermissionError:
        raise DaemonUnreachable(
            f"permission denied on {socket_path}: run as the anonpipe user or a member of its group"
        ) from None
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise DaemonUnreachable(f"cannot talk to the daemon at {socket_path}: {why}") from None
    if not reply:
        raise DaemonUnreachable(
            f"the daemon at {socket_path} closed the connection without a reply"
        )
    try:
        answer = json.loads(reply)
    except ValueError:
        raise ControlError(f"the reply from {socket_path} is not JSON") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the reply from {socket_path} is not a JSON object")
    if not answer.get("ok", False):
        raise ControlError(str(answer.get("error", "the daemon refused the request")))
    return answer.get("result")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the contract: ``anonpipectl [-c CONFIG | --socket PATH] COMMAND``."""
    parser = argparse.ArgumentParser(
        prog="anonpipectl",
        description=__doc__.splitlines()[0],
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"anonpipectl {__version__}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", type=Path, help="configuration file (finds the socket)")
    where.add_argument("--socket", type=Path, help="control socket path")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="the daemon's reply as JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=text, description=text, parents=[output], epilog=_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip

    command("status", "daemon state, current run and its studies, peers, SCP, last errors")
    command("runs", "list runs, oldest first")
    command("show", "one run in detail: its studies and overview.txt").add_argument("run")
    command("restart-run", "resume a failed or stopped run").add_argument(
        "run", nargs="?", help="run name (default: the newest)"
    )
    command("pause", "finish the current step, start nothing new (kept until resume)")
    command("resume", "undo pause (and a misroute's block)")
    command("poll", "poll the review database now")
    command("echo", "C-ECHO a peer from the daemon").add_argument(
        "peer", choices=["staging", "research"]
    )
    return parser


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    return load_settings(args.config, os.environ).control.socket


# -- rendering --------------------------------------------------------------------------------


def _when(iso: str | None) -> str:
    """A UTC ISO 8601 time as local time to the second ("" for None)."""
    if not iso:
        return ""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


def _took(run: RunSummary) -> str:
    if not (run.started and run.finished):
        return ""
    try:
        seconds = (
            datetime.fromisoformat(run.finished) - datetime.fromisoformat(run.started)
        ).total_seconds()
    except ValueError:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart; None shows as nothing."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    return [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in (list(header), *cells)
    ]


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


def _study_lines(studies: Sequence[StudyStatus]) -> list[str]:
    lines = _table(
        _STUDY_COLUMNS,
        (
            (
                s.study,
                s.step,
                s.expected,
                s.landed,
                s.clean,
                s.quarantined,
                s.duplicates,
                s.pushed,
                s.reason,
                s.notes,
            )
            for s in studies
        ),
    )
    pushing = [s for s in studies if s.step is StudyState.PUSHING]
    if pushing:
        lines += ["", "in their push:"]
        for s in pushing:
            retries = f"{s.retries} retries" if s.retries != 1 else "1 retry"
            last = f", last refusal or abort: {s.push_error}" if s.push_error else ""
            lines.append(
                f"  study {s.study}: {s.pushed} of {s.clean} in the research PACS, "
                f"{retries if s.retries else 'no retries'}{last}"
            )
    return lines


def _run_line(run: RunSummary) -> str:
    kind = " (practice)" if run.practice else " (no push)" if run.no_push else ""
    error = f"  ({run.error})" if run.error else ""
    return f"{run.name}{kind}: {run.state}{error}"


def format_status(status: StatusReport | Mapping[str, Any]) -> str:
    """``anonpipectl status`` as lines and tables (a JSON reply is read as the model first)."""
    if not isinstance(status, StatusReport):
        status = StatusReport.from_json(status)
    lines = [f"state     {status.state}"]
    if status.paused and status.paused_since:
        lines.append(f"paused    since {_when(status.paused_since)}, until `anonpipectl resume`")
    if status.misroute:
        lines.append(f"MISROUTE  {status.misroute}")
    if status.run:
        lines.append(f"run       {_run_line(status.run)}")
    scp = status.scp
    if scp:
        lines.append(
            f"scp       {scp.ae_title} on {scp.bind}:{scp.port}, "
            f"{'listening' if scp.listening else 'NOT listening'}, "
            f"{scp.active_associations} active, {scp.landed} landed"
            + (f", refused {_counts(scp.refused)}" if scp.refused else "")
            + (
                f", rejected {_counts(scp.rejected_associations)}"
                if scp.rejected_associations
                else ""
            )
        )
    for name, peer in sorted(status.peers.items()):
        if peer.ok:
            state = "ok"
        else:
            since = f" since {_when(peer.down_since)}" if peer.down_since else ""
            again = f" (asking again about {_when(peer.next_check)})" if peer.next_check else ""
            state = f"UNREACHABLE{since}: {peer.error}{again}"
        lines.append(f"{name:<9} {peer.peer}: {state}")
    if status.studies:
        lines += ["", *_study_lines(status.studies)]
    if status.held:
        lines += ["", "held back (reviews conflict):"]
        lines += [f"  study {h.study}: {h.reason}" for h in status.held]
    if status.deferred:
        lines += ["", "deferred (failed again; tried later):"]
        lines += [
            f"  study {d.study}: next try {_when(d.next_try)} after {d.failures} failures"
            f" ({d.reason})"
            for d in status.deferred
        ]
    if status.errors:
        lines += ["", "last errors:"]
        lines += [f"  {e}" for e in status.errors[-5:]]
    return "\n".join(lines)


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


def format_runs(runs: Sequence[RunSummary]) -> str:
    """``anonpipectl runs``: one line per run, oldest first."""
    if not runs:
        return "no runs yet"
    return "\n".join(
        _table(
            ("run", "state", "started", "finished", "took", "kind", "error"),
            (
                (
                    r.name,
                    r.state,
                    _when(r.started),
                    _when(r.finished),
                    _took(r),
                    "practice" if r.practice else "no push" if r.no_push else "",
                    r.error,
                )
                for r in runs
            ),
        )
    )


def format_run(run: RunDetail) -> str:
    """``anonpipectl show RUN``: the run, its studies and its overview.txt."""
    lines = [
        f"run       {_run_line(run)}",
        f"folder    {run.path}",
        f"started   {_when(run.started)}",
    ]
    if run.finished:
        lines.append(f"finished  {_when(run.finished)} (took {_took(run)})")
    if run.studies:
        lines += ["", *_study_lines(run.studies)]
    lines += ["", "overview.txt:", *(f"  {line}" for line in run.overview or ("(empty)",))]
    return "\n".join(lines)


def format_echo(name: str, result: EchoResult) -> str:
    """``anonpipectl echo PEER``, as ``anonpipe echo`` says it."""
    if result.ok:
        return f"{name}: {result.peer}: ok ({result.seconds * 1000:.0f} ms)"
    return f"{name}: {result.peer}: FAILED: {result.error}"


def _render(args: argparse.Namespace, result: Any) -> tuple[str, int]:
    """The text to print and the exit code of a reply (raises ValueError if not understood)."""
    code = EXIT_OK
    if args.command == "echo":
        echoed = from_json(EchoResult, result)
        code = EXIT_OK if echoed.ok else EXIT_FAILURE
    if args.json:
        return json.dumps(result, indent=2), code
    renderers: dict[str, Callable[[Any], str]] = {
        "status": lambda r: format_status(StatusReport.from_json(r)),
        "runs": lambda r: format_runs([RunSummary.from_json(x) for x in _list(r)]),
        "show": lambda r: format_run(RunDetail.from_json(r)),
        "echo": lambda r: format_echo(args.peer, from_json(EchoResult, r)),
    }
    render = renderers.get(args.command)
    if render is None:  # the sentences of restart-run, pause, resume, poll
        if not isinstance(result, str):
            raise ValueError(f"expected a sentence, got {type(result).__name__}")
        return result, code
    return render(result), code


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return value


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
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
    except DaemonUnreachable as exc:
        print(f"anonpipectl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlError as exc:
        print(f"anonpipectl: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        text, code = _render(args, result)
    except ValueError as exc:
        print(f"anonpipectl: the daemon's reply was not understood: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    sys.stdout.write(text + "\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anonpipectl``; returns the exit code (see :data:`EXIT_OK` and on).

    A reader that closes the pipe early (``anonpipectl status | head -1``) ends it quietly,
    with the command's own exit code.
    """
    return quiet_on_closed_pipe(lambda: _main(argv))


if __name__ == "__main__":
    raise SystemExit(main())
