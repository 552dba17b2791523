"""One study's steps: pull and de-identify, the per-study hook, push and verify, write back.

Each step starts from the study's state in the state store and ends by committing the next
one, so a study interrupted anywhere (kill -9, SIGTERM, pause) continues at its unfinished step:
a study is pulled again only if its pull had not finished (what landed is kept and re-used),
files already pushed are not pushed again (and what the research PACS holds is skipped), and
every audit line is written once. Durability is bought where it matters: objects landed by
C-MOVE still exist in the staging PACS, so they are not synced one by one; a study counts as
pulled only after one sync of the filesystem holding its landing folder and outputs.

Each step's log lines carry the study's review id and the step (:func:`in_step`), in the threads
it hands work to and in the de-identification workers too (:mod:`anonpipe.logs`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from anonpipe.anon.deidentify import Outcome
from anonpipe.config import LocalSettings, ResearchSettings
from anonpipe.daemon import audit
from anonpipe.daemon.pipeline import (
    DiskLow,
    PeerOutage,
    PushProgress,
    RunContext,
    RunStopped,
    Step,
    enter_step,
    in_step,
)
from anonpipe.daemon.rundir import post_anon_output
from anonpipe.daemon.state import FileRecord, StudyRecord
from anonpipe.daemon.states import Failure, StepMark, StudyState
from anonpipe.daemon.workers import Task
from anonpipe.durable import sync_folder, sync_tree
from anonpipe.hooks import HookStudy, StudyHook, run_study_hook
from anonpipe.logs import STEP_FIELD, get_logger
from anonpipe.scp import Arrival
from anonpipe.scu import (
    Cause,
    PeerUnavailable,
    PushItem,
    PushReport,
    QueryFailed,
    list_instances,
    pull_study,
    push_files,
    push_items,
    verify_studies,
)

__all__ = ["hook_study", "publish", "pull_and_deidentify", "push_and_verify"]

log = get_logger(__name__)


async def _set(
    ctx: RunContext, study: StudyRecord, state: StudyState, **columns: object
) -> StudyRecord:
    """Commit *study*'s new state (and columns); return it as the store now has it."""
    await ctx.p.store.update_study(ctx.run.name, study.review_id, state=state, **columns)
    return await _reload(ctx, study)


async def _reload(ctx: RunContext, study: StudyRecord) -> StudyRecord:
    record = await ctx.p.store.study(ctx.run.name, study.review_id)
    if record is None:  # pragma: no cover - studies are never deleted
        raise RuntimeError("a study vanished from the state store")
    return record


async def _fail(
    ctx: RunContext, study: StudyRecord, failure: Failure, reason: str, **columns: object
) -> StudyRecord:
    ctx.p.note_error(f"{ctx.run.name}: study {study.review_id}: {reason}")
    return await _set(ctx, study, StudyState.FAILED, failure=failure, reason=reason, **columns)


# -- pull and de-identify -----------------------------------------------------------------


async def pull_and_deidentify(ctx: RunContext, study: StudyRecord) -> StudyRecord:
    """C-MOVE the study into our SCP, de-identifying files as they land; record each outcome.

    Ends ``deidentified`` or ``failed`` (never found, refused, incomplete, all quarantined);
    raises :class:`RunStopped` (left ``pulling``) for a stop, an outage or a full disk.
    """
    if not study.state.to_pull:
        return study
    with in_step(Step.PULL, study.review_id):
        return await _pull_and_deidentify(ctx, study)


