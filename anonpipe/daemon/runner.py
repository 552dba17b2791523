"""One run, as a resumable state machine: select → pull + de-identify → protocol check → hook →
push → verify → write back → done.

Every phase is idempotent and driven by the states in the :class:`StateStore`, so a run
interrupted anywhere (kill -9, SIGTERM, pause) continues at its first unfinished step: studies
already pulled are not pulled again, files already pushed are not pushed again (and anything the
research PACS already holds is skipped), identity mappings already made are reused unchanged.
Audit lines go to the run directory before the state that follows them is committed, and a line
is never written twice.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from anonpipe import durable
from anonpipe.anon.batch import EngineSpec, engine_spec
from anonpipe.anon.deidentify import Outcome
from anonpipe.anon.duplicates import Duplicates
from anonpipe.anon.identity import load_or_create_key
from anonpipe.anon.quarantine import PROTOCOL_REASON
from anonpipe.config import Settings
from anonpipe.daemon import rundir as audit
from anonpipe.daemon.reviewdb import ReviewDatabase
from anonpipe.daemon.rundir import RunDir
from anonpipe.daemon.state import FileRecord, RunRecord, StateStore, StudyRecord
from anonpipe.daemon.workers import DeidWorkers, Task
from anonpipe.durable import sync_filesystem
from anonpipe.hooks import Hook, HookError, run_hook
from anonpipe.logs import get_logger
from anonpipe.scp import Arrival, LandingRegistry
from anonpipe.scu import (
    Cause,
    MisrouteError,
    MisrouteGuard,
    PeerUnavailable,
    QueryFailed,
    list_instances,
    pull_study,
    push_files,
    verify_studies,
)

__all__ = ["DiskLow", "PeerOutage", "Pipeline", "RunStopped", "execute_run"]

log = get_logger(__name__)

#: Run states in order; ``stopped`` (pause or shutdown) and ``failed`` are resumable by
#: ``restart-run``; a stopped run is also resumed by the scheduler once unpaused.
RUN_PHASES = ("selecting", "pulling", "checking", "hooking", "pushing", "writing_back", "done")
#: Failure reasons that are written back to the review DB (the others are retried next run).
_REPORTED = ("never found", "every file was quarantined", "push failed", "verification failed")


class RunStopped(Exception):
    """The run stopped between steps because of a pause or shutdown; it resumes later."""


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
class Pipeline:
    """What runs need, built once by the service."""

    settings: Settings
    store: StateStore
    review: ReviewDatabase
    registry: LandingRegistry
    guard: MisrouteGuard
    hook: Hook
    should_stop: Callable[[], bool] = lambda: False
    #: Set once the service is shutting down: a long step (the push) stops between files
    #: rather than at its end, so SIGTERM is answered in seconds (a pause lets the step finish).
    shutting_down: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    #: The run in progress (for status), None between runs.
    current: str | None = None
    #: Studies held back at the last selection (review id and reason), for status.
    held: list[dict[str, object]] = field(default_factory=list)
    #: Studies waiting out their back-off at the last selection (review id, next try, reason).
    deferred: list[dict[str, object]] = field(default_factory=list)
    #: Files in the research PACS so far, per study being pushed (review id), for status.
    pushing: dict[int, int] = field(default_factory=dict)
    #: Told every run state change (the service sends it to systemd as STATUS=).
    on_state: Callable[[str], None] = lambda _text: None

    def note_error(self, message: str) -> None:
        """Keep the last errors for ``status`` (no PHI in *message*)."""
        self.errors.append(f"{datetime.now():%Y-%m-%d %H:%M:%S} {message}")
        del self.errors[:-20]


async def execute_run(
    p: Pipeline,
    run: RunRecord | None = None,
    *,
    max_studies: int | None = None,
    practice: bool | None = None,
    no_push: bool | None = None,
) -> RunRecord | None:
    """Start a new run (when *run* is None and there is work) or resume *run*; return it.

    Raises
    ------
    RunStopped
        When a pause or shutdown was requested; the run is left ``stopped`` and resumable.
    """
    pipe = p.settings.pipeline
    if run is None:
        run = await _select(
            p,
            max_studies or pipe.max_studies,
            pipe.practice if practice is None else practice,
            pipe.no_push if no_push is None else no_push,
        )
        if run is None:
            return None
    elif run.state == "selecting":
        # A crash (kill -9) interrupted the selection: make it again, into the same run folder.
        # Resumed as it was, the run would pull nothing and end, and the next poll would start a
        # second run for its studies.
        run = await _select(p, max_studies or pipe.max_studies, run.practice, run.no_push, run)
        if run is None:
            return None
    rdir = RunDir.open(run.path)
    p.current = run.name
    try:
        await _pull_and_deidentify(p, run, rdir)
        await _protocol_check(p, run, rdir)
        await _hook(p, run, rdir)
        if not run.practice and not run.no_push:
            await _push(p, run, rdir)
            await _write_back(p, run, rdir)
        await _finish(p, run, rdir)
    except RunStopped as exc:
        await _advance(p, run.name, "stopped", str(exc) or None)
        raise
    except MisrouteError as exc:
        await _advance(p, run.name, "failed", f"misroute: {exc}")
        p.note_error(f"{run.name}: pulls stopped: {exc}")
        raise
    except Exception as exc:
        await _advance(p, run.name, "failed", failure_text(exc))
        p.note_error(f"{run.name}: failed: {failure_text(exc)}")
        log.exception("run failed", run=run.name)
    finally:
        p.current = None
    return await p.store.run(run.name)


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


# -- select -------------------------------------------------------------------------------


async def _select(
    p: Pipeline, limit: int, practice: bool, no_push: bool, resumed: RunRecord | None = None
) -> RunRecord | None:
    """Pick the studies of a new run, or of *resumed*, a run whose selection a crash cut short
    (its folder is reused, and none of its audit lines is written twice)."""
    waiting = await p.store.deferred()
    selection = await p.review.select(limit, exclude={d.review_id for d in waiting})
    p.held = [{"study": h.candidate.id, "reason": h.reason} for h in selection.held]
    p.deferred = [
        {"study": d.review_id, "next_try": d.next_try, "failures": d.failures, "reason": d.reason}
        for d in waiting
    ]
    if resumed is not None and await p.store.studies(resumed.name):
        # The studies were recorded; only the step to "pulling" was lost.
        await _advance(p, resumed.name, "pulling")
        return await p.store.run(resumed.name)
    if not selection.picked and resumed is None:
        return None
    if resumed is None:
        await _remove_unrecorded_runs(p)
        rdir = RunDir.create(p.settings.pipeline.data_dir)
        await p.store.add_run(rdir.name, rdir.path, practice=practice, no_push=no_push)
    else:
        rdir = RunDir.open(resumed.path)
    _overview_once(rdir, audit.starting(datetime.now()), prefix="Starting at ")
    entries: list[tuple[str, tuple[str, ...], str | None]] = [
        (c.original_study_uid, c.comments, None) for c in selection.picked
    ]
    entries += [
        (h.candidate.original_study_uid, h.candidate.comments, h.reason) for h in selection.held
    ]
    rdir.write_lines("comments.txt", audit.comments_lines(entries))
    rdir.write_lines("studies_to_retrieve.txt", [c.original_study_uid for c in selection.picked])
    _overview_once(rdir, audit.valid_reviewed(len(selection.picked)))
    if selection.held:
        _overview_once(rdir, audit.held_back(len(selection.held)))
    rows: list[tuple[int, str, str, bool, str, str | None]] = [
        (c.id, c.original_study_uid, c.accession_no, c.has_protocol_series, "selected", None)
        for c in selection.picked
    ]
    rows += [
        (
            h.candidate.id,
            h.candidate.original_study_uid,
            h.candidate.accession_no,
            h.candidate.has_protocol_series,
            "held",
            h.reason,
        )
        for h in selection.held
    ]
    await p.store.add_studies(rdir.name, rows)
    await _advance(p, rdir.name, "pulling")
    log.info(
        "run started",
        run=rdir.name,
        studies=len(selection.picked),
        held=len(selection.held),
        practice=practice,
        no_push=no_push,
    )
    run = await p.store.run(rdir.name)
    if run is None:  # pragma: no cover - just inserted
        raise RuntimeError("run vanished from the state store")
    return run


# -- pull and de-identify -----------------------------------------------------------------


def _engine_spec(p: Pipeline, run: RunRecord, rdir: RunDir) -> EngineSpec:
    anon = p.settings.anon
    identity_db = anon.identity_db
    if run.practice:
        # Practice never creates or changes identity.db: work on a throwaway copy.
        identity_db = rdir.path / ".practice-identity.db"
        if not identity_db.exists() and anon.identity_db.exists():
            # Byte copies (the WAL too): opening the real store, even read-only, would create
            # its -shm/-wal files. Nothing else writes identity.db while this run practises.
            for suffix in ("", "-wal"):
                source = Path(f"{anon.identity_db}{suffix}")
                if source.exists():
                    shutil.copyfile(source, f"{identity_db}{suffix}")
        # ... and never create the key file either: an absent key means a throwaway one.
        key = (
            load_or_create_key(anon.key_file) if anon.key_file.exists() else secrets.token_bytes(32)
        )
    else:
        key = load_or_create_key(anon.key_file)
    return engine_spec(anon, key, identity_db)


async def _pull_and_deidentify(p: Pipeline, run: RunRecord, rdir: RunDir) -> None:
    studies = [s for s in await p.store.studies(run.name) if s.state in ("selected", "pulling")]
    if studies:
        workers = DeidWorkers(_engine_spec(p, run, rdir), p.settings.anon.jobs)
        # one output per SOP Instance UID in the whole run, the studies done before included;
        # not the files of a study pulled again (a crash after its files were recorded, before
        # its state): they would count as duplicates of themselves and the study as empty
        again = {s.review_id for s in studies}
        written = {
            f.sop_instance_uid: Path(f.output)
            for f in await p.store.files(run.name)
            if f.status == "clean" and f.sop_instance_uid and f.output and f.review_id not in again
        }
        duplicates = Duplicates(rdir.quarantine, written)
        try:
            for study in studies:
                if p.should_stop():
                    raise RunStopped
                await _pull_one(p, run, rdir, study, workers, duplicates)
        finally:
            workers.shutdown()
    await _advance(p, run.name, "checking")
    all_studies = await p.store.studies(run.name)
    files = sum(s.landed for s in all_studies)
    with_files = sum(1 for s in all_studies if s.landed)
    _overview_once(rdir, audit.received(files, with_files))
    not_pulled = [s for s in all_studies if s.state == "failed" and not s.landed]
    if not_pulled:
        _overview_once(rdir, audit.not_pulled(len(not_pulled)))


def _check_space(p: Pipeline, rdir: RunDir) -> None:
    """Raise :class:`DiskLow` when the run's filesystem is below the free-space floor."""
    floor = p.settings.local.min_free_mb
    free = durable.free_bytes(rdir.path)
    if floor and free < floor * 2**20:
        raise DiskLow(
            f"waiting for disk space: {free // 2**20} MB free where the runs are, below"
            f" [local] min_free_mb = {floor}"
        )


