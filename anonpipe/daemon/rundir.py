"""The run directory: the human audit trail of one pipeline run, as the old pipeline wrote it.

``<data_dir>/run_at_<seconds since epoch>/`` holds three folders (``from_staging/``,
``quarantine/``, ``to_production/``) and the text files named in :data:`AUDIT_FILES`. Every write
is flushed and fsynced, and the folder too when a file appears, so what the audit trail says
survives a crash. Paths are built only from the run name and the fixed names here, never from
peer data. What the lines say is :mod:`anonpipe.daemon.audit`'s business.

The files hold original Study Instance UIDs and reviewer comments: the run folder is 0700 and the
files 0600. Nothing of their content is logged.
"""

from __future__ import annotations

import builtins
import os
import re
import tempfile
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from anonpipe.durable import fsync_path
from anonpipe.logs import get_logger

__all__ = ["AUDIT_FILES", "FOLDERS", "RUN_PREFIX", "OverviewStream", "RunDir", "post_anon_output"]

RUN_PREFIX = "run_at_"
FOLDERS: tuple[str, ...] = ("from_staging", "quarantine", "to_production")
#: Every text file a run directory may hold; :meth:`RunDir.append` and friends accept only these.
AUDIT_FILES: tuple[str, ...] = (
    "overview.txt",
    "comments.txt",
    "studies_to_retrieve.txt",
    "pull_output.txt",
    "anonymize_output.txt",
    "post_anon_output.txt",
    "post_anon_output_practice.txt",
    "push_output.txt",
    "reviewed_protocol_studies.txt",
    "found_protocol_studies.txt",
    "missing_protocol_studies.txt",
    "done.txt",
)

_RUN_NAME = re.compile(re.escape(RUN_PREFIX) + r"([0-9]+)", re.ASCII)
_LINE_BREAKS = ("\n", "\r")
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_ENCODING = "utf-8"

log = get_logger(__name__)


def post_anon_output(practice: bool) -> str:
    """The file a hook's report goes to: ``post_anon_output_practice.txt`` in practice."""
    return "post_anon_output_practice.txt" if practice else "post_anon_output.txt"


