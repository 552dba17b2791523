"""What the pages and ``/metrics`` say about past runs, read from the state store's query methods.

A :class:`RunTally` sums one run: its studies by state and failure kind, its files by outcome and
quarantine reason, the bytes it pushed, its duration and files per second, and how long each of
its studies spent in each step (:class:`StudyTimes`). It is made from the store's ``studies()``,
``files()`` and ``study_steps()`` (:class:`~anonpipe.daemon.state.StateStore`, the machine
truth) and holds counts, times and anonpipe's own wording only, never a row: the file names in
the store are the original SOP Instance UIDs, so they never reach a page or a label.
:class:`History` keeps the tallies of finished runs (done or failed: only ``restart-run`` changes
them, and that changes the run's state, which is part of the key), so a scrape or a page reads
each finished run's rows once, and the run in progress at every request.

A study's step times come from the state store's ``study_steps`` (a row each time a study's state
is written, and two marks inside steps, :class:`~anonpipe.daemon.states.StepMark`): runs recorded
before that table existed have none.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from anonpipe.daemon.pipeline import Step
from anonpipe.daemon.state import FileRecord, RunRecord, StateStore, StudyRecord, StudyStep
from anonpipe.daemon.states import RunState, StepMark, StudyState

__all__ = [
    "FILE_OUTCOMES",
    "STUDY_STEPS",
    "History",
    "QuarantinedFile",
    "RunTally",
    "StudyTimes",
    "element_of",
    "parse_time",
    "quarantined_files",
    "study_times",
    "tally_run",
]

#: File outcomes counted (a file's ``status`` in the store; ``pushed`` is a flag of clean ones).
FILE_OUTCOMES: tuple[str, ...] = ("clean", "duplicate", "quarantined", "error", "pushed")

#: A study's timed steps, in order (the ``step`` label of the study step histogram):
#: pull (its C-MOVE, files de-identified as they land), deidentify (the files still to do once
#: the C-MOVE ended), hook (the per-study hook), push (C-STOREs; a resumed push from its last
#: start), verify (the C-FIND that the research PACS holds them all), writeback (the review DB).
STUDY_STEPS: tuple[Step, ...] = (
    Step.PULL,
    Step.DEIDENTIFY,
    Step.HOOK,
    Step.PUSH,
    Step.VERIFY,
    Step.WRITEBACK,
)

#: Which steps a state change (or mark) ends, and which it begins. A step is timed from its
#: last beginning (a resumed pull or push: the attempt that finished) to its end. Practised
#: studies time no hook: a per-run hook's studies go from deidentified to practiced without one.
_ENDS: dict[str, tuple[Step, ...]] = {
    StepMark.MOVED: (Step.PULL,),
    StudyState.DEIDENTIFIED: (Step.DEIDENTIFY,),
    StudyState.HOOKED: (Step.HOOK,),
    StepMark.VERIFYING: (Step.PUSH,),
    StudyState.VERIFIED: (Step.VERIFY,),
    StudyState.FAILED: (Step.PULL, Step.DEIDENTIFY, Step.PUSH, Step.VERIFY),
    StudyState.PUBLISHED: (Step.WRITEBACK,),
    StudyState.FAILED_REPORTED: (Step.WRITEBACK,),
}
_BEGINS: dict[str, Step] = {
    StudyState.PULLING: Step.PULL,
    StepMark.MOVED: Step.DEIDENTIFY,
    StudyState.DEIDENTIFIED: Step.HOOK,
    StudyState.PUSHING: Step.PUSH,
    StepMark.VERIFYING: Step.VERIFY,
    StudyState.VERIFIED: Step.WRITEBACK,
    StudyState.FAILED: Step.WRITEBACK,
}
#: States after which nothing more happens to a study in its run.
_FINAL = frozenset(
    {StudyState.PUBLISHED, StudyState.FAILED_REPORTED, StudyState.PRACTICED, StudyState.FAILED}
)

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
class StudyTimes:
    """How long one study of a run spent in each step it finished (seconds, by
    :data:`STUDY_STEPS` member), and in all: from its first pull to its last state, once it
    is at its end (None before)."""

    study: int
    steps: Mapping[Step, float]
    total: float | None = None


def study_times(
    rows: Iterable[StudyStep], states: Mapping[int, StudyState], *, ended: bool = False
) -> tuple[StudyTimes, ...]:
    """Each study's step times from its ``study_steps`` *rows* (in the order written).

    *states* are the studies' present states: a study's total is known once that is final
    (published, failed, practised) or, with *ended* (its run is done: a run without push ends
    its studies de-identified or hooked), whatever it is. Held studies, and studies without
    rows, have no times.
    """
    by_study: dict[int, list[tuple[str, datetime]]] = {}
    for row in rows:
        moment = parse_time(row.at)
        if moment is not None:
            by_study.setdefault(row.review_id, []).append((row.state, moment))
    times: list[StudyTimes] = []
    for study, changes in sorted(by_study.items()):
        begun: dict[Step, datetime] = {}
        steps: dict[Step, float] = {}
        first: datetime | None = None
        for state, moment in changes:
            if state == StudyState.PULLING and first is None:
                first = moment
            for step in _ENDS.get(state, ()):
                start = begun.pop(step, None)
                if start is not None:
                    steps[step] = max((moment - start).total_seconds(), 0.0)
            begins = _BEGINS.get(state)
            if begins is not None:
                begun[begins] = moment
        if first is None:  # held, or never pulled
            continue
        present = states.get(study)
        total = None
        if present in _FINAL or (ended and present is not None):
            total = max((changes[-1][1] - first).total_seconds(), 0.0)
        times.append(StudyTimes(study, steps, total))
    return tuple(times)


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
    #: When each held study was held in this run (from ``study_steps``; absent in older runs).
    held_since: Mapping[int, datetime] = field(default_factory=dict)
    #: Bytes of the clean files in the research PACS (files recorded with their size).
    bytes_pushed: int = 0
    #: Each pulled study's step times, by review id.
    study_times: tuple[StudyTimes, ...] = ()

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

    def mean_step(self, step: Step) -> float | None:
        """Mean seconds the run's studies spent in *step* (None when none was timed)."""
        values = [t.steps[step] for t in self.study_times if step in t.steps]
        return sum(values) / len(values) if values else None

    def files_per_second(self, now: datetime | None = None) -> float | None:
        """Handled files per second of the run's duration (None before any file or time)."""
        seconds = self.duration(now)
        if not seconds or not self.handled:
            return None
        return self.handled / seconds