async def _pull_one(
    p: Pipeline,
    run: RunRecord,
    rdir: RunDir,
    study: StudyRecord,
    workers: DeidWorkers,
    duplicates: Duplicates,
) -> None:
    _check_space(p, rdir)
    loop = asyncio.get_running_loop()
    await p.store.update_study(run.name, study.review_id, state="pulling")
    landing_dir = rdir.from_staging / str(study.review_id)
    landing_dir.mkdir(parents=True, exist_ok=True)
    submitted: dict[Task, asyncio.Future[Outcome]] = {}

    def submit(path: Path) -> None:
        task = (path, rdir.to_production, rdir.quarantine)
        if task not in submitted and not path.name.startswith("."):
            submitted[task] = workers.submit(task)

    def on_arrival(arrival: Arrival) -> None:  # SCP thread: hand over to the loop
        loop.call_soon_threadsafe(submit, arrival.path)

    for leftover in sorted(landing_dir.iterdir()):  # landed before a crash
        submit(leftover)
    try:
        result = await asyncio.to_thread(
            pull_study,
            p.settings.local,
            p.settings.staging,
            p.registry,
            study.original_study_uid,
            landing_dir,
            on_arrival=on_arrival,
            guard=p.guard,
            stop=p.shutting_down,
        )
    except (PeerUnavailable, QueryFailed) as exc:
        if exc.cause is Cause.OUTAGE:  # left "pulling": pulled when the PACS answers again
            rdir.append("pull_output.txt", f"{study.review_id}\twaiting: {exc}")
            raise PeerOutage("staging", str(exc)) from exc
        rdir.append("pull_output.txt", f"{study.review_id}\tnot pulled: {exc}")
        await p.store.update_study(
            run.name, study.review_id, state="failed", reason=f"staging PACS unavailable: {exc}"
        )
        p.note_error(f"{run.name}: study {study.review_id}: {exc}")
        return
    if result.status == "stopped":
        # Left "pulling": the resumed run pulls the study again over what already landed.
        raise RunStopped
    if result.outage:
        # The staging PACS went away in the middle of the move: left "pulling" as well.
        rdir.append("pull_output.txt", f"{study.review_id}\twaiting: {result.detail}")
        raise PeerOutage("staging", result.detail)
    for path in sorted(landing_dir.iterdir()):
        submit(path)
    outcomes = await workers.outcomes(dict(submitted))  # late arrival callbacks add nothing new
    outcomes = [duplicates.judge(o) for o in outcomes]
    unwritten = [o for o in outcomes if o.status == "error"]
    if unwritten:
        # Our side (disk full, permissions), never the file's fault: left "pulling", redone.
        raise DiskLow(
            f"{len(unwritten)} files could not be written ({unwritten[0].detail}); the run"
            " resumes where it stopped"
        )
    await asyncio.to_thread(sync_filesystem, rdir.path)
    records = [_record(study.review_id, o) for o in outcomes]
    await p.store.add_files(run.name, records)
    clean = [r for r in records if r.status == "clean"]
    repeated = [r for r in records if r.status == "duplicate"]
    quarantined = [r for r in records if r.status not in ("clean", "duplicate")]
    # A study pulled again after a crash between these lines and its state writes them once.
    anonymized = set(rdir.read_lines("anonymize_output.txt"))
    pulled = set(rdir.read_lines("pull_output.txt"))
    for record in quarantined:
        output = Path(record.output).name if record.output else "-"
        _append_new(
            rdir,
            "anonymize_output.txt",
            f"{study.review_id}\t{record.status}\t{output}\t{record.reason}",
            anonymized,
        )
    if repeated:
        _append_new(
            rdir,
            "anonymize_output.txt",
            f"{study.review_id}\tduplicate\t{len(repeated)} files repeated an object already"
            " written (same SOP Instance UID and content): written once",
            anonymized,
        )
    notes = audit.identity_notes(Counter(a for o in outcomes for a in o.disagrees))
    if notes:
        _append_new(
            rdir,
            "anonymize_output.txt",
            f"{study.review_id}\tpatient identity\t{notes}",
            anonymized,
        )
        p.note_error(f"{run.name}: study {study.review_id}: {notes}")
        log.warning(
            "objects of one study name their patient differently",
            run=run.name,
            study=study.review_id,
        )
    cleaned_uid = clean[0].cleaned_study_uid if clean else None
    _append_new(
        rdir,
        "anonymize_output.txt",
        f"{study.review_id}\t{len(records)} files: {len(clean)} clean, "
        f"{len(quarantined)} quarantined" + (f", {len(repeated)} duplicates" if repeated else ""),
        anonymized,
    )
    _append_new(
        rdir,
        "pull_output.txt",
        f"{study.review_id}\t{result.status}\texpected {result.expected}"
        f"\tcompleted {result.completed}\tfailed {result.failed}\tlanded {result.landed}"
        + (f"\t{result.detail}" if result.detail else ""),
        pulled,
    )
    state, reason = "deidentified", None
    if result.status == "not found":
        state, reason = "failed", "never found in the staging PACS"
    elif not result.complete:
        state, reason = "failed", f"pull {result.status}: {result.detail}"
    elif not clean:
        reasons = Counter(r.reason or "unknown" for r in quarantined)
        listed = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
        state, reason = "failed", f"every file was quarantined ({listed})"
    await p.store.update_study(
        run.name,
        study.review_id,
        state=state,
        reason=reason,
        expected=result.expected,
        landed=len(records),
        clean=len(clean),
        quarantined=len(quarantined),
        duplicates=len(repeated),
        notes=notes,
        cleaned_study_uid=cleaned_uid,
    )
    if reason:
        p.note_error(f"{run.name}: study {study.review_id}: {reason}")