@dataclass(frozen=True, slots=True)
class RunDir:
    """One run directory, ``<data_dir>/run_at_<epoch>``.

    Build it with :meth:`create` (a new run) or :meth:`open` (an existing one); the constructor
    only checks the name.

    Attributes
    ----------
    path : Path
        The run folder.
    """

    path: Path

    def __post_init__(self) -> None:
        if _RUN_NAME.fullmatch(self.path.name) is None:
            raise ValueError(
                f"{self.path} is not a run directory: the name must be {RUN_PREFIX}<seconds>"
            )

    @classmethod
    def create(cls, data_dir: Path, now: float | None = None) -> RunDir:
        """Make a new run directory named after `now` (the next free second if taken).

        Parameters
        ----------
        data_dir : Path
            The data folder (``[pipeline] data_dir``); created if missing.
        now : float or None, optional
            Seconds since the epoch; None for the current time.

        Returns
        -------
        RunDir
            The run, with its three folders made; the run folder is mode 0700.
        """
        data_dir.mkdir(parents=True, exist_ok=True)
        second = int(time.time() if now is None else now)
        while True:
            path = data_dir / f"{RUN_PREFIX}{second}"
            try:
                os.mkdir(path, _DIR_MODE)
                break
            except FileExistsError:
                second += 1
        # The umask may have taken bits away (never more than 0700: owner only).
        os.chmod(path, _DIR_MODE)
        for folder in FOLDERS:
            os.mkdir(path / folder, _DIR_MODE)
            os.chmod(path / folder, _DIR_MODE)
        fsync_path(path)
        fsync_path(data_dir)
        log.info("run directory created", run=path.name)
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run directory.

        Raises
        ------
        ValueError
            If `path` is not a folder named ``run_at_<seconds>``.
        """
        run = cls(path)
        if not path.is_dir():
            raise ValueError(f"{path} is not a run directory: no such folder")
        return run

    @staticmethod
    def list(data_dir: Path) -> builtins.list[RunDir]:
        """The run directories in `data_dir`, oldest first (by the epoch in the name).

        Other entries are ignored; a missing `data_dir` has no runs.
        """
        try:
            entries = builtins.list(data_dir.iterdir())
        except FileNotFoundError:
            return []
        runs = [RunDir(p) for p in entries if _RUN_NAME.fullmatch(p.name) and p.is_dir()]
        return sorted(runs, key=lambda run: (run.started, run.name))

    @property
    def name(self) -> str:
        """``run_at_<seconds>``."""
        return self.path.name

    @property
    def started(self) -> int:
        """Seconds since the epoch, from the name."""
        match = _RUN_NAME.fullmatch(self.path.name)
        if match is None:  # pragma: no cover - __post_init__ checked it
            raise ValueError(f"{self.path} is not a run directory")
        return int(match.group(1))

    @property
    def from_staging(self) -> Path:
        """Identified files as received from the staging PACS."""
        return self.path / "from_staging"

    @property
    def quarantine(self) -> Path:
        """Files the anonymizer would not release."""
        return self.path / "quarantine"

    @property
    def to_production(self) -> Path:
        """De-identified files, ``<study>/<series>/<instance>.dcm``, for the research PACS."""
        return self.path / "to_production"

    def file(self, filename: str) -> Path:
        """The path of audit file `filename` (ValueError if not in :data:`AUDIT_FILES`)."""
        if filename not in AUDIT_FILES:
            raise ValueError(
                f"{filename!r} is not an audit file of a run directory; "
                f"use one of {', '.join(AUDIT_FILES)}"
            )
        return self.path / filename

    def append(self, filename: str, line: str) -> None:
        """Append one line (a newline is added) to `filename`, then fsync it.

        Raises
        ------
        ValueError
            For a name not in :data:`AUDIT_FILES`, or a `line` holding a line break ("\\n" or
            "\\r": both end a line for Python's readers).
        """
        path = self.file(filename)
        _check_line(line)
        data = (line + "\n").encode(_ENCODING, "backslashreplace")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, _FILE_MODE)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
            created = False
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_path(self.path)

    def write_lines(self, filename: str, lines: Iterable[str]) -> None:
        """Replace `filename` with `lines` atomically (temporary file, fsync, rename, fsync).

        Raises
        ------
        ValueError
            As :meth:`append`; the old file is then left as it was.
        """
        path = self.file(filename)
        text = "".join(_check_line(line) + "\n" for line in lines)
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(text.encode(_ENCODING, "backslashreplace"))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_path(self.path)

    def read_lines(self, filename: str) -> builtins.list[str]:
        """The lines of `filename` without their newlines; [] if it does not exist."""
        try:
            data = self.file(filename).read_bytes()
        except FileNotFoundError:
            return []
        lines = data.decode(_ENCODING, "replace").split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline ending the last line; a torn last line is kept
        return lines

    def has(self, filename: str) -> bool:
        """Whether `filename` exists (a step resumed with ``-r`` skips if its output does)."""
        return self.file(filename).exists()

    def overview(self, line: str) -> None:
        """Append `line` to overview.txt."""
        self.append("overview.txt", line)

    def overview_stream(self, skip: Collection[str] = ()) -> OverviewStream:
        """A writable text stream into overview.txt: what a hook receives as ``overview``.

        Lines in `skip` are not written: a hook run again after a crash passes the lines that
        were there before it, so what its interrupted run wrote is not written twice.
        """
        return OverviewStream(self, skip)

    @property
    def done(self) -> bool:
        """Whether the run finished (done.txt exists)."""
        return self.has("done.txt")

    def finish(self, line: str) -> None:
        """Write done.txt with `line`: the last file of a run."""
        self.write_lines("done.txt", [line])


class OverviewStream:
    """A file-like object whose complete lines go to overview.txt, each fsynced.

    Text is buffered until a line ends ("\\n", "\\r\\n" or "\\r", as in a text file opened by
    Python); :meth:`flush` and :meth:`close` write a pending partial line too. ``print(...,
    file=stream)`` works. Thread-safe.
    """

    def __init__(self, run: RunDir, skip: Collection[str] = ()) -> None:
        self._run = run
        self._skip = frozenset(skip)
        self._pending = ""
        self._lock = threading.Lock()
        self.closed = False

    def write(self, text: str) -> int:
        """Buffer `text` and write every line it completes; returns ``len(text)``."""
        if self.closed:
            raise ValueError("write to a closed overview stream")
        with self._lock:
            buffer = (self._pending + text).replace("\r\n", "\n")
            held = ""
            if buffer.endswith("\r"):  # may be the first half of "\r\n"
                buffer, held = buffer[:-1], "\r"
            *lines, rest = buffer.replace("\r", "\n").split("\n")
            self._pending = rest + held
            for line in lines:
                self._emit(line)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        """Write each string of `lines` (no newlines are added, as for a file)."""
        for text in lines:
            self.write(text)

    def flush(self) -> None:
        """Write a pending partial line as a line of its own."""
        with self._lock:
            pending, self._pending = self._pending.rstrip("\r"), ""
            if pending:
                self._emit(pending)

    def _emit(self, line: str) -> None:
        if line not in self._skip:
            self._run.overview(line)

    def close(self) -> None:
        """Flush; later writes raise ValueError."""
        if not self.closed:
            self.flush()
            self.closed = True

    def writable(self) -> bool:
        """Always true while open."""
        return not self.closed

    def __enter__(self) -> OverviewStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _check_line(line: str) -> str:
    if any(brk in line for brk in _LINE_BREAKS):
        raise ValueError("an audit line may not contain a line break; write one line per call")
    return line
