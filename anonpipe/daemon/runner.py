"""One run, as a resumable state machine: select, then each study through its own steps, then
the run's summaries and done.

Each study flows on its own (:mod:`anonpipe.daemon.study`): pull → de-identify (as files land)
→ hook → push → verify → write back, up to ``[pipeline] studies_in_flight`` studies at once and
``[staging] max_parallel_moves`` C-MOVEs at once, so one study's push overlaps the next one's
pull. A per-run hook (``hook(run_dir, overview, practice)``) needs every study de-identified
first: the run then pulls every study, runs the hook once, and pushes every study.

The run's state (:class:`~anonpipe.daemon.states.RunState`) is its least advanced study's phase,
then its summaries (checking: received and protocol audit files; hooking; writing back: the
overview's push lines). Everything is driven by the states in the :class:`StateStore`, so a run
interrupted anywhere (kill -9, SIGTERM, pause) continues where it was. Audit lines go to the run
directory before the state that follows them is committed, and a line is never written twice.

Every log line of the run carries its name (``run``, :func:`~anonpipe.logs.run_scope`), and a
line of a step its :class:`~anonpipe.daemon.pipeline.Step` (and, for a study's, its review id).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Awaitable
from datetime import datetime
from pathlib import Path
from typing import cast

from anonpipe import durable
from anonpipe.anon.batch import EngineSpec, engine_spec
from anonpipe.anon.duplicates import Duplicates
from anonpipe.anon.identity import load_or_create_key
from anonpipe.anon.quarantine import PROTOCOL_REASON
from anonpipe.daemon import audit
from anonpipe.daemon.pipeline import (
    DiskLow,
    PeerOutage,
    Pipeline,
    RunContext,
    RunStopped,
    Step,
    StopSignal,
    failure_text,
    in_step,
    overview_once,
    practice_identity,
)
from anonpipe.daemon.reviewdb import Selection
from anonpipe.daemon.rundir import FOLDERS, RunDir, post_anon_output
from anonpipe.daemon.state import RunRecord, StudyRecord
from anonpipe.daemon.states import RUN_PHASES, RunState, StudyState
from anonpipe.daemon.study import hook_study, publish, pull_and_deidentify, push_and_verify
from anonpipe.daemon.workers import DeidWorkers
from anonpipe.hooks import Hook, HookError, StudyHook, is_per_study, run_hook
from anonpipe.logs import get_logger, run_scope
from anonpipe.scu import MisrouteError

__all__ = [
    "RUN_PHASES",
    "DiskLow",
    "PeerOutage",
    "Pipeline",
    "RunStopped",
    "StopSignal",
    "execute_run",
    "failure_text",
]

log = get_logger(__name__)


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
        When a pause or shutdown was requested, or a PACS or the disk must be waited for; the
        run is left ``stopped`` and resumable.
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
    elif run.state is RunState.SELECTING:
        # A crash (kill -9) interrupted the selection: make it again, into the same run folder.
        # Resumed as it was, the run would pull nothing and end, and the next poll would start a
        # second run for its studies.
        run = await _select(p, max_studies or pipe.max_studies, run.practice, run.no_push, run)
        if run is None:
            return None
    with run_scope(run.name):
        return await _execute(p, run)


async def _execute(p: Pipeline, run: RunRecord) -> RunRecord | None:
    """The run's studies and its summaries; its state recorded however it ends."""
    pipe = p.settings.pipeline
    rdir = RunDir.open(run.path)
    ctx = RunContext(
        p,
        run,
        rdir,
        in_flight=asyncio.Semaphore(pipe.studies_in_flight),
        moves=asyncio.Semaphore(p.settings.staging.max_parallel_moves),
    )
    p.current = run.name
    try:
        await _studies(ctx)
        await _finish(ctx)
    except RunStopped as exc:
        await p.advance(run.name, RunState.STOPPED, str(exc) or None)
        log.info("run stopped; it resumes where it stopped", reason=str(exc) or None)
        raise
    except MisrouteError as exc:
        await p.advance(run.name, RunState.FAILED, f"misroute: {exc}")
        p.note_error(f"{run.name}: pulls stopped: {exc}")
        raise
    except Exception as exc:
        await p.advance(run.name, RunState.FAILED, failure_text(exc))
        p.note_error(f"{run.name}: failed: {failure_text(exc)}")
        log.exception("run failed", run=run.name)
    finally:
        p.current = None
    return await p.store.run(run.name)


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
        await p.advance(resumed.name, RunState.PULLING)
        return await p.store.run(resumed.name)
    if not selection.picked and resumed is None:
        return None
    if resumed is None:
        await _remove_unrecorded_runs(p)
        rdir = RunDir.create(p.settings.pipeline.data_dir)
    else:
        rdir = RunDir.open(resumed.path)
    with run_scope(rdir.name), in_step(Step.SELECT):
        if resumed is None:
            await p.store.add_run(rdir.name, rdir.path, practice=practice, no_push=no_push)
        return await _record_selection(p, selection, rdir, practice, no_push)


