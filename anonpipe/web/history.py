"""What the pages and ``/metrics`` say about past runs, read from the state store's query methods.

A :class:`RunTally` sums one run: its studies by state and failure kind, its files by outcome and
quarantine reason, its duration and files per second. It is made from the store's ``studies()``
and ``files()`` (:class:`~anonpipe.daemon.state.StateStore`, the machine truth) and holds counts
and anonpipe's own wording only, never a row: the file names in the store are the original SOP
Instance UIDs, so they never reach a page or a label. :class:`History` keeps the tallies of
finished runs (done or failed: only ``restart-run`` changes them, and that changes the run's
state, which is part of the key), so a scrape or a page reads each finished run's rows once, and
the run in progress at every request.

The state store has no time for a study's steps (only its run's start and end): study, pull,
de-identification and push durations cannot be told from it (see README, "Metrics").
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from anonpipe.daemon.state import FileRecord, RunRecord, StateStore, StudyRecord
from anonpipe.daemon.states import RunState, StudyState

__all__ = [
    "FILE_OUTCOMES",
    "History",
    "QuarantinedFile",
    "RunTally",
    "element_of",
    "parse_time",
    "quarantined_files",
    "tally_run",
]

#: File outcomes counted (a file's ``status`` in the store; ``pushed`` is a flag of clean ones).
FILE_OUTCOMES: tuple[str, ...] = ("clean", "duplicate", "quarantined", "error", "pushed")

#: An element's tag path as the engine writes it: ``(0008,1030)`` or ``(0040,0275)[0](0010,0010)``
#: (ElementError paths may put dots between levels).
_TAG_PATH = re.compile(r"(?:\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)(?:\[\d+\])?\.?)+")
#: The residual gate's "<kind> value at <path>": kind is a DICOM keyword or one of two phrases.
_RESIDUAL_KIND = re.compile(r"^([A-Za-z][A-Za-z0-9]*|private text|unknown element) value at ")


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 time from the store (UTC when it names no zone), or None."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class RunTally:
    """One run summed up: counts, times, and anonpipe's reasons; nothing from a patient."""

    name: str
    state: RunState
    practice: bool
    no_push: bool
    started: datetime | None
    finished: datetime | None
    error: str | None
    studies: Counter[StudyState] = field(default_factory=Counter)
    #: Failed studies by failure kind (the :class:`~anonpipe.daemon.states.Failure` name).
    failures: Counter[str] = field(default_factory=Counter)
    #: Files by outcome (:data:`FILE_OUTCOMES`).
    files: Counter[str] = field(default_factory=Counter)
    #: Quarantined files by reason.
    quarantine: Counter[str] = field(default_factory=Counter)
    #: Review ids of the studies held in this run.
    held: tuple[int, ...] = ()

    @property
    def handled(self) -> int:
        """Files the run de-identified or set aside (clean, duplicate, quarantined, error)."""
        return sum(self.files[k] for k in ("clean", "duplicate", "quarantined", "error"))

    def duration(self, now: datetime | None = None) -> float | None:
        """Seconds from start to end (to *now* while it runs; None without a start)."""
        if self.started is None:
            return None
        end = self.finished or (now if now is not None else datetime.now(UTC))
        return max((end - self.started).total_seconds(), 0.0)

    def files_per_second(self, now: datetime | None = None) -> float | None:
        """Handled files per second of the run's duration (None before any file or time)."""
        seconds = self.duration(now)
        if not seconds or not self.handled:
            return None
        return self.handled / seconds


def tally_run(
    run: RunRecord, studies: Iterable[StudyRecord], files: Iterable[FileRecord]
) -> RunTally:
    """Sum one run's rows (see :class:`RunTally`)."""
    tally = RunTally(
        name=run.name,
        state=run.state,
        practice=run.practice,
        no_push=run.no_push,
        started=parse_time(run.started),
        finished=parse_time(run.finished),
        error=run.error,
    )
    held: list[int] = []
    for study in studies:
        tally.studies[study.state] += 1
        if study.failure is not None:
            tally.failures[study.failure.name] += 1
        if study.state is StudyState.HELD:
            held.append(study.review_id)
    for record in files:
        tally.files[record.status] += 1
        if record.pushed:
            tally.files["pushed"] += 1
        if record.status == "quarantined":
            tally.quarantine[record.reason or "unknown"] += 1
    return _with_held(tally, tuple(held))


