"""Where received objects go: pulls register the studies they expect, the SCP lands files there.

A pull calls :meth:`LandingRegistry.expect` before it sends its C-MOVE; the SCP looks every
incoming object's Study Instance UID up here. An object no pull expects is unsolicited and refused,
so nothing the staging PACS (or anyone else) sends on its own ever enters a run. Counting happens
here too, per study, which is what lets a pull tell "the PACS says it sent 40" from "40 arrived".
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from anonpipe.dimse import is_valid_uid
from anonpipe.logs import get_logger

__all__ = ["Arrival", "ArrivalHandler", "Landing", "LandingError", "LandingRegistry"]

log = get_logger(__name__)


class LandingError(RuntimeError):
    """A study cannot be registered (already expected, bad UID or unusable folder)."""


@dataclass(frozen=True, slots=True)
class Arrival:
    """One object that landed: its file (final name, renamed atomically but not fsynced: see
    :func:`anonpipe.durable.sync_folder`) and the UIDs read from its header.

    The UIDs are patient data (original UIDs); they are for the caller's bookkeeping, never for
    a log.
    """

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    size: int
    calling_ae: str
    move_originator_ae: str | None = None
    move_originator_message_id: int | None = None


ArrivalHandler = Callable[[Arrival], None]


@dataclass(eq=False)
class Landing:
    """One study a pull expects: the folder its objects land in and what has arrived so far.

    Counters are updated by SCP threads and read by the pull; :meth:`wait_for` blocks on a
    condition rather than polling.
    """

    study_uid: str
    directory: Path
    on_arrival: ArrivalHandler | None = None
    #: How many instances the pull expects (its C-FIND count), for progress; None if unknown.
    expected: int | None = None
    #: The pull's log context fields (run, study, step), taken where it registered.
    log_context: dict[str, object] = field(default_factory=structlog.contextvars.get_contextvars)
    _instances: set[str] = field(default_factory=set)
    _refused: int = 0
    _associations: set[int] = field(default_factory=set)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def landed(self) -> int:
        """Distinct SOP instances landed (a re-sent object counts once)."""
        with self._changed:
            return len(self._instances)

    @property
    def refused(self) -> int:
        """Objects of this study the SCP refused (bad UIDs, no space, unreadable header)."""
        with self._changed:
            return self._refused

    @property
    def sop_instance_uids(self) -> frozenset[str]:
        """The SOP Instance UIDs that landed (patient data: never log them)."""
        with self._changed:
            return frozenset(self._instances)

    @property
    def associations(self) -> int:
        """How many inbound associations delivered objects of this study."""
        with self._changed:
            return len(self._associations)

    def adopt_log_context(self) -> None:
        """Bind the pull's log fields in the calling SCP thread: an association that delivers
        a pull's objects logs as part of that pull (its run, study and step) from then on.

        The binding lasts as long as the thread, which is the association's own (pynetdicom
        runs each association in a thread of its own, never reused).
        """
        structlog.contextvars.bind_contextvars(**self.log_context)

    def record(self, arrival: Arrival, association_id: int) -> None:
        """Count a landed object, wake waiters, then tell the handler (its errors are logged)."""
        with self._changed:
            self._instances.add(arrival.sop_instance_uid)
            self._associations.add(association_id)
            self._changed.notify_all()
        if self.on_arrival is not None:
            try:
                self.on_arrival(arrival)
            except Exception:
                # The file is landed and counted; a failing consumer must not fail the store.
                log.exception("arrival handler failed", landing=self.directory.name)

    def record_refusal(self) -> None:
        """Count an object of this study that was refused."""
        with self._changed:
            self._refused += 1
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until at least *count* distinct objects landed; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._instances) >= count, timeout)


class Tally:
    """A thread-safe count by reason, for ``anonpipectl status``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, count: int = 1) -> None:
        with self._lock:
            self._counts[reason] += count

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class LandingRegistry:
    """The studies currently expected, by Study Instance UID; shared by pulls and the SCP.

    ``rejections`` counts, by reason, the associations the SCP rejected or connections it
    closed: a pull that received nothing can then tell our own refusal from the staging PACS's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._landings: dict[str, Landing] = {}
        self.rejections = Tally()

    def __len__(self) -> int:
        with self._lock:
            return len(self._landings)

    def get(self, study_uid: str) -> Landing | None:
        """The landing expecting *study_uid*, or None when the study is unsolicited."""
        with self._lock:
            return self._landings.get(study_uid)

    def register(
        self,
        study_uid: str,
        directory: Path,
        on_arrival: ArrivalHandler | None = None,
        expected: int | None = None,
    ) -> Landing:
        """Expect *study_uid* in *directory* (created, must be on the SCP's filesystem).

        Raises
        ------
        LandingError
            If the UID is not a UID, the study is already expected by another pull, or the
            folder cannot be created.
        """
        if not is_valid_uid(study_uid):
            raise LandingError("study_uid is not a valid UID (digits and dots, at most 64)")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LandingError(f"cannot create landing folder {directory}: {exc.strerror}") from exc
        landing = Landing(study_uid, directory, on_arrival, expected)
        with self._lock:
            if study_uid in self._landings:
                raise LandingError("this study is already being pulled by another run")
            self._landings[study_uid] = landing
        return landing

    def unregister(self, landing: Landing) -> None:
        """Stop expecting the study; later objects of it are unsolicited."""
        with self._lock:
            if self._landings.get(landing.study_uid) is landing:
                del self._landings[landing.study_uid]

    @contextmanager
    def expect(
        self,
        study_uid: str,
        directory: Path,
        on_arrival: ArrivalHandler | None = None,
        expected: int | None = None,
    ) -> Iterator[Landing]:
        """``with registry.expect(uid, folder) as landing:`` register, and always unregister."""
        landing = self.register(study_uid, directory, on_arrival, expected)
        try:
            yield landing
        finally:
            self.unregister(landing)