async def _record_selection(
    p: Pipeline, selection: Selection, rdir: RunDir, practice: bool, no_push: bool
) -> RunRecord:
    """The selection's audit files and the run's studies in the state store."""
    overview_once(rdir, audit.starting(datetime.now()), prefix="Starting at ")
    entries: list[tuple[str, tuple[str, ...], str | None]] = [
        (c.original_study_uid, c.comments, None) for c in selection.picked
    ]
    entries += [
        (h.candidate.original_study_uid, h.candidate.comments, h.reason) for h in selection.held
    ]
    rdir.write_lines("comments.txt", audit.comments_lines(entries))
    rdir.write_lines("studies_to_retrieve.txt", [c.original_study_uid for c in selection.picked])
    overview_once(rdir, audit.valid_reviewed(len(selection.picked)))
    if selection.held:
        overview_once(rdir, audit.held_back(len(selection.held)))
    rows: list[tuple[int, str, str, bool, StudyState, str | None]] = [
        (
            c.id,
            c.original_study_uid,
            c.accession_no,
            c.has_protocol_series,
            StudyState.SELECTED,
            None,
        )
        for c in selection.picked
    ]
    rows += [
        (
            h.candidate.id,
            h.candidate.original_study_uid,
            h.candidate.accession_no,
            h.candidate.has_protocol_series,
            StudyState.HELD,
            h.reason,
        )
        for h in selection.held
    ]
    await p.store.add_studies(rdir.name, rows)
    await p.advance(rdir.name, RunState.PULLING)
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


# -- the studies ------------------------------------------------------------------------------


async def _studies(ctx: RunContext) -> None:
    """Every study of the run through its steps, side by side; the run's summaries between.

    The run's state follows its least advanced study; a study's exception halts the others at
    their next step boundary, and the run ends with the most telling one (:meth:`settle`).
    """
    p, run = ctx.p, ctx.run
    per_study = is_per_study(p.hook)
    studies = [s for s in await p.store.studies(run.name) if s.state is not StudyState.HELD]
    pulled: dict[int, asyncio.Future[None]] = {
        s.review_id: asyncio.get_running_loop().create_future() for s in studies
    }

    async def flow(study: StudyRecord) -> None:
        async with ctx.in_flight:
            try:
                study = await pull_and_deidentify(ctx, study)
            finally:
                pulled[study.review_id].set_result(None)
            if per_study:
                study = await hook_study(ctx, study, cast(StudyHook, p.hook))
                await _push_one(ctx, study)

    async def push_later(study: StudyRecord) -> None:
        async with ctx.in_flight:
            record = await p.store.study(run.name, study.review_id)
            await _push_one(ctx, record or study)

    tasks: list[asyncio.Future[object]] = []
    try:
        to_pull = [s for s in studies if s.state.to_pull]
        if to_pull:
            ctx.workers, ctx.duplicates = await _start_workers(ctx, to_pull)
        # Started in review-id order; the semaphore lets studies_in_flight through at a time.
        tasks += [_spawn(ctx, flow(s)) for s in studies]
        await asyncio.gather(*pulled.values())
        if ctx.workers is not None:
            ctx.workers.shutdown()
            ctx.workers = None
        if ctx.halted:
            await ctx.settle(tasks)
        with in_step(Step.CHECK):
            await p.advance(run.name, RunState.CHECKING)
            await _pull_summaries(ctx)
            await _protocol_check(ctx)
        await p.advance(run.name, RunState.HOOKING)
        if not per_study:
            with in_step(Step.HOOK):
                await _run_hook(ctx, cast(Hook, p.hook))
        await p.advance(run.name, RunState.PUSHING)
        if not per_study:
            tasks += [_spawn(ctx, push_later(s)) for s in studies]
        await ctx.settle(tasks)
    except BaseException as exc:
        ctx.halted = True
        ctx.raised.append(exc)
        if ctx.workers is not None:
            ctx.workers.shutdown()
            ctx.workers = None
        await ctx.settle(tasks)
        raise
    await p.advance(run.name, RunState.WRITING_BACK)
    if per_study:
        _hook_summary(ctx, await p.store.studies(run.name))
    if ctx.pushes:
        published = [s for s in await p.store.studies(run.name) if s.state is StudyState.PUBLISHED]
        overview_once(ctx.rdir, audit.push_completed(datetime.now()), "Push completed at ")
        overview_once(ctx.rdir, audit.pushed(len(published)))