async def _pull_and_deidentify(ctx: RunContext, study: StudyRecord) -> StudyRecord:
    ctx.boundary()
    ctx.check_space()
    p, rdir = ctx.p, ctx.rdir
    workers, duplicates = ctx.workers, ctx.duplicates
    if workers is None or duplicates is None:  # pragma: no cover - set up by the runner
        raise RuntimeError("the run's workers are not started")
    loop = asyncio.get_running_loop()
    study = await _set(ctx, study, StudyState.PULLING)
    landing_dir = rdir.from_staging / str(study.review_id)
    landing_dir.mkdir(parents=True, exist_ok=True)
    submitted: dict[Task, asyncio.Future[Outcome]] = {}
    # The workers' lines: this run and study, step deidentify (also for files that land during
    # the pull, handed over from the SCP's thread).
    fields = {**structlog.contextvars.get_contextvars(), STEP_FIELD: Step.DEIDENTIFY.value}

    def submit(path: Path) -> None:
        task = (path, rdir.to_production, rdir.quarantine)
        if task not in submitted and not path.name.startswith("."):
            submitted[task] = workers.submit(task, fields)

    def on_arrival(arrival: Arrival) -> None:  # SCP thread: hand over to the loop
        loop.call_soon_threadsafe(submit, arrival.path)

    for leftover in sorted(landing_dir.iterdir()):  # landed before a crash
        submit(leftover)
    try:
        async with ctx.moves:
            ctx.boundary()
            result = await asyncio.to_thread(
                pull_study,
                p.settings.local,
                p.settings.staging,
                p.registry,
                study.original_study_uid,
                landing_dir,
                on_arrival=on_arrival,
                guard=p.guard,
                stop=p.stop.now,
            )
    except (PeerUnavailable, QueryFailed) as exc:
        if exc.cause is Cause.OUTAGE:  # left "pulling": pulled when the PACS answers again
            rdir.append("pull_output.txt", audit.pull_waiting(study.review_id, str(exc)))
            raise PeerOutage("staging", str(exc)) from exc
        rdir.append("pull_output.txt", audit.pull_refused(study.review_id, str(exc)))
        return await _fail(ctx, study, Failure.STAGING_REFUSED, audit.staging_unavailable(str(exc)))
    if result.status == "stopped":
        # Left "pulling": the resumed run pulls the study again over what already landed.
        raise RunStopped
    if result.outage:
        # The staging PACS went away in the middle of the move: left "pulling" as well.
        rdir.append("pull_output.txt", audit.pull_waiting(study.review_id, result.detail))
        raise PeerOutage("staging", result.detail)
    enter_step(Step.DEIDENTIFY)
    await p.store.mark_step(ctx.run.name, study.review_id, StepMark.MOVED)
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
    # The one sync that makes the study's landed objects and its outputs durable.
    await asyncio.to_thread(_sync_study, landing_dir, outcomes, rdir.quarantine)
    records = [_record(study.review_id, o) for o in outcomes]
    await p.store.add_files(ctx.run.name, records)
    _write_anonymize_lines(ctx, study, records, outcomes)
    pulled = audit.PulledStudy(
        study.review_id,
        result.status,
        result.expected,
        result.completed,
        result.failed,
        result.landed,
        result.detail,
    )
    ctx.append_new("pull_output.txt", pulled.line(), set(rdir.read_lines("pull_output.txt")))
    clean = [r for r in records if r.status == "clean"]
    repeated = [r for r in records if r.status == "duplicate"]
    quarantined = [r for r in records if r.status not in ("clean", "duplicate")]
    counts: dict[str, object] = {
        "expected": result.expected,
        "landed": len(records),
        "clean": len(clean),
        "quarantined": len(quarantined),
        "duplicates": len(repeated),
        "notes": audit.identity_notes(Counter(a for o in outcomes for a in o.disagrees)),
        "cleaned_study_uid": clean[0].cleaned_study_uid if clean else None,
    }
    if result.status == "not found":
        return await _fail(ctx, study, Failure.NEVER_FOUND, audit.never_found(), **counts)
    if not result.complete:
        reason = audit.pull_incomplete(result.status, result.detail)
        return await _fail(ctx, study, Failure.PULL_INCOMPLETE, reason, **counts)
    if not clean:
        why = Counter(r.reason or "unknown" for r in quarantined).most_common()
        reason = audit.all_quarantined(why)
        return await _fail(ctx, study, Failure.ALL_QUARANTINED, reason, **counts)
    return await _set(ctx, study, StudyState.DEIDENTIFIED, reason=None, **counts)


def _sync_study(landing_dir: Path, outcomes: list[Outcome], quarantine: Path) -> None:
    """fsync what the study landed and wrote (its landing folder, its output tree, the
    quarantine folder) and nothing else: ``syncfs`` would wait for the other studies in flight
    too (bench/RESULTS.md, network throughput, issue 12)."""
    sync_folder(landing_dir)
    studies = {o.output.parent.parent for o in outcomes if o.status == "clean" and o.output}
    for tree in sorted(studies):
        sync_tree(tree)
    if any(o.status == "quarantined" for o in outcomes):
        sync_folder(quarantine)


def _write_anonymize_lines(
    ctx: RunContext, study: StudyRecord, records: list[FileRecord], outcomes: list[Outcome]
) -> None:
    # A study pulled again after a crash between these lines and its state writes them once.
    earlier = set(ctx.rdir.read_lines("anonymize_output.txt"))
    rid = study.review_id
    clean = sum(1 for r in records if r.status == "clean")
    repeated = sum(1 for r in records if r.status == "duplicate")
    quarantined = [r for r in records if r.status not in ("clean", "duplicate")]
    for record in quarantined:
        output = Path(record.output).name if record.output else None
        line = audit.file_not_clean(rid, record.status, output, record.reason)
        ctx.append_new("anonymize_output.txt", line, earlier)
    if repeated:
        ctx.append_new(
            "anonymize_output.txt", audit.duplicates_written_once(rid, repeated), earlier
        )
    notes = audit.identity_notes(Counter(a for o in outcomes for a in o.disagrees))
    if notes:
        ctx.append_new("anonymize_output.txt", audit.identity_line(rid, notes), earlier)
        ctx.p.note_error(f"{ctx.run.name}: study {rid}: {notes}")
        log.warning(
            "objects of one study name their patient differently", run=ctx.run.name, study=rid
        )
    summary = audit.anonymized(rid, len(records), clean, len(quarantined), repeated)
    ctx.append_new("anonymize_output.txt", summary, earlier)


