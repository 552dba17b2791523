"""The daemon's status, typed: built once, rendered by the control socket, ``anonpipectl`` and
the web page.

:func:`build_status` reads the service (its scheduler, SCP, peers, the runs in the state store)
into a :class:`StatusReport`; :func:`build_runs` and :func:`build_run` do the same for the run
history and one run. Each model has ``to_json()`` (a ``json.dumps``-ready object: the control
socket's reply) and ``from_json()`` (what ``anonpipectl`` reads back into the same classes);
states travel as their enum values, a failure kind as its name.

Nothing here carries patient data: studies are named by their review id and, once
de-identified, their cleaned Study Instance UID; never an original UID or accession number.
Reasons and errors are anonpipe's own wording (:mod:`anonpipe.daemon.audit`).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import (
    TYPE_CHECKING,
    Any,
    Self,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
)

from anonpipe import __version__
from anonpipe.daemon.rundir import RunDir
from anonpipe.daemon.state import RunRecord, StudyRecord
from anonpipe.daemon.states import Failure, RunState, StudyState
from anonpipe.scp import ScpStatus

if TYPE_CHECKING:
    from anonpipe.daemon.service import Service

__all__ = [
    "RECENT_RUNS",
    "DeferredStudy",
    "HeldStudy",
    "PeerStatus",
    "RunDetail",
    "RunSummary",
    "ServiceState",
    "StatusReport",
    "StudyStatus",
    "build_run",
    "build_runs",
    "build_status",
    "from_json",
    "study_statuses",
]

#: How many of the newest runs a status report lists (``anonpipectl runs`` lists them all).
RECENT_RUNS = 10

#: A JSON object as ``json.loads`` returns it.
JsonObject = dict[str, Any]
T = TypeVar("T")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ServiceState(StrEnum):
    """What the service as a whole is doing (the first word of :attr:`StatusReport.state`)."""

    #: Nothing to do: waiting for the next poll of the review database.
    IDLE = "idle"
    #: A run is in progress (:attr:`StatusReport.current`).
    RUNNING = "running"
    #: A run cannot start or go on until a PACS answers or the disk has room; retried by itself.
    WAITING = "waiting"
    #: Paused by an operator (``anonpipectl pause``) until ``resume``; kept across restarts.
    PAUSED = "paused"
    #: Pulls stopped by the misroute guard until an operator resumes.
    BLOCKED = "blocked"
    #: Shutting down (SIGTERM).
    STOPPING = "stopping"


class _Json:
    """``to_json`` and ``from_json`` for the dataclasses below (their fields' types decide)."""

    __slots__ = ()

    def to_json(self) -> JsonObject:
        """The object as JSON values (dicts, lists, strings, numbers, booleans, null)."""
        return cast(JsonObject, _encode(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """Read back what :meth:`to_json` made (keys a newer daemon adds are ignored).

        Raises
        ------
        ValueError
            When *data* is not such an object (a key missing, a value of the wrong kind).
        """
        return from_json(cls, data)


def from_json(kind: type[T], data: Any) -> T:
    """*data* (JSON values) read as the typed dataclass *kind*: one of the models here, or
    another reply such as :class:`~anonpipe.scu.echo.EchoResult`. Keys *kind* does not have
    are ignored (a newer daemon may send more); absent ones take their defaults.

    Raises
    ------
    ValueError
        When *data* does not fit (a key missing, a value of the wrong kind).
    """
    try:
        return cast(T, _decode(kind, data))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a {kind.__name__}: {type(exc).__name__}: {exc}") from None


# -- the model --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class StudyStatus(_Json):
    """One study of a run: where it is and its counts (live during its pull and its push)."""

    #: The study's review id (its row in the review database).
    study: int
    step: StudyState
    #: Objects the staging PACS said it would send (None until its pull began).
    expected: int | None
    landed: int
    #: De-identified objects written.
    clean: int
    quarantined: int
    #: Objects that repeated one already written (same SOP Instance UID and content).
    duplicates: int
    #: Objects in the research PACS (live during the push).
    pushed: int
    #: Why it is held, failed or waits (anonpipe's wording, no patient data).
    reason: str | None
    #: What an operator should know that did not stop the study.
    notes: str | None
    #: Its Study Instance UID after de-identification (None before).
    cleaned_study_uid: str | None = None
    #: Objects the research PACS was seen to hold by the verification (None until verified).
    verified: int | None = None
    #: Why it failed, as a kind (``step`` failed or failed-reported).
    failure: Failure | None = None
    #: Its push so far: rounds that sent failed files again, and pushes resumed after the
    #: research PACS came back (this daemon's count; 0 outside a push).
    retries: int = 0
    #: The last reason files of its push were refused or aborted (a status, an association's
    #: end), while it is in its push.
    push_error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class PeerStatus(_Json):
    """A PACS as the scheduler's last C-ECHO (or a failed association since) found it."""

    #: ``AE@host:port``.
    peer: str
    ok: bool
    #: Why it is unreachable ("" when ok).
    error: str
    tls: bool = False
    #: When it was last asked (UTC, ISO 8601).
    checked: str | None = None
    #: Unreachable since (the first failed check of this outage), None when ok.
    down_since: str | None = None
    #: About when the scheduler asks again while it is unreachable (each poll interval).
    next_check: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class HeldStudy(_Json):
    """A study held back at the last selection (its reviews conflict), with the reason."""

    study: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class DeferredStudy(_Json):
    """A study that failed again for a reason that repeats: not picked before ``next_try``."""

    study: int
    next_try: str
    failures: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class RunSummary(_Json):
    """One run: its name (``run_at_<epoch>``), state and times (UTC, ISO 8601)."""

    name: str
    state: RunState
    #: Why it failed or stopped (no patient data).
    error: str | None
    practice: bool = False
    no_push: bool = False
    started: str | None = None
    finished: str | None = None

    @classmethod
    def of(cls, record: RunRecord) -> Self:
        return cls(
            name=record.name,
            state=record.state,
            error=record.error,
            practice=record.practice,
            no_push=record.no_push,
            started=record.started,
            finished=record.finished,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class RunDetail(RunSummary):
    """One run in detail (``anonpipectl show``): its folder, studies and overview.txt."""

    #: The run directory.
    path: str = ""
    studies: tuple[StudyStatus, ...] = ()
    #: overview.txt's lines, the old pipeline's summary.
    overview: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class StatusReport(_Json):
    """Everything ``anonpipectl status`` shows, at one moment."""

    #: The one line systemd gets as STATUS= ("idle", "paused", "running run_at_…: pushing",
    #: "waiting: …", "blocked: …").
    state: str
    service: ServiceState = ServiceState.IDLE
    #: Paused by an operator (kept in the state store until ``resume``), and since when.
    paused: bool = False
    paused_since: str | None = None
    #: What tripped the misroute guard (pulls stop until ``resume``).
    misroute: str | None = None
    #: The run in progress, None between runs.
    current: str | None = None
    #: The newest run (in progress or the last one), and its studies.
    run: RunSummary | None = None
    studies: tuple[StudyStatus, ...] = ()
    held: tuple[HeldStudy, ...] = ()
    deferred: tuple[DeferredStudy, ...] = ()
    #: Our Storage SCP: listening, associations, objects landed, refusals by reason.
    scp: ScpStatus | None = None
    #: By name: ``staging`` and ``research``.
    peers: dict[str, PeerStatus] = dataclasses.field(default_factory=dict)
    #: The last errors, oldest first, each with its local time.
    errors: tuple[str, ...] = ()
    #: The newest runs (at most :data:`RECENT_RUNS`), oldest first.
    runs: tuple[RunSummary, ...] = ()
    #: When the report was made (UTC, ISO 8601), and by which anonpipe.
    generated: str = ""
    version: str = ""


# -- building it ------------------------------------------------------------------------------


async def build_status(service: Service) -> StatusReport:
    """The service's status now: one read of the state store for the newest runs and studies."""
    pipeline = service.pipeline
    recent = await service.store.recent_runs(RECENT_RUNS)
    latest = recent[-1] if recent else None
    kind, line = service.condition()
    return StatusReport(
        state=line,
        service=kind,
        paused=service.paused,
        paused_since=service.paused_since,
        misroute=service.guard.tripped,
        current=pipeline.current if pipeline else None,
        run=RunSummary.of(latest) if latest else None,
        studies=await study_statuses(service, latest.name) if latest else (),
        held=tuple(
            HeldStudy(_int(h["study"]), str(h["reason"]))
            for h in (pipeline.held if pipeline else ())
        ),
        deferred=tuple(
            DeferredStudy(
                _int(d["study"]), str(d["next_try"]), _int(d["failures"]), str(d["reason"])
            )
            for d in (pipeline.deferred if pipeline else ())
        ),
        scp=service.scp.status(),
        peers=dict(service.peers),
        errors=tuple(pipeline.errors if pipeline else ()),
        runs=tuple(RunSummary.of(r) for r in recent),
        generated=_now(),
        version=__version__,
    )


async def build_runs(service: Service) -> tuple[RunSummary, ...]:
    """Every run in the state store, oldest first."""
    return tuple(RunSummary.of(r) for r in await service.store.runs())


async def build_run(service: Service, name: str) -> RunDetail:
    """One run in detail.

    Raises
    ------
    ValueError
        When no run has that name.
    """
    record = await service.store.run(name)
    if record is None:
        raise ValueError(f"no run named {name!r}; see `anonpipectl runs`")
    return dataclasses.replace(
        RunDetail.of(record),
        path=str(record.path),
        studies=await study_statuses(service, record.name),
        overview=tuple(RunDir.open(record.path).read_lines("overview.txt")),
    )


async def study_statuses(service: Service, run: str) -> tuple[StudyStatus, ...]:
    """The studies of *run*, with the live counts of a pull or push in progress."""
    return tuple(_study(service, s) for s in await service.store.studies(run))


def _study(service: Service, s: StudyRecord) -> StudyStatus:
    expected, landed, pushed = s.expected, s.landed, s.pushed
    retries, push_error = 0, None
    if s.state is StudyState.PULLING:
        # The store has the counts once the pull is done; the landing has them as they come.
        landing = service.registry.get(s.original_study_uid)
        if landing is not None:
            expected, landed = landing.expected, landing.landed
    progress = service.pipeline.pushing.get(s.review_id) if service.pipeline else None
    if s.state is StudyState.PUSHING and progress is not None:
        pushed, retries, push_error = progress.stored, progress.retries, progress.last_error
    verified = s.clean if s.state in (StudyState.VERIFIED, StudyState.PUBLISHED) else None
    return StudyStatus(
        study=s.review_id,
        step=s.state,
        expected=expected,
        landed=landed,
        clean=s.clean,
        quarantined=s.quarantined,
        duplicates=s.duplicates,
        pushed=pushed,
        reason=s.reason,
        notes=s.notes,
        cleaned_study_uid=s.cleaned_study_uid,
        verified=verified,
        failure=s.failure,
        retries=retries,
        push_error=push_error,
    )


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return value


# -- JSON -------------------------------------------------------------------------------------


def _encode(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value if isinstance(value, str) else value.name
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


_SCALARS: tuple[type, ...] = (str, int, float, bool)


def _decode(kind: Any, value: Any) -> Any:
    """*value* (from JSON) as an instance of the annotation *kind*."""
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(kind) if a is not type(None)]
        if value is None and len(options) < len(get_args(kind)):
            return None
        (inner,) = options
        return _decode(inner, value)
    if origin is tuple:
        inner = get_args(kind)[0]
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        return tuple(_decode(inner, v) for v in value)
    if origin is dict:
        inner = get_args(kind)[1]
        if not isinstance(value, Mapping):
            raise TypeError(f"expected an object, got {type(value).__name__}")
        return {str(k): _decode(inner, v) for k, v in value.items()}
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise TypeError(f"expected an object for {kind.__name__}, got {type(value).__name__}")
        hints = get_type_hints(kind)
        known = [f for f in dataclasses.fields(kind) if f.name in value]
        return kind(**{f.name: _decode(hints[f.name], value[f.name]) for f in known})
    if isinstance(kind, type) and issubclass(kind, Enum):
        return kind(value) if issubclass(kind, str) else kind[value]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind in _SCALARS and not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value