def _spawn(ctx: RunContext, step: Awaitable[None]) -> asyncio.Future[object]:
    """A study's steps as a task; its exception halts the other studies at their boundary."""

    async def guarded() -> None:
        try:
            await step
        except BaseException:
            ctx.halted = True
            raise

    return asyncio.ensure_future(guarded())


async def _push_one(ctx: RunContext, study: StudyRecord) -> None:
    """Push, verify and write back one study (or, in practice, mark it practised)."""
    if ctx.run.practice:
        if study.state in (StudyState.DEIDENTIFIED, StudyState.HOOKED):
            await ctx.p.store.update_study(
                ctx.run.name, study.review_id, state=StudyState.PRACTICED
            )
        return
    if not ctx.pushes:
        return
    study = await push_and_verify(ctx, study)
    await publish(ctx, study)


async def _start_workers(
    ctx: RunContext, to_pull: list[StudyRecord]
) -> tuple[DeidWorkers, Duplicates]:
    """The run's de-identification workers, and the judge of duplicate objects across it."""
    p, run = ctx.p, ctx.run
    workers = DeidWorkers(_engine_spec(p, run, ctx.rdir), p.settings.anon.jobs)
    # one output per SOP Instance UID in the whole run, the studies done before included;
    # not the files of a study pulled again (a crash after its files were recorded, before
    # its state): they would count as duplicates of themselves and the study as empty
    again = {s.review_id for s in to_pull}
    written = {
        f.sop_instance_uid: Path(f.output)
        for f in await p.store.files(run.name)
        if f.status == "clean" and f.sop_instance_uid and f.output and f.review_id not in again
    }
    return workers, Duplicates(ctx.rdir.quarantine, written)


def _engine_spec(p: Pipeline, run: RunRecord, rdir: RunDir) -> EngineSpec:
    anon = p.settings.anon
    identity_db = anon.identity_db
    if run.practice:
        # Practice never creates or changes identity.db: work on a throwaway copy.
        identity_db = practice_identity(rdir)
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


# -- the run's summaries --------------------------------------------------------------------


async def _pull_summaries(ctx: RunContext) -> None:
    studies = await ctx.p.store.studies(ctx.run.name)
    files = sum(s.landed for s in studies)
    with_files = sum(1 for s in studies if s.landed)
    overview_once(ctx.rdir, audit.received(files, with_files))
    not_pulled = [s for s in studies if s.failure is not None and not s.landed]
    if not_pulled:
        overview_once(ctx.rdir, audit.not_pulled(len(not_pulled)))


