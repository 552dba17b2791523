"""Pull one study from the staging PACS: C-FIND what to expect, C-MOVE it to our SCP, account.

A pull is complete only when the final C-MOVE response arrived **and** the objects that landed in
our SCP equal both the completed sub-operations and the count C-FIND promised. When the PACS
reports sub-operations completed that never reached us, it delivered our patients' images to some
other machine (it maps our AE title to another address): that is a *misroute*. The pull raises
:class:`MisrouteError` and the :class:`MisrouteGuard` refuses every further pull until an operator
has fixed the route and cleared the guard.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.presentation import build_context

from anonpipe.config import LocalSettings
from anonpipe.dimse import STUDY_ROOT_MOVE, Endpoint, Status, status_category
from anonpipe.durable import fsync_path
from anonpipe.logs import get_logger, share_context
from anonpipe.scp.landing import ArrivalHandler, LandingRegistry
from anonpipe.scu.association import Cause, associate, describe, ended
from anonpipe.scu.find import count_study

__all__ = ["MisrouteError", "MisrouteGuard", "PullBlocked", "PullResult", "pull_study"]

log = get_logger(__name__)

_MODEL = STUDY_ROOT_MOVE
_message_ids = itertools.count(1)
_message_ids_lock = threading.Lock()


def _next_message_id() -> int:
    with _message_ids_lock:
        return next(_message_ids) % 0xFFFF + 1


class MisrouteError(RuntimeError):
    """The staging PACS sent objects of a pull somewhere other than our SCP."""


class PullBlocked(RuntimeError):
    """Pulling is stopped since a misroute was detected; an operator must clear the guard."""


class MisrouteGuard:
    """A latch: once tripped, pulls are refused until :meth:`clear` (an operator's action).

    With *state_file* the latch survives restarts: a daemon restarted by systemd must not resume
    sending patients to the wrong machine. The file holds the message and time, no patient data.
    """

    def __init__(self, state_file: Path | None = None) -> None:
        self.state_file = state_file
        self._lock = threading.Lock()
        self._message: str | None = None
        if state_file is not None and state_file.exists():
            try:
                self._message = str(json.loads(state_file.read_text())["message"])
            except (OSError, ValueError, KeyError, TypeError):
                self._message = f"misroute guard file {state_file} is unreadable; pulls stopped"

    @property
    def tripped(self) -> str | None:
        """The reason pulls are stopped, or None."""
        with self._lock:
            return self._message

    def trip(self, message: str) -> None:
        with self._lock:
            self._message = message
            if self.state_file is not None:
                record = {"message": message, "since": datetime.now(UTC).isoformat()}
                tmp = self.state_file.with_name(f".{self.state_file.name}.tmp")
                tmp.write_text(json.dumps(record) + "\n")
                fsync_path(tmp)
                os.replace(tmp, self.state_file)
                fsync_path(self.state_file.parent)

    def clear(self) -> bool:
        """Allow pulls again; returns whether the guard was tripped."""
        with self._lock:
            was, self._message = self._message is not None, None
            if self.state_file is not None:
                self.state_file.unlink(missing_ok=True)
            return was

    def check(self) -> None:
        """Raise :class:`PullBlocked` while tripped."""
        message = self.tripped
        if message is not None:
            raise PullBlocked(f"pulls are stopped: {message}")


@dataclass(frozen=True, slots=True)
class PullResult:
    """The accounting of one pull. ``status`` is one of:

    - ``complete``: final response success, landed == completed == expected;
    - ``incomplete``: something is missing or failed; safe to pull again;
    - ``undeliverable``: the PACS could not deliver a single object to us (route or firewall);
    - ``not found``: the staging PACS has no such study;
    - ``stopped``: the caller stopped it (shutting down); what landed stays, pull again later.
    """

    status: str
    expected: int
    expected_series: int | None
    completed: int
    failed: int
    warning: int
    landed: int
    refused: int
    move_status: int | None
    seconds: float
    detail: str = ""
    #: Of an ``incomplete`` pull: the staging PACS went away or silent before its final
    #: response (an outage: pull again when it answers), rather than answering with a failure.
    outage: bool = False

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Counters:
    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int = 0
    final: int | None = None
    #: Why the move ended without a final response (aborted, closed, stopped), when known.
    ended: str | None = None
    #: Whether that end was an outage (connection lost, no answer) rather than a refusal.
    outage: bool = False
    #: Associations or connections our SCP rejected during the move, by reason.
    our_rejections: dict[str, int] = field(default_factory=dict)

    def update(self, status: Dataset) -> None:
        for name, attr in (
            ("completed", "NumberOfCompletedSuboperations"),
            ("failed", "NumberOfFailedSuboperations"),
            ("warning", "NumberOfWarningSuboperations"),
            ("remaining", "NumberOfRemainingSuboperations"),
        ):
            value = status.get(attr)
            if value is not None and value != "":
                setattr(self, name, int(value))


def pull_study(
    local: LocalSettings,
    staging: Endpoint,
    registry: LandingRegistry,
    study_uid: str,
    landing_dir: Path,
    *,
    on_arrival: ArrivalHandler | None = None,
    guard: MisrouteGuard | None = None,
    grace: float = 10.0,
    stop: threading.Event | None = None,
) -> PullResult:
    """Pull *study_uid* from *staging* into *landing_dir* through our running SCP.

    Parameters
    ----------
    local : LocalSettings
        Our AE title (the move destination), timeouts and PDU size.
    staging : Endpoint
        The staging PACS.
    registry : LandingRegistry
        The registry our :class:`~anonpipe.scp.StorageSCP` lands into.
    study_uid : str
        The study (patient data: it is never logged).
    landing_dir : Path
        Where the objects land (a run's ``from_staging/``), one file per SOP instance, each
        renamed atomically into place but not fsynced: call
        :func:`anonpipe.durable.sync_folder` on it before counting the study pulled.
    on_arrival : callable, optional
        Called from the SCP thread for each landed object, so work can start during the pull.
    guard : MisrouteGuard, optional
        Checked before, and tripped on a misroute.
    grace : float
        Seconds to wait after the final response for objects still on their way (a PACS that
        answers before its sub-operations finished).
    stop : threading.Event, optional
        Checked at each C-MOVE response; once set, the move's association is aborted and the
        result is ``stopped``.

    Raises
    ------
    PullBlocked
        If the guard is tripped.
    MisrouteError
        If sub-operations completed at the PACS but their objects never reached us.
    PeerUnavailable
        If the staging PACS cannot be associated with.
    QueryFailed
        If its C-FIND failed.
    LandingError
        If the study is already being pulled.
    """
    if guard is not None:
        guard.check()
    start = time.monotonic()
    found = count_study(local, staging, study_uid)
    if found is None:
        return PullResult(
            "not found",
            0,
            None,
            0,
            0,
            0,
            0,
            0,
            None,
            time.monotonic() - start,
            "the staging PACS has no such study",
        )
    counters = _Counters()
    stopped = False
    rejected_before = registry.rejections.snapshot()
    with registry.expect(study_uid, landing_dir, on_arrival, found.instances) as landing:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_uid
        with associate(local, staging, [build_context(_MODEL)]) as assoc:
            # pynetdicom's threads serving the association log with our fields
            share_context(assoc, getattr(assoc, "dul", None))
            responses = assoc.send_c_move(
                identifier, local.ae_title, _MODEL, msg_id=_next_message_id()
            )
            for status, _identifier in responses:
                if stop is not None and stop.is_set():
                    assoc.abort()  # the PACS ends its sub-operations; what landed stays
                    stopped = True
                    break
                code = status.get("Status") if status else None
                if code is None:  # no final response: the peer aborted, timed out, or we stop
                    stopped = stop is not None and stop.is_set()
                    ending = ended(assoc)
                    counters.ended = ending.reason if ending else None
                    counters.outage = ending is None or ending.cause is Cause.OUTAGE
                    break
                counters.update(status)
                if status_category(int(code)) != "pending":
                    counters.final = int(code)
        if counters.final == 0 and counters.failed == 0:
            # Success means every sub-operation completed, counted or not in the final response.
            counters.completed = max(counters.completed, found.instances)
        if counters.final is not None:
            landing.wait_for(counters.completed, grace)
        landed, refused = landing.landed, landing.refused
    rejected_after = registry.rejections.snapshot()
    counters.our_rejections = {
        reason: count - rejected_before.get(reason, 0)
        for reason, count in rejected_after.items()
        if count > rejected_before.get(reason, 0)
    }
    result = _judge(found.instances, found.series, counters, landed, refused, start, stopped)
    if stopped:
        log.info("pull stopped", expected=found.instances, landed=landed)
        return result
    if result.status == "misrouted":
        message = (
            f"{describe(staging)} reported {counters.completed} sub-operations completed but only "
            f"{landed} objects reached {local.ae_title} on port {local.port}: the staging PACS "
            f"most likely maps AE title {local.ae_title} to another host or port. Fix its "
            "configuration for our AE title, then clear the misroute guard."
        )
        log.error(
            "misroute detected: pulls stopped",
            staging=describe(staging),
            completed=counters.completed,
            landed=landed,
        )
        if guard is not None:
            guard.trip(message)
        raise MisrouteError(message)
    log.info(
        "pull finished",
        status=result.status,
        expected=result.expected,
        completed=result.completed,
        failed=result.failed,
        landed=result.landed,
        refused=result.refused,
        seconds=round(result.seconds, 3),
    )
    return result


def _judge(
    expected: int,
    expected_series: int | None,
    counters: _Counters,
    landed: int,
    refused: int,
    start: float,
    stopped: bool = False,
) -> PullResult:
    """Decide the pull's status from what the PACS said and what arrived."""
    final = counters.final
    if stopped:
        status, detail = "stopped", "stopped before the end of the move"
    elif counters.completed > landed:
        status, detail = "misrouted", "completed sub-operations that never reached us"
    elif final is None:
        why = counters.ended or "no answer within the DIMSE timeout"
        status, detail = "incomplete", f"no final C-MOVE response ({why})"
    elif final == Status.MOVE_DESTINATION_UNKNOWN:
        status = "undeliverable"
        detail = "the staging PACS does not know our AE title as a move destination"
    elif landed == refused == counters.completed == 0 and (
        counters.failed > 0 or status_category(final) == "failure"
    ):
        status = "undeliverable"
        if counters.our_rejections:
            listed = ", ".join(f"{n} {why}" for why, n in sorted(counters.our_rejections.items()))
            detail = (
                f"final status 0x{final:04X}, {counters.failed} failed sub-operations: our own "
                f"SCP refused the staging PACS's connections ({listed}); check [local] "
                "max_associations and allowed_peers, not the staging PACS"
            )
        else:
            detail = (
                f"final status 0x{final:04X}, {counters.failed} failed sub-operations and none "
                "reached us: check the PACS's address for our AE title and the firewall"
            )
    elif status_category(final) == "success" and landed == expected == counters.completed:
        status, detail = "complete", ""
    else:
        status = "incomplete"
        detail = (
            f"final status 0x{final:04X}: expected {expected}, completed {counters.completed}, "
            f"failed {counters.failed}, landed {landed}, refused {refused}"
        )
    return PullResult(
        status,
        expected,
        expected_series,
        counters.completed,
        counters.failed,
        counters.warning,
        landed,
        refused,
        final,
        time.monotonic() - start,
        detail,
        outage=status == "incomplete" and final is None and counters.outage,
    )
