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
from anonpipe.closedpipe import quiet_on_closed_pipe
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


def _startup_errors() -> tuple[type[BaseException], ...]:
    from anonpipe.anon.identity import IdentityError
    from anonpipe.daemon.lock import DataDirLocked
    from anonpipe.daemon.reviewdb import ReviewDatabaseError
    from anonpipe.hooks import HookError

    return (OSError, IdentityError, ReviewDatabaseError, HookError, RuntimeError, DataDirLocked)


def _startup_exit(command: str, exc: BaseException) -> int:
    """Report a start-up failure; configuration problems (review DB, hook, key, a data folder
    another anonpipe holds) exit 2, the rest (a port in use, a socket held by another daemon) 1."""
    from anonpipe.anon.identity import IdentityError
    from anonpipe.daemon.lock import DataDirLocked
    from anonpipe.daemon.reviewdb import ReviewDatabaseError
    from anonpipe.hooks import HookError

    print(f"anonpipe {command}: cannot start: {exc}", file=sys.stderr)
    if isinstance(exc, IdentityError | ReviewDatabaseError | HookError | DataDirLocked):
        return EXIT_USAGE
    return EXIT_FAILURE


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


def _check_config_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument(
        "--live",
        action="store_true",
        help="also connect: review database, identity.db and key, data folder's free space, "
        "C-ECHO to both PACS (exit 1 if one fails)",
    )


def _check_config(args: argparse.Namespace) -> int:
    """Print the effective settings, one ``section.key = value`` line each, secrets redacted;
    with ``--live`` then one OK or PROBLEM line per live check."""
    import asyncio

    from anonpipe.logs import configure_logging
    from anonpipe.preflight import config_problems, live_checks

    settings = load_settings(args.config, os.environ)
    problems = config_problems(settings)  # the old pipeline's identity.db, an unknown hook
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return EXIT_USAGE
    print(f"# anonpipe configuration from {settings.source}: valid")
    for section, table in settings_as_dict(settings).items():
        for key, value in table.items():
            print(f"{section}.{key} = {_toml_value(value)}")
    if not settings.local.allowed_peers:
        peers = [{"ae_title": p.ae_title, "host": p.host} for p in settings.allowed_peers]
        print(f"# local.allowed_peers is empty, so the effective peers are {_toml_value(peers)}")
    if not args.live:
        return EXIT_OK
    configure_logging("error", settings.logging.format)  # type: ignore[arg-type]
    checks = asyncio.run(live_checks(settings))
    print("# live checks")
    for check in checks:
        print(check.line())
    return EXIT_OK if all(check.ok for check in checks) else EXIT_FAILURE


def _conformance_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument(
        "--format",
        choices=("md", "json"),
        default="md",
        help="md: a document for a privacy officer (default); json: for programs",
    )


def _conformance(args: argparse.Namespace) -> int:
    """Print what the engine does with the configured options, from the data it runs on."""
    from anonpipe.anon.conformance import Retention, build_statement, render
    from anonpipe.daemon.service import state_store_path
    from anonpipe.tools.cleandata import DATA_FOLDERS, IDENTIFIED_FOLDERS

    settings = load_settings(args.config, os.environ)
    retention = Retention(
        data_dir=str(settings.pipeline.data_dir),
        folders=DATA_FOLDERS,
        identified=IDENTIFIED_FOLDERS,
        kept=(
            (
                f"`{state_store_path(settings)}`",
                "the original Study Instance UID and Accession Number of every study pulled,"
                " until the file is deleted",
            ),
            (
                "the text files of each run (kept by clean-data: the audit trail)",
                "original Study Instance UIDs (studies_to_retrieve.txt, anonymize_output.txt)",
            ),
            (
                "`.practice-identity.db` in a practice run's folder",
                "a copy of identity.db, from the practice run's start until it finishes",
            ),
        ),
    )
    print(render(build_statement(settings.anon, retention), args.format), end="")
    return EXIT_OK