def _record(review_id: int, outcome: Outcome) -> FileRecord:
    return FileRecord(
        review_id=review_id,
        name=outcome.source.name,
        status=outcome.status,
        output=str(outcome.output) if outcome.output else None,
        reason=outcome.reason,
        cleaned_study_uid=outcome.study_uid if outcome.status == "clean" else None,
        sop_instance_uid=outcome.sop_instance_uid if outcome.status == "clean" else None,
        modality=outcome.modality,
        sop_class=outcome.sop_class_uid,
        series_uid=outcome.series_uid if outcome.status == "clean" else None,
    )


# -- protocol check and hook --------------------------------------------------------------


async def _protocol_check(p: Pipeline, run: RunRecord, rdir: RunDir) -> None:
    if p.should_stop():
        raise RunStopped
    studies = await p.store.studies(run.name)
    files = await p.store.files(run.name)
    by_id = {s.review_id: s for s in studies}
    found_ids = {f.review_id for f in files if f.reason == PROTOCOL_REASON}
    reviewed = [s for s in studies if s.has_protocol_series and s.state != "held"]
    found = [by_id[i] for i in sorted(found_ids)]
    missing = [s for s in reviewed if s.review_id not in found_ids]
    rdir.write_lines("reviewed_protocol_studies.txt", [s.original_study_uid for s in reviewed])
    rdir.write_lines("found_protocol_studies.txt", [s.original_study_uid for s in found])
    rdir.write_lines("missing_protocol_studies.txt", [s.original_study_uid for s in missing])
    _overview_once(rdir, audit.protocol_summary(len(reviewed), len(found)))
    if missing:
        _overview_once(rdir, audit.protocol_missing(len(missing)))
    await _advance(p, run.name, "hooking")