def _record(review_id: int, outcome: Outcome) -> FileRecord:
    clean = outcome.status == "clean"
    return FileRecord(
        review_id=review_id,
        name=outcome.source.name,
        status=outcome.status,
        output=str(outcome.output) if outcome.output else None,
        reason=outcome.reason,
        cleaned_study_uid=outcome.study_uid if clean else None,
        sop_instance_uid=outcome.sop_instance_uid if clean else None,
        modality=outcome.modality,
        sop_class=outcome.sop_class_uid,
        series_uid=outcome.series_uid if clean else None,
        transfer_syntax=outcome.transfer_syntax_uid if clean else None,
        size=outcome.size if clean else None,
    )


# -- per-study hook -------------------------------------------------------------------------


async def hook_study(ctx: RunContext, study: StudyRecord, hook: StudyHook) -> StudyRecord:
    """Run the per-study hook on a de-identified study; its report goes to post_anon_output.

    A hook run again after a crash (between its report and the state) appends its report once.
    """
    if study.state is not StudyState.DEIDENTIFIED or not study.cleaned_study_uid:
        return study
    with in_step(Step.HOOK, study.review_id):
        return await _hook_study(ctx, study, study.cleaned_study_uid, hook)


async def _hook_study(
    ctx: RunContext, study: StudyRecord, uid: str, hook: StudyHook
) -> StudyRecord:
    ctx.boundary()
    files = await _clean_files(ctx, study)
    first = files[0] if files else None
    subject = HookStudy(
        run_dir=ctx.rdir.path,
        folder=ctx.rdir.to_production / uid,
        study_uid=uid,
        review_id=study.review_id,
        files=len(files),
        series=len({f.series_uid for f in files}),
        modality=first.modality if first else None,
        sop_class=first.sop_class if first else None,
    )
    name = ctx.p.settings.pipeline.post_anon_hook
    report = await asyncio.to_thread(run_study_hook, hook, subject, ctx.run.practice, name)
    output = post_anon_output(ctx.run.practice)
    earlier = set(ctx.rdir.read_lines(output))
    for line in report.splitlines():
        ctx.append_new(output, line, earlier)
    state = StudyState.PRACTICED if ctx.run.practice else StudyState.HOOKED
    return await _set(ctx, study, state)


async def _clean_files(ctx: RunContext, study: StudyRecord) -> list[FileRecord]:
    files = await ctx.p.store.files(ctx.run.name, study.review_id)
    return [f for f in files if f.status == "clean"]


# -- push and verify ------------------------------------------------------------------------


async def push_and_verify(ctx: RunContext, study: StudyRecord) -> StudyRecord:
    """C-STORE the study's clean files the research PACS does not hold yet, then C-FIND that
    it holds them all. Ends ``verified`` or ``failed`` (refused after retries, verification);
    raises :class:`RunStopped` (left ``pushing``) for a stop or an outage."""
    if not study.state.to_push or not study.cleaned_study_uid:
        return study
    with in_step(Step.PUSH, study.review_id):
        return await _push_and_verify(ctx, study, study.cleaned_study_uid)