def _anonymize_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument("src", type=Path, metavar="SRC", help="folder of identified DICOM files")
    parser.add_argument("dest", type=Path, metavar="DEST", help="folder for the clean files")
    parser.add_argument(
        "--quarantine",
        type=Path,
        metavar="DIR",
        help="folder for quarantined originals (default: 'quarantine' beside DEST)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, metavar="N", help="worker processes (default: cores)"
    )


def _anonymize(args: argparse.Namespace) -> int:
    """De-identify SRC into DEST offline, with the daemon's engine and identity store."""
    from anonpipe.anon.batch import engine_spec, iter_files, run_batch
    from anonpipe.anon.identity import IdentityError, check_identity, load_or_create_key
    from anonpipe.logs import configure_logging

    settings = load_settings(args.config, os.environ)
    # No networking here: pynetdicom is never imported, so its switches need not be set (the
    # import alone was a tenth of this command's start-up). A test keeps it out.
    configure_logging(settings.logging.level, settings.logging.format, libraries=False)  # type: ignore[arg-type]
    if not args.src.is_dir():
        print(f"anonpipe anonymize: SRC {args.src} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    if args.jobs is not None and args.jobs < 1:
        print("anonpipe anonymize: --jobs must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    anon = settings.anon
    try:
        # a foreign identity.db, or one another key made: refused before a key is created
        check_identity(anon.identity_db, anon.key_file)
        key = load_or_create_key(anon.key_file)
    except IdentityError as exc:
        print(f"anonpipe anonymize: {exc}", file=sys.stderr)
        return EXIT_USAGE
    spec = engine_spec(anon, key)
    quarantine_dir = args.quarantine or args.dest.parent / "quarantine"
    files = list(iter_files(args.src))
    progress = _Progress(len(files), sys.stderr)
    try:
        summary = run_batch(
            files, args.dest, quarantine_dir, spec, args.jobs or anon.jobs, progress.update
        )
    except IdentityError as exc:
        print(f"anonpipe anonymize: {exc}", file=sys.stderr)
        return EXIT_USAGE
    progress.done()
    print(
        f"{summary.total} files: {summary.clean} clean, {summary.duplicates} duplicates, "
        f"{sum(summary.quarantined.values())} quarantined, {sum(summary.errors.values())} errors"
    )
    if summary.duplicates:
        print("  duplicates: same SOP Instance UID and content as a file written: written once")
    for label, counts in (("quarantined", summary.quarantined), ("errors", summary.errors)):
        for reason, count in sorted(counts.items()):
            print(f"  {label}: {reason}: {count}")
    for attribute, count in sorted(summary.disagreements.items()):
        print(
            f"  patient identity: {count} files differ from their study's first object in"
            f" {attribute} (they keep the study's pseudonyms)"
        )
    print(f"clean files in {args.dest}; quarantine in {quarantine_dir}")
    return EXIT_FAILURE if summary.errors else EXIT_OK


class _Progress:
    """A one-line progress counter on a terminal; silent otherwise."""

    def __init__(self, total: int, stream: Any) -> None:
        self.total, self.count, self.stream = total, 0, stream
        self.live = bool(getattr(stream, "isatty", lambda: False)())

    def update(self, _outcome: object) -> None:
        self.count += 1
        if self.live and (self.count % 25 == 0 or self.count == self.total):
            self.stream.write(f"\r{self.count}/{self.total} files")
            self.stream.flush()

    def done(self) -> None:
        if self.live:
            self.stream.write("\n")


def _echo_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument(
        "peer",
        nargs="?",
        choices=("staging", "research", "all"),
        default="all",
        help="which configured PACS to C-ECHO (default: all)",
    )


def _echo(args: argparse.Namespace) -> int:
    """C-ECHO the configured PACS as our AE title: checks their address and that they know us."""
    from anonpipe.logs import configure_logging
    from anonpipe.scu import echo, remote_peers

    settings = load_settings(args.config, os.environ)
    configure_logging("error", settings.logging.format)  # type: ignore[arg-type]
    peers = remote_peers(settings)
    names = list(peers) if args.peer == "all" else [args.peer]
    failed = 0
    for name in names:
        result = echo(settings.local, peers[name])
        if result.ok:
            print(f"{name}: {result.peer}: ok ({result.seconds * 1000:.0f} ms)")
        else:
            failed += 1
            print(f"{name}: {result.peer}: FAILED: {result.error}")
    return EXIT_FAILURE if failed else EXIT_OK


def _daemon(args: argparse.Namespace) -> int:
    """The resident service, in the foreground (systemd ``Type=notify``)."""
    import asyncio

    from anonpipe.daemon.service import Service
    from anonpipe.logs import configure_logging

    settings = load_settings(args.config, os.environ)
    configure_logging(settings.logging.level, settings.logging.format)  # type: ignore[arg-type]
    try:
        asyncio.run(Service(settings).serve())
    except _startup_errors() as exc:
        return _startup_exit("daemon", exc)
    return EXIT_OK


def _run_once_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument(
        "--max", type=int, metavar="N", help="at most N studies (pipeline.max_studies)"
    )
    parser.add_argument(
        "--practice",
        action="store_true",
        help="no push, no review-DB writes, identity.db untouched",
    )
    parser.add_argument("--no-push", action="store_true", help="stop after the post-anon hook")


def _run_once(args: argparse.Namespace) -> int:
    """One whole run in the foreground (an unfinished or failed run is resumed first), then exit."""
    import asyncio

    from anonpipe.daemon.runner import RunStopped, execute_run
    from anonpipe.daemon.service import Service
    from anonpipe.logs import configure_logging

    settings = load_settings(args.config, os.environ)
    configure_logging(settings.logging.level, settings.logging.format)  # type: ignore[arg-type]
    if args.max is not None and args.max < 1:
        print("anonpipe run-once: --max must be at least 1", file=sys.stderr)
        return EXIT_USAGE

    async def once() -> str | None:
        service = Service(settings)
        await service.start(control=False)
        try:
            if service.pipeline is None:  # pragma: no cover - set by start()
                return None
            runs = await service.store.runs()
            # In the foreground the operator is present: an interrupted or failed run resumes.
            run = runs[-1] if runs and runs[-1].state != "done" else None
            try:
                result = await execute_run(
                    service.pipeline,
                    run,
                    max_studies=args.max,
                    practice=True if args.practice else None,
                    no_push=True if args.no_push else None,
                )
            except RunStopped as exc:  # a PACS is down or silent: nothing was written back
                print(f"run stopped: {exc}; run-once again (or the daemon) resumes it")
                return "stopped"
            if result is None:
                print("nothing to do: no approved study is waiting")
                return "done"
            print(f"{result.name}: {result.state}" + (f" ({result.error})" if result.error else ""))
            print(f"run directory: {result.path}")
            return result.state
        finally:
            await service.stop()

    try:
        state = asyncio.run(once())
    except _startup_errors() as exc:
        return _startup_exit("run-once", exc)
    return EXIT_OK if state == "done" else EXIT_FAILURE


def _day(text: str) -> object:
    """An argparse type: the ``--before`` day (a usage error with the reason if invalid)."""
    from anonpipe.tools.cleandata import parse_day

    try:
        return parse_day(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _clean_data_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument(
        "--before",
        required=True,
        type=_day,
        metavar="YYYY-MM-DD",
        help="clean the finished runs started before this day (local time)",
    )
    parser.add_argument("--dry-run", action="store_true", help="only print what would be removed")


def _clean_data(args: argparse.Namespace) -> int:
    """Remove the data folders of old finished runs; keep their text files (the audit trail)."""
    from anonpipe.tools.cleandata import RunCleanup, clean_data, cleanup_line, total_line

    settings = load_settings(args.config, os.environ)
    data_dir = settings.pipeline.data_dir
    if args.dry_run:
        print(f"dry run: nothing is deleted in {data_dir}")
    results: list[RunCleanup] = []
    for result in clean_data(data_dir, args.before, dry_run=args.dry_run):
        results.append(result)
        print(cleanup_line(result, args.dry_run), flush=True)
    print(total_line(results, args.dry_run))
    return EXIT_FAILURE if any(r.error for r in results) else EXIT_OK


def _filter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, metavar="SRC", help="folder of DICOM files")
    parser.add_argument(
        "dest",
        type=Path,
        nargs="?",
        metavar="DEST",
        help="where matched files go, at the same relative path (not with --delete)",
    )
    for option, what in (("studies", "Study"), ("series", "Series"), ("instances", "SOP")):
        parser.add_argument(
            f"--{option}",
            default="",
            metavar="UIDS",
            help=f"comma-separated {what} Instance UIDs",
        )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help='UIDs in a JSON file: {"studies": [...], "series": [...], "instances": [...]}',
    )
    parser.add_argument(
        "--delete", action="store_true", help="delete the matched files instead of moving them"
    )


def _filter_usage(args: argparse.Namespace) -> str | None:
    """Why SRC and DEST do not fit the request, or None."""
    if not args.src.is_dir():
        return f"SRC {args.src} is not a folder"
    if args.delete:
        return "DEST is not used with --delete; leave it out" if args.dest else None
    if args.dest is None:
        return "DEST is required (or --delete to delete the matched files)"
    if args.dest.resolve() == args.src.resolve():
        return "DEST must differ from SRC"
    return None


def _filter(args: argparse.Namespace) -> int:
    """Move (or delete) the files of the given studies, series or instances."""
    from anonpipe.tools.filtering import (
        SelectionError,
        UidSelection,
        counts_line,
        filter_files,
        load_selection,
        parse_uid_list,
    )

    problem = _filter_usage(args)
    selection = UidSelection(
        parse_uid_list(args.studies), parse_uid_list(args.series), parse_uid_list(args.instances)
    )
    if problem is None and args.json is not None:
        try:
            selection |= load_selection(args.json)
        except SelectionError as exc:
            problem = str(exc)
    if problem is None and not selection:
        problem = "no UIDs given: use --studies, --series, --instances or --json"
    if problem is not None:
        print(f"anonpipe filter: {problem}", file=sys.stderr)
        return EXIT_USAGE
    counts = filter_files(args.src, selection, None if args.delete else args.dest)
    for path, reason in counts.failed:
        print(
            f"anonpipe filter: cannot {'delete' if args.delete else 'move'} {path}: {reason}",
            file=sys.stderr,
        )
    print(counts_line(counts, args.delete))
    return EXIT_FAILURE if counts.failed else EXIT_OK


def _summary_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="folder of DICOM files")


