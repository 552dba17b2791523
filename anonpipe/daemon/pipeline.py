"""What the steps of a run share: the service's parts (:class:`Pipeline`), one run's context
(:class:`RunContext`), how a stop is asked for (:class:`StopSignal`) and how it travels
(:class:`RunStopped` and its kinds).

A stop has one representation on each side: asked for through the :class:`StopSignal` (a pause
lets the step in hand finish; a shutdown also ends a long transfer between two files), carried
up by :class:`RunStopped`, which leaves the run resumable.

Log lines carry the run, the study (review id) and the :class:`Step` as context fields
(:mod:`anonpipe.logs`): :func:`in_step` binds them where a step begins.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from anonpipe import durable
from anonpipe.config import Settings
from anonpipe.daemon.reviewdb import ReviewDatabase
from anonpipe.daemon.rundir import RunDir
from anonpipe.daemon.state import RunRecord, StateStore
from anonpipe.daemon.states import RunState
from anonpipe.hooks import AnyHook
from anonpipe.logs import STEP_FIELD, STUDY_FIELD
from anonpipe.scp import LandingRegistry
from anonpipe.scu import MisrouteError, MisrouteGuard

if TYPE_CHECKING:
    from anonpipe.anon.duplicates import Duplicates
    from anonpipe.daemon.workers import DeidWorkers

__all__ = [
    "DiskLow",
    "PeerOutage",
    "Pipeline",
    "PushProgress",
    "RunContext",
    "RunStopped",
    "Step",
    "StopSignal",
    "enter_step",
    "failure_text",
    "in_step",
    "overview_once",
    "practice_identity",
]


class Step(StrEnum):
    """What the run, or one of its studies, is doing: a log line's ``step`` field."""

    #: The run's own steps (no study).
    SELECT = "select"
    CHECK = "check"
    FINISH = "finish"
    #: A study's steps (the per-run hook is the run's).
    PULL = "pull"
    DEIDENTIFY = "deidentify"
    HOOK = "hook"
    PUSH = "push"
    VERIFY = "verify"
    WRITEBACK = "writeback"


def in_step(step: Step, study: int | None = None) -> AbstractContextManager[None]:
    """``with in_step(Step.PUSH, review_id):`` the lines of the block carry the step (and the
    study's review id); both are restored when it ends."""
    fields: dict[str, object] = {STEP_FIELD: step.value}
    if study is not None:
        fields[STUDY_FIELD] = study
    return structlog.contextvars.bound_contextvars(**fields)


def enter_step(step: Step) -> None:
    """Move on to *step* inside an :func:`in_step` block (which restores the field at its end)."""
    structlog.contextvars.bind_contextvars(**{STEP_FIELD: step.value})


class RunStopped(Exception):
    """The run stopped between steps (pause, shutdown, or a sibling study's stop); it resumes
    later at its first unfinished step."""


class DiskLow(RunStopped):
    """The data folder's filesystem is below ``[local] min_free_mb``, or a file could not be
    written: the run stops where it is and resumes once there is room (nothing is failed)."""