async def _push_and_verify(ctx: RunContext, study: StudyRecord, uid: str) -> StudyRecord:
    ctx.boundary()
    ctx.check_space()
    p, rdir = ctx.p, ctx.rdir
    settings = p.settings
    study = await _set(ctx, study, StudyState.PUSHING)
    files = await _clean_files(ctx, study)
    try:
        present = await asyncio.to_thread(list_instances, settings.local, settings.research, uid)
    except (PeerUnavailable, QueryFailed):
        present = set()
    already = [f for f in files if f.sop_instance_uid in present]
    todo = [f for f in files if f.sop_instance_uid not in present and f.output]
    if already:
        await p.store.mark_pushed(ctx.run.name, study.review_id, [f.name for f in already])
    # Kept while the study waits in its push (an outage, a stop): status shows its retries.
    progress = p.pushing.setdefault(study.review_id, PushProgress())
    progress.begin(len(already))
    report = await asyncio.to_thread(
        _push,
        settings.local,
        settings.research,
        [_item(f, uid) for f in todo],
        on_stored=progress.stored_one,
        on_failed=progress.failed,
        stop=p.stop.now,
    )
    stored_paths = {r.path for r in report.stored}
    stored = [f.name for f in todo if Path(f.output or "") in stored_paths]
    await p.store.mark_pushed(ctx.run.name, study.review_id, stored)
    if report.stopped:
        # Left "pushing": the resumed run asks the research PACS what it holds and goes on.
        raise RunStopped
    if report.failed and all(f.cause is Cause.OUTAGE for f in report.failed):
        # Nothing was refused: research is down or silent. Left "pushing", not written back.
        why = Counter(f.error for f in report.failed).most_common(1)[0][0]
        rdir.append("push_output.txt", audit.push_waiting(uid, len(report.failed), len(files), why))
        raise PeerOutage("research", why)
    # A study pushed again after a crash between these lines and its state (a resumed push
    # finds every file there) writes them once: the first account stands.
    lines = set(rdir.read_lines("push_output.txt"))
    for refused in report.failed:
        line = audit.push_file_failed(uid, refused.path.name, refused.error)
        ctx.append_new("push_output.txt", line, lines)
    finished = audit.FinishedPush(uid, len(already) + len(stored), len(files), len(already))
    if not any(line.startswith(f"{finished.prefix} (") for line in lines):
        ctx.append_new("push_output.txt", finished.line(), lines)
    enter_step(Step.VERIFY)
    await p.store.mark_step(ctx.run.name, study.review_id, StepMark.VERIFYING)
    (check,) = await asyncio.to_thread(
        verify_studies, settings.local, settings.research, {uid: len(files)}
    )
    if check.cause is Cause.OUTAGE:
        raise PeerOutage("research", check.error)
    if report.failed:
        why = Counter(f.error for f in report.failed).most_common(1)[0][0]
        state, failure, reason = (
            StudyState.FAILED,
            Failure.PUSH_REFUSED,
            audit.push_refused(len(report.failed), len(files), why),
        )
    elif not check.ok:
        state, failure, reason = (
            StudyState.FAILED,
            Failure.VERIFICATION,
            audit.verification_failed(check.found, len(files), check.error),
        )
    else:
        state, failure, reason = StudyState.VERIFIED, None, None
    ctx.append_new("push_output.txt", audit.verified(uid, check.found, len(files), state), lines)
    if reason:
        p.note_error(f"{ctx.run.name}: study {study.review_id}: {reason}")
    del p.pushing[study.review_id]  # its push is over
    return await _set(ctx, study, state, failure=failure, reason=reason, pushed=finished.pushed)


def _item(record: FileRecord, study_uid: str) -> PushItem | Path:
    """What a C-STORE needs, from the state store: no header is read again (only a file an
    older version recorded without its transfer syntax is read, by the push)."""
    path = Path(record.output or "")
    if not (record.sop_class and record.sop_instance_uid and record.transfer_syntax):
        return path
    return PushItem(
        path, record.sop_class, record.sop_instance_uid, record.transfer_syntax, study_uid
    )


def _push(
    local: LocalSettings,
    research: ResearchSettings,
    items: list[PushItem | Path],
    **kwargs: Any,
) -> PushReport:
    if all(isinstance(i, PushItem) for i in items):
        return push_items(local, research, [i for i in items if isinstance(i, PushItem)], **kwargs)
    # A study an older version de-identified: its headers say what the store does not.
    paths = [i.path if isinstance(i, PushItem) else i for i in items]
    return push_files(local, research, paths, **kwargs)


# -- write back -----------------------------------------------------------------------------


async def publish(ctx: RunContext, study: StudyRecord) -> StudyRecord:
    """Write a verified study, or a failure an operator must see, back to the review DB."""
    with in_step(Step.WRITEBACK, study.review_id):
        return await _publish(ctx, study)


async def _publish(ctx: RunContext, study: StudyRecord) -> StudyRecord:
    if study.state is StudyState.VERIFIED:
        files = await _clean_files(ctx, study)
        first = files[0] if files else None
        await ctx.p.review.mark_published(
            study.review_id,
            when=datetime.now().replace(microsecond=0),
            study_uid=study.cleaned_study_uid,
            number_of_series=len({f.series_uid for f in files}),
            total_images=len(files),
            modality=first.modality if first else None,
            sop_class=first.sop_class if first else None,
        )
        return await _set(ctx, study, StudyState.PUBLISHED)
    if study.state is StudyState.FAILED and study.failure is not None and study.failure.reported:
        when = datetime.now().replace(microsecond=0)
        await ctx.p.review.mark_failed(study.review_id, study.reason or "failed", when=when)
        return await _set(ctx, study, StudyState.FAILED_REPORTED)
    return study