async def _hook(p: Pipeline, run: RunRecord, rdir: RunDir) -> None:
    if p.should_stop():
        raise RunStopped
    output = "post_anon_output_practice.txt" if run.practice else "post_anon_output.txt"
    if not rdir.has(output):
        # What a hook run cut short by a crash wrote to overview.txt is not written again.
        earlier = rdir.read_lines("overview.txt")
        try:
            text = await asyncio.to_thread(
                run_hook, p.hook, rdir.path, rdir.overview_stream(skip=earlier), run.practice
            )
        except HookError as exc:
            # Not in the output file: its presence means "the hook ran", and after restart-run
            # the fixed hook must run (it was skipped, the failure kept as its output).
            rdir.overview(audit.hook_failed(failure_text(exc)))
            raise
        rdir.write_lines(output, text.splitlines())
    if run.practice:
        for study in await p.store.studies(run.name):
            if study.state == "deidentified":
                await p.store.update_study(run.name, study.review_id, state="practiced")
    await _advance(p, run.name, "pushing")


# -- push, verify, write back -------------------------------------------------------------


async def _push(p: Pipeline, run: RunRecord, rdir: RunDir) -> None:
    settings = p.settings
    for study in await p.store.studies(run.name):
        if study.state not in ("deidentified", "pushing") or not study.cleaned_study_uid:
            continue
        if p.should_stop():
            raise RunStopped
        _check_space(p, rdir)
        await p.store.update_study(run.name, study.review_id, state="pushing")
        files = [f for f in await p.store.files(run.name, study.review_id) if f.status == "clean"]
        try:
            present = await asyncio.to_thread(
                list_instances, settings.local, settings.research, study.cleaned_study_uid
            )
        except (PeerUnavailable, QueryFailed):
            present = set()
        already = [f for f in files if f.sop_instance_uid in present]
        todo = [f for f in files if f.sop_instance_uid not in present and f.output]
        if already:
            await p.store.mark_pushed(run.name, study.review_id, [f.name for f in already])
        try:
            report = await asyncio.to_thread(
                push_files,
                settings.local,
                settings.research,
                [Path(f.output or "") for f in todo],
                on_stored=_progress(p.pushing, study.review_id, len(already)),
                stop=p.shutting_down,
            )
        finally:
            del p.pushing[study.review_id]
        stored_paths = {r.path for r in report.stored}
        stored = [f.name for f in todo if Path(f.output or "") in stored_paths]
        await p.store.mark_pushed(run.name, study.review_id, stored)
        if report.stopped:
            # Left "pushing": the resumed run asks the research PACS what it holds and goes on.
            raise RunStopped
        if report.failed and all(f.cause is Cause.OUTAGE for f in report.failed):
            # Nothing was refused: research is down or silent. Left "pushing", not written back.
            why = Counter(f.error for f in report.failed).most_common(1)[0][0]
            rdir.append(
                "push_output.txt",
                f"{study.cleaned_study_uid}\twaiting\t{len(report.failed)} of {len(files)} "
                f"files not stored yet: {why}",
            )
            raise PeerOutage("research", why)
        # A study pushed again after a crash between these lines and its state (a resumed push
        # finds every file there) writes them once: the first account stands.
        lines = set(rdir.read_lines("push_output.txt"))
        for failure in report.failed:
            _append_new(
                rdir,
                "push_output.txt",
                f"{study.cleaned_study_uid}\tfailed\t{failure.path.name}\t{failure.error}",
                lines,
            )
        pushed = len(already) + len(stored)
        summary = f"{study.cleaned_study_uid}\t{pushed} of {len(files)} files in the research PACS"
        if not any(line.startswith(f"{summary} (") for line in lines):
            rdir.append("push_output.txt", f"{summary} ({len(already)} were already there)")
        (check,) = await asyncio.to_thread(
            verify_studies,
            settings.local,
            settings.research,
            {study.cleaned_study_uid: len(files)},
        )
        if check.cause is Cause.OUTAGE:
            raise PeerOutage("research", check.error)
        if report.failed:
            state = "failed"
            why = Counter(f.error for f in report.failed).most_common(1)[0][0]
            reason = (
                f"push failed after retries: {len(report.failed)} of {len(files)} files not stored"
                f" ({why})"
            )
        elif not check.ok:
            state = "failed"
            reason = (
                f"verification failed: the research PACS holds {check.found} of "
                f"{len(files)} instances{': ' + check.error if check.error else ''}"
            )
        else:
            state, reason = "verified", None
        _append_new(
            rdir,
            "push_output.txt",
            f"{study.cleaned_study_uid}\tverified: {check.found} of {len(files)}\t{state}",
            lines,
        )
        await p.store.update_study(
            run.name, study.review_id, state=state, reason=reason, pushed=pushed
        )
        if reason:
            p.note_error(f"{run.name}: study {study.review_id}: {reason}")
    await _advance(p, run.name, "writing_back")


