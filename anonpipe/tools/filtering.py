"""``anonpipe filter``: move (or delete) the DICOM files of given studies, series or instances.

A file matches when its Study, Series or SOP Instance UID is in the :class:`UidSelection`. Only
the three UIDs of the header are read. A matched file is moved to the same relative path under
the destination (an atomic rename on one filesystem; across filesystems a copy that is flushed
to disk before the original goes), or deleted. Unreadable files (also those without any of
the three UIDs), and files whose place in the
destination is already taken, are left where they are and counted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from anonpipe import durable
from anonpipe.anon.batch import iter_files
from anonpipe.durable import fsync_path
from anonpipe.headers import read_header, text_value

__all__ = [
    "KINDS",
    "FilterCounts",
    "SelectionError",
    "UidSelection",
    "counts_line",
    "filter_files",
    "load_selection",
    "move_file",
    "parse_uid_list",
]

#: JSON key -> header keyword of the UID it lists.
KINDS: dict[str, str] = {
    "studies": "StudyInstanceUID",
    "series": "SeriesInstanceUID",
    "instances": "SOPInstanceUID",
}


class SelectionError(ValueError):
    """A UID list or JSON file the operator must fix (a usage error)."""


@dataclass(frozen=True, slots=True)
class UidSelection:
    """The UIDs whose files are filtered out, by kind."""

    studies: frozenset[str] = frozenset()
    series: frozenset[str] = frozenset()
    instances: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.studies or self.series or self.instances)

    def __or__(self, other: UidSelection) -> UidSelection:
        return UidSelection(
            self.studies | other.studies,
            self.series | other.series,
            self.instances | other.instances,
        )

    def matches(self, study: str | None, series: str | None, instance: str | None) -> bool:
        """Whether a file with these UIDs (None: the file has none) is selected."""
        return (
            (study is not None and study in self.studies)
            or (series is not None and series in self.series)
            or (instance is not None and instance in self.instances)
        )


@dataclass(slots=True)
class FilterCounts:
    """What filter saw and did.

    Attributes
    ----------
    files : int
        Files looked at.
    matched : int
        Files whose UIDs are selected.
    done : int
        Matched files moved (or deleted).
    unreadable : int
        Files that are not readable DICOM, or hold none of the three UIDs (a truncated file
        can); left in place.
    occupied : int
        Matched files not moved because their path in the destination exists; left in place.
    failed : list of (Path, str)
        Matched files that could not be moved or deleted, with the reason; left in place.
    """

    files: int = 0
    matched: int = 0
    done: int = 0
    unreadable: int = 0
    occupied: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)


def parse_uid_list(text: str) -> frozenset[str]:
    """The UIDs of a comma-separated list; blanks around them and empty entries are dropped."""
    return frozenset(uid for uid in (part.strip() for part in text.split(",")) if uid)


def load_selection(path: Path) -> UidSelection:
    """The UIDs listed in the JSON file `path`: ``{"studies": [...], "series": [...], ...}``.

    Every key is optional; the lists hold strings.

    Raises
    ------
    SelectionError
        When the file cannot be read, is not JSON, is not such an object, has another key or a
        list of something other than strings.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SelectionError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SelectionError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SelectionError(f"{path} must hold a JSON object with keys {', '.join(KINDS)}")
    unknown = sorted(set(data) - set(KINDS))
    if unknown:
        raise SelectionError(
            f"{path}: unknown key {', '.join(map(repr, unknown))}; use {', '.join(KINDS)}"
        )
    lists: dict[str, frozenset[str]] = {}
    for kind, values in data.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise SelectionError(f"{path}: {kind!r} must be a list of UID strings")
        lists[kind] = frozenset(v.strip() for v in values if v.strip())
    return UidSelection(**lists)


def filter_files(src: Path, selection: UidSelection, dest: Path | None) -> FilterCounts:
    """Move the selected DICOM files under `src` to `dest` (None: delete them).

    Parameters
    ----------
    src : Path
        The folder searched (hidden files and folders are skipped, see
        :func:`~anonpipe.anon.batch.iter_files`); files already under `dest` are not.
    selection : UidSelection
        The UIDs whose files go.
    dest : Path or None
        Where moved files go, at their path relative to `src`; folders are created.

    Returns
    -------
    FilterCounts
        The counts; every change is on disk (folders flushed) when it returns.
    """
    job = _Filter(src, selection, dest)
    try:
        for path in _candidates(src, dest):
            job.handle(path)
    finally:
        for folder in sorted(job.touched):
            fsync_path(folder)
    return job.counts


def _candidates(src: Path, dest: Path | None) -> list[Path]:
    """The files under `src`, listed before anything moves, without those under `dest`."""
    files = list(iter_files(src))
    if dest is None:
        return files
    target = dest.resolve()
    return [path for path in files if not path.resolve().is_relative_to(target)]


@dataclass(slots=True)
class _Filter:
    """One filter pass: where files go, what was counted and which folders changed."""

    src: Path
    selection: UidSelection
    dest: Path | None
    counts: FilterCounts = field(default_factory=FilterCounts)
    #: Folders that gained or lost an entry: flushed once at the end, not per file.
    touched: set[Path] = field(default_factory=set)

    def handle(self, path: Path) -> None:
        """Count `path`, and move or delete it if it is selected."""
        self.counts.files += 1
        uids = _uids(path)
        if not any(uids):  # not DICOM, or truncated before its UIDs: nothing to match on
            self.counts.unreadable += 1
            return
        if not self.selection.matches(*uids):
            return
        self.counts.matched += 1
        target = None if self.dest is None else self.dest / path.relative_to(self.src)
        if target is not None and os.path.lexists(target):
            self.counts.occupied += 1
            return
        try:
            if target is None:
                path.unlink()
            else:
                move_file(path, target)
                self.touched.add(target.parent)
        except OSError as exc:
            self.counts.failed.append((path, exc.strerror or str(exc)))
            return
        self.touched.add(path.parent)
        self.counts.done += 1


def _uids(path: Path) -> tuple[str | None, str | None, str | None]:
    """Study, Series and SOP Instance UID of `path` (None for each if it is unreadable)."""
    header = read_header(path, list(KINDS.values()))
    if header is None:
        return None, None, None
    study, series, instance = (text_value(header, keyword) for keyword in KINDS.values())
    return study, series, instance


def move_file(path: Path, target: Path) -> None:
    """Move `path` to `target`, creating its folders (:func:`anonpipe.durable.move_file`).

    Same-filesystem renames are not flushed one by one: the caller flushes the touched folders
    once at the end.
    """
    _make_folders(target.parent)
    durable.move_file(path, target, flush=False)


def _make_folders(folder: Path) -> None:
    """Create `folder` and missing parents, flushing each parent that gained one."""
    missing: list[Path] = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_path(new.parent)


def counts_line(counts: FilterCounts, deleting: bool) -> str:
    """The summary printed at the end: files read, matched, moved or deleted, left alone."""
    verb = "deleted" if deleting else "moved"
    parts = [
        f"{counts.files} files",
        f"{counts.matched} matched",
        f"{counts.done} {verb}",
        f"{counts.unreadable} unreadable (left in place)",
    ]
    if counts.occupied:
        parts.append(f"{counts.occupied} already in DEST (left in place)")
    if counts.failed:
        parts.append(f"{len(counts.failed)} failed (left in place)")
    return ", ".join(parts)