async def _protocol_check(ctx: RunContext) -> None:
    """Which studies the reviewers marked as holding a protocol series, and in which one was
    found (its files quarantined): the three audit files and the overview's lines."""
    p, rdir = ctx.p, ctx.rdir
    studies = await p.store.studies(ctx.run.name)
    files = await p.store.files(ctx.run.name)
    by_id = {s.review_id: s for s in studies}
    found_ids = {f.review_id for f in files if f.reason == PROTOCOL_REASON}
    reviewed = [s for s in studies if s.has_protocol_series and s.state is not StudyState.HELD]
    found = [by_id[i] for i in sorted(found_ids)]
    missing = [s for s in reviewed if s.review_id not in found_ids]
    rdir.write_lines("reviewed_protocol_studies.txt", [s.original_study_uid for s in reviewed])
    rdir.write_lines("found_protocol_studies.txt", [s.original_study_uid for s in found])
    rdir.write_lines("missing_protocol_studies.txt", [s.original_study_uid for s in missing])
    overview_once(rdir, audit.protocol_summary(len(reviewed), len(found)))
    if missing:
        overview_once(rdir, audit.protocol_missing(len(missing)))


async def _run_hook(ctx: RunContext, hook: Hook) -> None:
    """The per-run hook, once every study is de-identified (skipped if its output exists)."""
    ctx.boundary()
    rdir, practice = ctx.rdir, ctx.run.practice
    output = post_anon_output(practice)
    if rdir.has(output):
        return
    # What a hook run cut short by a crash wrote to overview.txt is not written again.
    earlier = rdir.read_lines("overview.txt")
    name = ctx.p.settings.pipeline.post_anon_hook
    try:
        text = await asyncio.to_thread(
            run_hook, hook, rdir.path, rdir.overview_stream(skip=earlier), practice, name
        )
    except HookError as exc:
        # Not in the output file: its presence means "the hook ran", and after restart-run
        # the fixed hook must run (it was skipped, the failure kept as its output).
        rdir.overview(audit.hook_failed(failure_text(exc)))
        raise
    rdir.write_lines(output, text.splitlines())


def _hook_summary(ctx: RunContext, studies: list[StudyRecord]) -> None:
    """After a per-study hook that reported anything: the overview's ``N files containing N
    studies were successfully hooked up to an encounter.``, counting the studies it ran on."""
    if not ctx.rdir.read_lines(post_anon_output(ctx.run.practice)):
        return  # a hook that reports nothing (none) claims nothing
    hooked = [s for s in studies if s.hooked]
    if hooked:
        overview_once(ctx.rdir, audit.hooked(sum(s.clean for s in hooked), len(hooked)))


# -- finish -----------------------------------------------------------------------------------

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
        if study.state is StudyState.FAILED:
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
        elif study.state in (StudyState.PUBLISHED, StudyState.FAILED_REPORTED):
            await p.store.clear_backoff(study.review_id)


async def _finish(ctx: RunContext) -> None:
    with in_step(Step.FINISH):
        await _finish_run(ctx)


async def _finish_run(ctx: RunContext) -> None:
    p, run, rdir = ctx.p, ctx.run, ctx.rdir
    await _back_off(p, run)
    rdir.finish(audit.finished_at(datetime.now()))
    practice_db = practice_identity(rdir)
    for leftover in (practice_db, Path(f"{practice_db}-wal"), Path(f"{practice_db}-shm")):
        leftover.unlink(missing_ok=True)
    await p.advance(run.name, RunState.DONE)
    log.info("run done", run=run.name)


async def _remove_unrecorded_runs(p: Pipeline) -> None:
    """Remove the run folder a crash left between its creation and its record in the state store
    (empty, unknown to the store), so the next run is the only one; anything else is left."""
    known = {r.name for r in await p.store.runs()}
    for rdir in RunDir.list(p.settings.pipeline.data_dir):
        if rdir.name in known:  # the common case: no listing of its folders
            continue
        entries = list(rdir.path.iterdir())
        if any(e.name not in FOLDERS or not e.is_dir() or any(e.iterdir()) for e in entries):
            continue
        try:
            for entry in entries:
                entry.rmdir()
            rdir.path.rmdir()  # fails, and leaves it, if anything appeared meanwhile
        except OSError:
            continue
        durable.fsync_path(rdir.path.parent)
        log.warning("empty run folder without a run removed", run=rdir.name)