def _progress(counts: dict[int, int], key: int, start: int) -> Callable[[], None]:
    """``counts[key] = start``, and a callable that adds one from any thread (live progress)."""
    following = itertools.count(start + 1)
    lock = threading.Lock()
    counts[key] = start

    def step() -> None:
        with lock:
            counts[key] = next(following)

    return step


async def _write_back(p: Pipeline, run: RunRecord, rdir: RunDir) -> None:
    now = datetime.now().replace(microsecond=0)
    for study in await p.store.studies(run.name):
        if study.state == "verified":
            files = [
                f for f in await p.store.files(run.name, study.review_id) if f.status == "clean"
            ]
            series = {f.series_uid for f in files}
            first = files[0] if files else None
            await p.review.mark_published(
                study.review_id,
                when=now,
                study_uid=study.cleaned_study_uid,
                number_of_series=len(series),
                total_images=len(files),
                modality=first.modality if first else None,
                sop_class=first.sop_class if first else None,
            )
            await p.store.update_study(run.name, study.review_id, state="published")
        elif study.state == "failed" and (study.reason or "").startswith(_REPORTED):
            await p.review.mark_failed(study.review_id, study.reason or "failed", when=now)
            await p.store.update_study(run.name, study.review_id, state="failed-reported")
    published = sum(1 for s in await p.store.studies(run.name) if s.state == "published")
    _overview_once(rdir, audit.push_completed(now), prefix="Push completed at ")
    _overview_once(rdir, audit.pushed(published))