class PeerOutage(RunStopped):
    """A PACS the run needs is down or silent (an outage, not a refusal): the run stops where
    it is, nothing is written back, and it resumes when the PACS answers again."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"waiting for the {peer} PACS: {reason}")
        self.peer = peer
        self.reason = reason


@dataclass
class StopSignal:
    """Asked-for stops. ``paused``: the step in hand finishes, nothing new starts. ``now`` (set
    on shutdown, from any thread): transfers also stop between two files, and a request waiting
    on a peer ends."""

    paused: bool = False
    now: threading.Event = field(default_factory=threading.Event)

    @property
    def requested(self) -> bool:
        return self.paused or self.now.is_set()


@dataclass
class PushProgress:
    """One study's push as it goes, for status; updated from the sending threads.

    ``stored``: files in the research PACS so far. ``retries``: rounds that sent failed files
    again, and pushes resumed after a failure (the research PACS was down); kept while the
    study waits, so it counts the study's whole push. ``last_error``: the last reason files
    were refused or aborted (a status, an association's end: no patient data).
    """

    stored: int = 0
    retries: int = 0
    last_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def begin(self, stored: int) -> None:
        """A push (again) starts with *stored* files already there."""
        with self._lock:
            self.stored = stored
            if self.last_error is not None:
                self.retries += 1

    def stored_one(self) -> None:
        with self._lock:
            self.stored += 1

    def failed(self, reason: str, retrying: bool) -> None:
        """Files of a round failed, mostly for *reason*; *retrying*: another round follows."""
        with self._lock:
            self.last_error = reason
            if retrying:
                self.retries += 1


@dataclass
class Pipeline:
    """What runs need, built once by the service."""

    settings: Settings
    store: StateStore
    review: ReviewDatabase
    registry: LandingRegistry
    guard: MisrouteGuard
    hook: AnyHook
    stop: StopSignal = field(default_factory=StopSignal)
    errors: list[str] = field(default_factory=list)
    #: The run in progress (for status), None between runs.
    current: str | None = None
    #: Studies held back at the last selection (review id and reason), for status.
    held: list[dict[str, object]] = field(default_factory=list)
    #: Studies waiting out their back-off at the last selection (review id, next try, reason).
    deferred: list[dict[str, object]] = field(default_factory=list)
    #: Each study in its push (review id): files there so far, retries, the last refusal.
    pushing: dict[int, PushProgress] = field(default_factory=dict)
    #: Told every run state change (the service sends it to systemd as STATUS=).
    on_state: Callable[[str], None] = lambda _text: None

    def note_error(self, message: str) -> None:
        """Keep the last errors for ``status`` (no PHI in *message*)."""
        self.errors.append(f"{datetime.now():%Y-%m-%d %H:%M:%S} {message}")
        del self.errors[:-20]

    async def advance(self, run: str, state: RunState, error: str | None = None) -> None:
        """Commit the run's new state, then tell the service (STATUS= for systemd)."""
        await self.store.set_run_state(run, state, error)
        self.on_state(f"{run}: {state}")


@dataclass
class RunContext:
    """One run in progress: its record and folder, its workers, and its studies in flight.

    ``halted`` is set by the first study whose step raised: the others stop at their next step
    boundary, and the run ends with the most telling of their exceptions (:meth:`settle`).
    """

    p: Pipeline
    run: RunRecord
    rdir: RunDir
    in_flight: asyncio.Semaphore
    moves: asyncio.Semaphore
    workers: DeidWorkers | None = None
    duplicates: Duplicates | None = None
    halted: bool = False
    raised: list[BaseException] = field(default_factory=list)

    @property
    def pushes(self) -> bool:
        return not (self.run.practice or self.run.no_push)

    def boundary(self) -> None:
        """Raise :class:`RunStopped` if a stop was asked for or a sibling study stopped."""
        if self.p.stop.requested or self.halted:
            raise RunStopped

    def check_space(self) -> None:
        """Raise :class:`DiskLow` when the run's filesystem is below the free-space floor."""
        floor = self.p.settings.local.min_free_mb
        free = durable.free_bytes(self.rdir.path)
        if floor and free < floor * 2**20:
            raise DiskLow(
                f"waiting for disk space: {free // 2**20} MB free where the runs are, below"
                f" [local] min_free_mb = {floor}"
            )

    async def settle(self, tasks: Iterable[asyncio.Future[object]]) -> None:
        """Wait for every task, then raise the most telling exception of the run, if any."""
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, BaseException):
                self.raised.append(outcome)
        if self.raised:
            raise max(self.raised, key=_weight)

    def append_new(self, filename: str, line: str, earlier: set[str]) -> None:
        """Append *line* to *filename* unless it is in *earlier* (the file's lines before this
        step): a step redone after a crash writes its audit lines once."""
        if line not in earlier:
            self.rdir.append(filename, line)
            earlier.add(line)


def overview_once(rdir: RunDir, line: str, prefix: str | None = None) -> None:
    """Append *line* to overview.txt unless it (or a line starting with *prefix*) is already
    there: a step redone after a crash writes its overview line once."""
    existing = rdir.read_lines("overview.txt")
    if prefix is not None and any(x.startswith(prefix) for x in existing):
        return
    if line not in existing:
        rdir.overview(line)


def _weight(exc: BaseException) -> int:
    """Which exception ends the run when several studies raised: a misroute stops every pull,
    a failure fails the run, an outage or full disk waits, a plain stop last."""
    if isinstance(exc, MisrouteError):
        return 4
    if not isinstance(exc, RunStopped):
        return 3
    if type(exc) is not RunStopped:
        return 2
    return 1


def failure_text(exc: BaseException) -> str:
    """What state.db and status say of a run's failure: never a message that may quote PHI.

    Our own exceptions (anonpipe's) say what went wrong without values; an OS error gives its
    reason without the path (paths hold original UIDs); anything else gives its type only, and
    the traceback goes to the journal with values masked (:mod:`anonpipe.logs`).
    """
    kind = type(exc).__name__
    if type(exc).__module__.startswith("anonpipe."):
        return f"{kind}: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{kind}: {exc.strerror}"
    return f"{kind} (details in the journal)"


def practice_identity(rdir: RunDir) -> Path:
    """The throwaway identity.db copy a practice run works on (removed when it is done)."""
    return rdir.path / ".practice-identity.db"