def tally_run(
    run: RunRecord,
    studies: Iterable[StudyRecord],
    files: Iterable[FileRecord],
    steps: Iterable[StudyStep] = (),
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
    states: dict[int, StudyState] = {}
    for study in studies:
        states[study.review_id] = study.state
        tally.studies[study.state] += 1
        if study.failure is not None:
            tally.failures[study.failure.name] += 1
        if study.state is StudyState.HELD:
            held.append(study.review_id)
    pushed_bytes = 0
    for record in files:
        tally.files[record.status] += 1
        if record.pushed:
            tally.files["pushed"] += 1
            pushed_bytes += record.size or 0
        if record.status == "quarantined":
            tally.quarantine[record.reason or "unknown"] += 1
    steps = list(steps)
    held_since = {
        row.review_id: moment
        for row in reversed(steps)  # the first row wins
        if row.state == StudyState.HELD and (moment := parse_time(row.at)) is not None
    }
    return replace(
        tally,
        held=tuple(held),
        held_since=held_since,
        bytes_pushed=pushed_bytes,
        study_times=study_times(steps, states, ended=run.state is RunState.DONE),
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
        tally = tally_run(
            run,
            await self.store.studies(run.name),
            await self.store.files(run.name),
            await self.store.study_steps(run.name),
        )
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