#: Back-off of a study that fails again for a reason that repeats (not written back): first
#: wait, doubling, and the longest.
BACKOFF_FIRST = 60.0
BACKOFF_LONGEST = 6 * 3600.0


async def _back_off(p: Pipeline, run: RunRecord) -> None:
    """Studies that failed for a reason not written back wait before they are picked again
    (a new run every poll interval was the result); the others start afresh."""
    if run.practice:
        return
    first = max(BACKOFF_FIRST, p.settings.review.poll_interval)
    for study in await p.store.studies(run.name):
        if study.state == "failed":
            wait = await p.store.defer(
                study.review_id, study.reason or "failed", first, BACKOFF_LONGEST
            )
            log.warning(
                "study deferred",
                run=run.name,
                study=study.review_id,
                failures=wait.failures,
                next_try=wait.next_try,
            )
        elif study.state in ("published", "failed-reported"):
            await p.store.clear_backoff(study.review_id)


async def _finish(p: Pipeline, run: RunRecord, rdir: RunDir) -> None:
    await _back_off(p, run)
    rdir.finish(f"Finished at {datetime.now():%Y-%m-%d %H:%M}")
    practice_db = rdir.path / ".practice-identity.db"
    for leftover in (practice_db, Path(f"{practice_db}-wal"), Path(f"{practice_db}-shm")):
        leftover.unlink(missing_ok=True)
    await _advance(p, run.name, "done")
    log.info("run done", run=run.name)