def _summary(args: argparse.Namespace) -> int:
    """Print the unique Study/Series Descriptions and Patient Names under DIR, with counts."""
    from anonpipe.tools.summary import summarize, summary_lines

    if not args.dir.is_dir():
        print(f"anonpipe summary: {args.dir} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    for line in summary_lines(summarize(args.dir)):
        print(line)
    return EXIT_OK


def _import_identity_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument(
        "old_db",
        type=Path,
        metavar="OLD_DB",
        help="the old pipeline's identity.db (only read, never changed)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="report what would be imported; write nothing"
    )


def _import_identity(args: argparse.Namespace) -> int:
    """Import the old pipeline's mappings into ``[anon] identity_db`` (counts, never values)."""
    import secrets
    import sqlite3

    from anonpipe.anon.identity import IdentityError, load_or_create_key
    from anonpipe.anon.legacy import LegacyError, import_identity
    from anonpipe.daemon.lock import DataDirLock, DataDirLocked

    settings = load_settings(args.config, os.environ)
    anon = settings.anon
    lock = DataDirLock(settings.pipeline.data_dir)
    try:
        if args.dry_run:  # creates nothing, not even the key file
            exists = anon.key_file.exists()
            key = load_or_create_key(anon.key_file) if exists else secrets.token_bytes(32)
        else:
            lock.acquire()  # no daemon or run-once de-identifies while mappings are added
            key = load_or_create_key(anon.key_file)
        report = import_identity(
            args.old_db, anon.identity_db, key, anon.date_shift_days, dry_run=args.dry_run
        )
    except (LegacyError, IdentityError, DataDirLocked) as exc:
        print(f"anonpipe import-identity: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (sqlite3.Error, OSError) as exc:
        print(f"anonpipe import-identity: failed, nothing imported: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        lock.release()
    for line in report.lines():
        print(line)
    return EXIT_OK


def _import_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "settings",
        type=Path,
        metavar="LOCAL_SETTINGS",
        help="the old pipeline's local_settings.py (read as data, never run)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write the TOML here (default: stdout)"
    )
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")


def _import_settings(args: argparse.Namespace) -> int:
    """Convert the old local_settings.py; exit 1 when some value still needs the operator."""
    from anonpipe.tools.import_settings import (
        ImportSettingsError,
        check,
        convert,
        write_output,
    )

    name = "anonpipe import-settings"
    output: Path | None = args.output
    if (
        output is not None
        and output.exists()
        and (not args.force or output.resolve() == args.settings.resolve())
    ):
        why = "it is LOCAL_SETTINGS" if args.force else "pass --force to replace it"
        print(f"{name}: {output} exists; {why}", file=sys.stderr)
        return EXIT_USAGE
    try:
        conversion = convert(args.settings)
    except ImportSettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    check(conversion, str(output or "the result"))
    if output is None:
        sys.stdout.write(conversion.text)
    else:
        try:
            write_output(conversion.text, output, force=args.force)
        except FileExistsError:
            print(f"{name}: {output} exists; pass --force to replace it", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:
            print(f"{name}: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"{name}: wrote {output}", file=sys.stderr)
    for item in conversion.todo:
        print(f"{name}: to do: {item}", file=sys.stderr)
    for item in conversion.attention:
        print(f"{name}: needs attention: {item}", file=sys.stderr)
    return EXIT_FAILURE if conversion.attention else EXIT_OK


SUBCOMMANDS: Final[tuple[Subcommand, ...]] = (
    Subcommand(
        "check-config",
        "validate the configuration file and print the effective settings; --live connects",
        _check_config_arguments,
        _check_config,
    ),
    Subcommand(
        "conformance",
        "print what de-identification does with these settings (for a privacy officer)",
        _conformance_arguments,
        _conformance,
    ),
    Subcommand(
        "anonymize",
        "de-identify a folder of DICOM files offline (same engine and identity store)",
        _anonymize_arguments,
        _anonymize,
    ),
    Subcommand(
        "echo",
        "C-ECHO the staging and/or research PACS with our AE title (no daemon needed)",
        _echo_arguments,
        _echo,
    ),
    Subcommand(
        "daemon",
        "run the resident service in the foreground (for systemd, Type=notify)",
        _add_config_option,
        _daemon,
    ),
    Subcommand(
        "run-once",
        "one whole run in the foreground (resuming an unfinished or failed one first), then exit",
        _run_once_arguments,
        _run_once,
    ),
    Subcommand(
        "clean-data",
        "remove the DICOM folders of finished runs older than a date, keeping their text files",
        _clean_data_arguments,
        _clean_data,
    ),
    Subcommand(
        "filter",
        "move (or delete) the DICOM files of given study, series or instance UIDs",
        _filter_arguments,
        _filter,
    ),
    Subcommand(
        "summary",
        "print the Study/Series Descriptions and Patient Names in a folder, with counts",
        _summary_arguments,
        _summary,
    ),
    Subcommand(
        "import-identity",
        "import the old pipeline's identity.db (its UIDs and pseudonyms) into identity_db",
        _import_identity_arguments,
        _import_identity,
    ),
    Subcommand(
        "import-settings",
        "convert the old pipeline's local_settings.py to an anonpipe.toml (read, never run)",
        _import_settings_arguments,
        _import_settings,
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

    A reader that closes the pipe early (``anonpipe check-config | head -1``) ends the command
    quietly (:func:`~anonpipe.closedpipe.quiet_on_closed_pipe`).
    """
    return quiet_on_closed_pipe(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
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
