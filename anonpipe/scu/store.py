"""Push files to the research PACS (C-STORE), then confirm with C-FIND what arrived per study.

Files are sent as they are on disk (pynetdicom streams each data set from the file; nothing is
decoded or transcoded), so the presentation contexts come from the files' own SOP classes and
transfer syntaxes, at most 128 per association. Files can be spread over several associations in
parallel, each owned by one thread. A failed object is retried, with exponential backoff, when
the failure can be transient (no association, no answer, out of resources); the report has one
result per file and never raises for a peer that is down. A push can be stopped between files
(the service shutting down); what was not sent is reported as such.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pynetdicom.presentation import PresentationContext, build_context

from anonpipe.config import LocalSettings, ResearchSettings
from anonpipe.dimse import Status, configure_transfer, status_category
from anonpipe.headers import read_header, text_value
from anonpipe.logs import carry_context, get_logger, share_context
from anonpipe.scu.association import (
    MAX_CONTEXTS,
    Cause,
    Ending,
    PeerUnavailable,
    associate,
    describe,
    ended,
)
from anonpipe.scu.find import QueryFailed, count_study

__all__ = [
    "FileResult",
    "PushItem",
    "PushReport",
    "StudyVerification",
    "push_files",
    "push_items",
    "push_tree",
    "read_item",
    "verify_studies",
]

log = get_logger(__name__)

ResultHandler = Callable[["FileResult"], None]
#: Told after each round in which files failed: their most common error, and whether another
#: round follows (for status: a push's retries and its last refusal or abort).
FailureHandler = Callable[[str, bool], None]

#: The error of a file left unsent because the push was stopped.
NOT_SENT_STOPPED = "not sent: the push was stopped"


@dataclass(frozen=True, slots=True)
class PushItem:
    """One file to send, with what its header says."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_uid: str

    @property
    def context_key(self) -> tuple[str, str]:
        return self.sop_class_uid, self.transfer_syntax


@dataclass(frozen=True, slots=True)
class FileResult:
    """What happened to one file: ``stored``, ``warning`` (stored, peer warned) or ``failed``."""

    path: Path
    outcome: str
    status: int | None
    attempts: int
    study_uid: str = ""
    sop_instance_uid: str = ""
    error: str = ""
    #: Of a failure: an outage (wait for the peer), a refusal (report it) or our side.
    cause: Cause | None = None

    @property
    def stored(self) -> bool:
        return self.outcome in ("stored", "warning")


@dataclass
class PushReport:
    """One result per file, in input order, how long the push took, and whether it was stopped
    before every file had its chance."""

    results: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0
    stopped: bool = False

    @property
    def stored(self) -> list[FileResult]:
        return [r for r in self.results if r.stored]

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if not r.stored]

    def expected_per_study(self) -> dict[str, int]:
        """Distinct SOP instances per study among the files meant to be pushed."""
        studies: dict[str, set[str]] = {}
        for result in self.results:
            if result.study_uid:
                studies.setdefault(result.study_uid, set()).add(result.sop_instance_uid)
        return {study: len(sops) for study, sops in studies.items()}


@dataclass(frozen=True, slots=True)
class StudyVerification:
    """C-FIND on the research PACS against what we pushed; ``found`` None if it failed."""

    study_uid: str
    expected: int
    found: int | None
    error: str = ""
    #: Of a failed C-FIND: an outage or a refusal.
    cause: Cause | None = None

    @property
    def ok(self) -> bool:
        return self.found == self.expected


def read_item(path: Path) -> PushItem:
    """Read the file meta and the Study Instance UID of *path* (the header only).

    Raises
    ------
    ValueError
        If the file is not DICOM or lacks what sending needs.
    """
    ds = read_header(path, ["StudyInstanceUID"])
    if ds is None:
        raise ValueError("not a readable DICOM file")
    meta = ds.file_meta
    values = {
        "sop_class_uid": meta.get("MediaStorageSOPClassUID"),
        "sop_instance_uid": meta.get("MediaStorageSOPInstanceUID"),
        "transfer_syntax": meta.get("TransferSyntaxUID"),
    }
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise ValueError(f"file meta lacks {', '.join(missing)}")
    sop_class, sop_instance, syntax = (str(v) for v in values.values())
    return PushItem(path, sop_class, sop_instance, syntax, text_value(ds, "StudyInstanceUID") or "")