def _with_held(tally: RunTally, held: tuple[int, ...]) -> RunTally:
    return RunTally(
        tally.name,
        tally.state,
        tally.practice,
        tally.no_push,
        tally.started,
        tally.finished,
        tally.error,
        tally.studies,
        tally.failures,
        tally.files,
        tally.quarantine,
        held,
    )


class History:
    """Tallies of every run in a state store, those of finished runs kept (see module doc)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._kept: dict[str, tuple[tuple[str, str | None], RunTally]] = {}

    async def tally(self, run: RunRecord) -> RunTally:
        """The tally of *run* (from memory when it is finished and already read)."""
        key = (run.state.value, run.finished)
        kept = self._kept.get(run.name)
        if kept is not None and kept[0] == key:
            return kept[1]
        tally = tally_run(run, await self.store.studies(run.name), await self.store.files(run.name))
        if run.state.finished:
            self._kept[run.name] = (key, tally)
        else:
            self._kept.pop(run.name, None)
        return tally

    async def tallies(self, runs: Sequence[RunRecord] | None = None) -> list[RunTally]:
        """Tallies of *runs* (default: every run), in their order."""
        chosen = await self.store.runs() if runs is None else runs
        names = {run.name for run in chosen}
        if runs is None:  # forget runs no longer in the store
            for gone in set(self._kept) - names:
                del self._kept[gone]
        return [await self.tally(run) for run in chosen]


@dataclass(frozen=True, slots=True)
class QuarantinedFile:
    """One quarantined file as a page shows it: no name from the file, no value.

    ``file`` is the name anonpipe gave its copy in ``quarantine/`` (a digest of where it
    landed), ``reason`` anonpipe's or the quarantine rule's, ``element`` the tag path (and for
    the residual-PHI gate, which kind of identifier) the engine named, or "" when none.
    """

    study: int
    file: str
    reason: str
    element: str


def element_of(detail: str | None) -> str:
    """The element(s) a quarantine record's ``detail`` names, and nothing else from it.

    The detail is anonpipe's wording (the engine never quotes a value), but what a broken file
    holds can reach it through an error message; only tag paths and, for the residual gate, a
    keyword are kept.
    """
    if not detail:
        return ""
    paths = [m.group().rstrip(".") for m in _TAG_PATH.finditer(detail)]
    kind = _RESIDUAL_KIND.match(detail)
    shown = ", ".join(dict.fromkeys(paths))
    if kind is not None:
        return f"{kind.group(1)} at {shown}" if shown else kind.group(1)
    return shown


def _detail(record_path: Path) -> str | None:
    """The ``detail`` of a quarantine record ``<token>.json`` (None when unreadable)."""
    try:
        data = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    detail = data.get("detail") if isinstance(data, dict) else None
    return detail if isinstance(detail, str) else None


def quarantined_files(files: Iterable[FileRecord], limit: int) -> tuple[list[QuarantinedFile], int]:
    """The first *limit* quarantined files of *files* and how many there are in all.

    Reads each file's quarantine record (``<token>.json`` beside its copy) for the element:
    blocking file I/O, so call it in a thread.
    """
    shown: list[QuarantinedFile] = []
    total = 0
    for record in files:
        if record.status != "quarantined":
            continue
        total += 1
        if len(shown) >= limit:
            continue
        copy = Path(record.output) if record.output else None
        detail = _detail(copy.with_suffix(".json")) if copy is not None else None
        shown.append(
            QuarantinedFile(
                study=record.review_id,
                file=copy.name if copy is not None else "-",
                reason=record.reason or "unknown",
                element=element_of(detail),
            )
        )
    return shown, total
