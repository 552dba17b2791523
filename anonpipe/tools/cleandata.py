"""``anonpipe clean-data``: free the disk space of old runs, keeping their audit trail.

A finished run directory (one with ``done.txt``) started before a given day loses its data
folders (:data:`DATA_FOLDERS`: the identified originals, the quarantine, the clean files); its
text files stay, so the audit trail of what was sent and when survives. Runs without
``done.txt`` are never touched, because the daemon may be working in them or resume them. Only
run directories (``run_at_<seconds>``) directly in the data folder are considered, so the
identity store, the state database and anything else beside them are out of reach.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path

from anonpipe.daemon.rundir import RunDir
from anonpipe.durable import fsync_path

__all__ = [
    "DATA_FOLDERS",
    "IDENTIFIED_FOLDERS",
    "RunCleanup",
    "Usage",
    "clean_data",
    "cleanup_line",
    "day_start",
    "format_size",
    "parse_day",
    "total_line",
]

#: The folders of a run directory that hold DICOM files; everything else in a run stays.
DATA_FOLDERS: tuple[str, ...] = ("from_staging", "quarantine", "to_production", "no_encounter")
#: Those of :data:`DATA_FOLDERS` that hold identified originals (as pulled, and as refused).
IDENTIFIED_FOLDERS: tuple[str, ...] = ("from_staging", "quarantine")

_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)


@dataclass(frozen=True, slots=True)
class Usage:
    """Disk use of some folders: how many folders, files (of any kind) and bytes."""

    folders: int = 0
    files: int = 0
    size: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.folders + other.folders, self.files + other.files, self.size + other.size)


@dataclass(frozen=True, slots=True)
class RunCleanup:
    """What clean-data did (or would do) with one run.

    Attributes
    ----------
    run : str
        The run's name, ``run_at_<seconds>``.
    usage : Usage
        The data folders removed (or that would be removed); empty when skipped.
    skipped : str or None
        Why the run was left alone, or None.
    error : str or None
        Why removing failed part-way (some folders may be gone), or None.
    """

    run: str
    usage: Usage = Usage()
    skipped: str | None = None
    error: str | None = None


def parse_day(text: str) -> date:
    """The day ``YYYY-MM-DD`` in `text`.

    Raises
    ------
    ValueError
        With a message for the operator, when `text` is not a valid date in that form.
    """
    try:
        if _DAY.fullmatch(text) is None:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a date of the form YYYY-MM-DD (e.g. 2024-01-31)"
        ) from None


def day_start(day: date) -> float:
    """Seconds since the epoch at midnight, local time, starting `day`."""
    return datetime.combine(day, time()).timestamp()


def clean_data(data_dir: Path, before: date, *, dry_run: bool = False) -> Iterator[RunCleanup]:
    """Remove the data folders of the finished runs in `data_dir` started before `before`.

    Parameters
    ----------
    data_dir : Path
        The data folder (``[pipeline] data_dir``); a missing one has no runs.
    before : date
        Runs started before midnight (local time) at the start of this day are cleaned.
    dry_run : bool, optional
        Only measure what would be removed.

    Yields
    ------
    RunCleanup
        One per run started before `before`, oldest first, after it was handled (so the caller
        can report progress).
    """
    cutoff = day_start(before)
    for run in RunDir.list(data_dir):
        if run.started < cutoff:
            yield _clean_run(run, dry_run)


def _clean_run(run: RunDir, dry_run: bool) -> RunCleanup:
    if run.path.is_symlink():
        return RunCleanup(run.name, skipped="a symbolic link, not a run folder")
    if not run.done:
        return RunCleanup(
            run.name, skipped="not finished (no done.txt): the daemon may be working in it"
        )
    removed = Usage()
    for folder in _data_folders(run):
        usage = _measure(folder)
        if not dry_run:
            try:
                shutil.rmtree(folder)
            except OSError as exc:
                fsync_path(run.path)
                return RunCleanup(run.name, removed, error=f"{folder.name}: {_reason(exc)}")
        removed += usage
    if removed.folders and not dry_run:
        fsync_path(run.path)
    return RunCleanup(run.name, removed)


def _data_folders(run: RunDir) -> list[Path]:
    """The run's data folders that exist as real folders (a symbolic link is not followed)."""
    folders = (run.path / name for name in DATA_FOLDERS)
    return [path for path in folders if path.is_dir() and not path.is_symlink()]


def _measure(folder: Path) -> Usage:
    """The files (of any kind, hidden ones too) and bytes under `folder`; links not followed."""
    files = size = 0
    for parent, _dirs, names in os.walk(folder):
        for name in names:
            files += 1
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                size += os.lstat(os.path.join(parent, name)).st_size
    return Usage(1, files, size)


def _reason(exc: OSError) -> str:
    return f"{exc.strerror or type(exc).__name__} ({exc.filename})" if exc.filename else str(exc)


def format_size(size: int) -> str:
    """`size` bytes in decimal units, as ``456 MB``, ``1.2 GB`` or ``12 B``."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    if unit == "B" or value >= 10:
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}"


def _usage_text(usage: Usage) -> str:
    return f"{usage.folders} folders, {usage.files} files, {format_size(usage.size)}"


def cleanup_line(result: RunCleanup, dry_run: bool) -> str:
    """The line printed for one run: ``run_at_…: removed 3 folders, 1234 files, 456 MB``."""
    if result.skipped is not None:
        return f"{result.run}: skipped: {result.skipped}"
    if result.error is not None:
        return f"{result.run}: FAILED after removing {_usage_text(result.usage)}: {result.error}"
    if not result.usage.folders:
        return f"{result.run}: nothing to remove"
    verb = "would remove" if dry_run else "removed"
    return f"{result.run}: {verb} {_usage_text(result.usage)}"


def total_line(results: list[RunCleanup], dry_run: bool) -> str:
    """The closing line: what was (or would be) removed in all, from how many runs."""
    total = sum((r.usage for r in results), Usage())
    cleaned = sum(1 for r in results if r.usage.folders)
    skipped = sum(1 for r in results if r.skipped is not None)
    verb = "would remove" if dry_run else "removed"
    return (
        f"total: {verb} {_usage_text(total)} from {cleaned} runs"
        f" ({len(results)} runs before the date, {skipped} skipped)"
    )