async def _advance(p: Pipeline, run: str, state: str, error: str | None = None) -> None:
    """Commit the run's new state, then tell the service (STATUS= for systemd)."""
    await p.store.set_run_state(run, state, error)
    p.on_state(f"{run}: {state}")


def _append_new(rdir: RunDir, filename: str, line: str, earlier: set[str]) -> None:
    """Append *line* to *filename* unless it is in *earlier* (the file's lines before this
    step): a step redone after a crash writes its audit lines once."""
    if line not in earlier:
        rdir.append(filename, line)


async def _remove_unrecorded_runs(p: Pipeline) -> None:
    """Remove the run folder a crash left between its creation and its record in the state store
    (empty, unknown to the store), so the next run is the only one; anything else is left."""
    known = {r.name for r in await p.store.runs()}
    for rdir in RunDir.list(p.settings.pipeline.data_dir):
        if rdir.name in known:  # the common case: no listing of its folders
            continue
        entries = list(rdir.path.iterdir())
        if any(e.name not in audit.FOLDERS or not e.is_dir() or any(e.iterdir()) for e in entries):
            continue
        try:
            for entry in entries:
                entry.rmdir()
            rdir.path.rmdir()  # fails, and leaves it, if anything appeared meanwhile
        except OSError:
            continue
        durable.fsync_path(rdir.path.parent)
        log.warning("empty run folder without a run removed", run=rdir.name)


def _overview_once(rdir: RunDir, line: str, prefix: str | None = None) -> None:
    """Append *line* unless it (or a line starting with *prefix*) is already there (resume)."""
    existing = rdir.read_lines("overview.txt")
    if prefix is not None and any(x.startswith(prefix) for x in existing):
        return
    if line not in existing:
        rdir.overview(line)