def push_tree(
    local: LocalSettings, research: ResearchSettings, root: Path, **kwargs: Any
) -> PushReport:
    """:func:`push_files` for every file under *root* (hidden files skipped), in sorted order."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return push_files(local, research, paths, **kwargs)


def push_files(
    local: LocalSettings,
    research: ResearchSettings,
    paths: Iterable[Path],
    *,
    associations: int | None = None,
    retries: int | None = None,
    retry_backoff: float | None = None,
    on_result: ResultHandler | None = None,
    on_stored: Callable[[], None] | None = None,
    on_failed: FailureHandler | None = None,
    stop: threading.Event | None = None,
    sleep: Callable[[float], object] | None = None,
) -> PushReport:
    """:func:`push_items` (same keywords) for files whose header is read here
    (:func:`read_item`).

    A file that is not readable DICOM, or whose file meta lacks what sending needs, gets a
    ``failed`` result (cause ``LOCAL``) in its place.
    """
    ordered = list(paths)
    unreadable: dict[Path, FileResult] = {}
    items: list[PushItem] = []
    for path in ordered:
        try:
            items.append(read_item(path))
        except ValueError as exc:
            unreadable[path] = FileResult(
                path, "failed", None, 0, error=str(exc), cause=Cause.LOCAL
            )
    return _push(
        local,
        research,
        items,
        ordered,
        unreadable,
        associations=associations,
        retries=retries,
        retry_backoff=retry_backoff,
        on_result=on_result,
        on_stored=on_stored,
        on_failed=on_failed,
        stop=stop,
        sleep=sleep,
    )


def push_items(
    local: LocalSettings,
    research: ResearchSettings,
    items: Iterable[PushItem],
    *,
    associations: int | None = None,
    retries: int | None = None,
    retry_backoff: float | None = None,
    on_result: ResultHandler | None = None,
    on_stored: Callable[[], None] | None = None,
    on_failed: FailureHandler | None = None,
    stop: threading.Event | None = None,
    sleep: Callable[[float], object] | None = None,
) -> PushReport:
    """C-STORE the files of *items* to *research*; retry what failed transiently; one result
    per item, in order.

    The items say what each file's header holds (the daemon has it in its state store), so no
    header is read here: reading them took ~40 % of the push's CPU. Their SOP classes and
    transfer syntaxes choose the presentation contexts; pynetdicom sends each file as its own
    file meta says, so an item that does not match its file fails (no accepted context) or is
    stored under its file's UIDs.

    Parameters
    ----------
    local, research
        Our AE and limits; the research PACS, and the defaults for the keywords below.
    items
        The files to send, each with its SOP class, SOP instance, transfer syntax and study.
    associations : int, optional
        Parallel associations (``research.push_associations``).
    retries : int, optional
        Extra rounds for failed files (``research.retries``).
    retry_backoff : float, optional
        Seconds before the first retry, doubled each round (``research.retry_backoff``).
    on_result : callable, optional
        Called once per file with its final result (from the calling thread).
    on_stored : callable, optional
        Called as each file is stored, from the sending threads (live progress).
    on_failed : callable, optional
        Called after each round in which files failed, with their most common error and
        whether another round follows (from the calling thread).
    stop : threading.Event, optional
        Once set (from any thread), no further file is sent, a retry wait ends, and the report
        is ``stopped``.
    sleep : callable, optional
        Waits between retry rounds (tests pass their own); by default ``stop.wait``.
    """
    pending = list(items)
    return _push(
        local,
        research,
        pending,
        [item.path for item in pending],
        {},
        associations=associations,
        retries=retries,
        retry_backoff=retry_backoff,
        on_result=on_result,
        on_stored=on_stored,
        on_failed=on_failed,
        stop=stop,
        sleep=sleep,
    )


def _push(
    local: LocalSettings,
    research: ResearchSettings,
    pending: list[PushItem],
    ordered: list[Path],
    results: dict[Path, FileResult],
    *,
    associations: int | None = None,
    retries: int | None = None,
    retry_backoff: float | None = None,
    on_result: ResultHandler | None = None,
    on_stored: Callable[[], None] | None = None,
    on_failed: FailureHandler | None = None,
    stop: threading.Event | None = None,
    sleep: Callable[[float], object] | None = None,
) -> PushReport:
    """The push: *pending* items sent in rounds; *results* already holds the files that could
    not be read; the report lists one result per path of *ordered*."""
    configure_transfer()
    start = time.monotonic()
    stop = threading.Event() if stop is None else stop
    sleep = stop.wait if sleep is None else sleep
    associations = research.push_associations if associations is None else associations
    retries = research.retries if retries is None else retries
    retry_backoff = research.retry_backoff if retry_backoff is None else retry_backoff

    attempts: dict[Path, int] = {}
    stopped = False
    for round_no in range(retries + 1):
        if round_no:
            delay = retry_backoff * 2 ** (round_no - 1)
            log.warning(
                "push retry",
                peer=describe(research),
                files=len(pending),
                round=round_no,
                of=retries,
                delay_s=delay,
            )
            sleep(delay)
        outcomes = _send_round(local, research, pending, associations, stop, on_stored)
        retry: list[PushItem] = []
        errors: list[str] = []
        for item, status, error, transient, cause in outcomes:
            if error == NOT_SENT_STOPPED:
                stopped = True
                if item.path not in results:
                    results[item.path] = FileResult(
                        item.path,
                        "failed",
                        None,
                        0,
                        item.study_uid,
                        item.sop_instance_uid,
                        error,
                        Cause.LOCAL,
                    )
                continue
            attempts[item.path] = attempts.get(item.path, 0) + 1
            outcome = _outcome(status)
            result = FileResult(
                item.path,
                outcome,
                status,
                attempts[item.path],
                item.study_uid,
                item.sop_instance_uid,
                error,
                cause if outcome == "failed" else None,
            )
            results[item.path] = result
            if outcome == "failed":
                errors.append(error)
                if transient:
                    retry.append(item)
        if errors and on_failed is not None:
            again = bool(retry) and not stopped and round_no < retries
            on_failed(Counter(errors).most_common(1)[0][0], again)
        pending = retry
        if not pending or stopped:
            break

    report = PushReport([results[p] for p in ordered], time.monotonic() - start, stopped)
    if on_result is not None:
        for result in report.results:
            on_result(result)
    level = log.warning if report.failed else log.info
    level(
        "push finished",
        peer=describe(research),
        files=len(report.results),
        stored=len(report.stored),
        failed=len(report.failed),
        seconds=round(report.seconds, 3),
        stopped=stopped,
    )
    return report


def verify_studies(
    local: LocalSettings, research: ResearchSettings, expected: Mapping[str, int]
) -> list[StudyVerification]:
    """Ask *research* how many instances it holds per study and compare with *expected*."""
    checks: list[StudyVerification] = []
    for study_uid, count in expected.items():
        try:
            found = count_study(local, research, study_uid)
        except (PeerUnavailable, QueryFailed) as exc:
            checks.append(StudyVerification(study_uid, count, None, str(exc), exc.cause))
            continue
        checks.append(StudyVerification(study_uid, count, 0 if found is None else found.instances))
    bad = [c for c in checks if not c.ok]
    (log.warning if bad else log.info)(
        "push verified", peer=describe(research), studies=len(checks), mismatched=len(bad)
    )
    return checks


# -- sending ----------------------------------------------------------------------------------


class _Outcome(NamedTuple):
    """One attempt at one file."""

    item: PushItem
    status: int | None  # None when nothing answered
    error: str
    retry: bool  # worth another attempt
    cause: Cause | None  # of a failure


def _ended(item: PushItem, ending: Ending | None) -> _Outcome:
    """The outcome of a file whose association ended under it (or was found lost)."""
    if ending is None:
        return _Outcome(item, None, "association lost", True, Cause.OUTAGE)
    return _Outcome(item, None, ending.reason, ending.cause is not Cause.LOCAL, ending.cause)


def _send_round(
    local: LocalSettings,
    research: ResearchSettings,
    items: Sequence[PushItem],
    parallel: int,
    stop: threading.Event,
    on_stored: Callable[[], None] | None,
) -> list[_Outcome]:
    """Send *items* over up to *parallel* associations, each owned by one thread."""
    if not items:
        return []
    shares = [list(items[i::parallel]) for i in range(min(parallel, len(items)))]
    if len(shares) == 1:
        return _send_share(local, research, shares[0], stop, on_stored)
    with ThreadPoolExecutor(len(shares), thread_name_prefix="push") as pool:
        # The pool's threads log as the caller (its run, study and step): carry_context.
        send = carry_context(lambda share: _send_share(local, research, share, stop, on_stored))
        done = pool.map(send, shares)
        return [outcome for share in done for outcome in share]


def _send_share(
    local: LocalSettings,
    research: ResearchSettings,
    items: list[PushItem],
    stop: threading.Event,
    on_stored: Callable[[], None] | None,
) -> list[_Outcome]:
    outcomes: list[_Outcome] = []
    for batch, contexts in _batches(items):
        if stop.is_set():
            outcomes.extend(_stopped(item) for item in batch)
            continue
        try:
            with associate(local, research, contexts) as assoc:
                # pynetdicom's threads serving the association log with our fields
                share_context(assoc, getattr(assoc, "dul", None))
                for index, item in enumerate(batch):
                    if stop.is_set():
                        rest = batch[index:]
                        outcomes.extend(_stopped(item) for item in rest)
                        break
                    if not assoc.is_established or ended(assoc):
                        outcomes.extend(_ended(rest, ended(assoc)) for rest in batch[index:])
                        break
                    outcome = _send_one(assoc, item)
                    outcomes.append(outcome)
                    if on_stored is not None and _outcome(outcome[1]) != "failed":
                        on_stored()
        except PeerUnavailable as exc:
            sent = {id(o[0]) for o in outcomes}
            outcomes.extend(
                _Outcome(item, None, exc.reason, True, exc.cause)
                for item in batch
                if id(item) not in sent
            )
    return outcomes


def _stopped(item: PushItem) -> _Outcome:
    return _Outcome(item, None, NOT_SENT_STOPPED, False, Cause.LOCAL)


def _send_one(assoc: Any, item: PushItem) -> _Outcome:
    try:
        answer = assoc.send_c_store(item.path)
    except ValueError:
        error = f"the peer accepts this SOP class in no context with syntax {item.transfer_syntax}"
        return _Outcome(item, None, error, False, Cause.REFUSAL)
    except RuntimeError:  # not established (pynetdicom), or ended mid-message (SendAborted)
        return _ended(item, ended(assoc))
    except (OSError, AttributeError) as exc:
        error = f"cannot send the file ({type(exc).__name__})"
        return _Outcome(item, None, error, True, Cause.LOCAL)
    status = answer.get("Status") if answer else None
    if status is None:
        if ended(assoc) is not None:
            return _ended(item, ended(assoc))
        error = f"no C-STORE response within {assoc.dimse_timeout:g} s"
        return _Outcome(item, None, error, True, Cause.OUTAGE)
    code = int(status)
    if status_category(code) in ("success", "warning"):
        return _Outcome(item, code, "", False, None)
    # A transient failure status (out of resources) is the peer's condition: wait it out.
    cause = Cause.OUTAGE if _transient(code) else Cause.REFUSAL
    return _Outcome(item, code, f"status 0x{code:04X}", _transient(code), cause)


def _batches(items: list[PushItem]) -> list[tuple[list[PushItem], list[PresentationContext]]]:
    """Group *items* so each group needs at most 128 distinct contexts: as few associations
    as the mix of SOP classes and transfer syntaxes allows (items keep their order within)."""
    keys = list(dict.fromkeys(item.context_key for item in items))
    batches = []
    for first in range(0, len(keys), MAX_CONTEXTS):
        chunk = set(keys[first : first + MAX_CONTEXTS])
        members = [item for item in items if item.context_key in chunk]
        batches.append((members, _contexts(k for k in keys if k in chunk)))
    return batches


def _contexts(keys: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    return [build_context(sop_class, [syntax]) for sop_class, syntax in keys]


def _outcome(status: int | None) -> str:
    if status is None:
        return "failed"
    category = status_category(status)
    return {"success": "stored", "warning": "warning"}.get(category, "failed")


def _transient(status: int) -> bool:
    """Failure statuses worth another try: out of resources, a processing failure."""
    return 0xA700 <= status <= 0xA7FF or status == Status.PROCESSING_FAILURE
