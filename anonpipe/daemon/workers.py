"""A run's de-identification worker processes, rebuilt when one of them dies.

A worker can die without an exception reaching us: the kernel's OOM killer, an operator's
``kill``, a crash in native code. A :class:`~concurrent.futures.ProcessPoolExecutor` is then
broken for good: every file in flight fails with ``BrokenProcessPool`` and nothing more can be
submitted. Rather than fail the run and wait for an operator, the pool is rebuilt and the files it
lost are de-identified again (idempotent: the same outputs, the identity mappings reused). A pool
that breaks again on those same files is not an accident; that fails the run, as before, with a
message that says so.

The studies in flight share one pool: the first to see it broken rebuilds it (once per broken
pool, whoever asks), and the files of the others that the old pool dropped (their futures
cancelled by its shutdown) are done again in the new one too.

A worker's log lines (pydicom's warnings, a record of the engine) are formatted and redacted as
the daemon's are, and carry the run, study and step of the file's submitter: each task takes its
context fields along, and the worker configures its logging like the daemon's on its first task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import structlog

from anonpipe.anon.batch import EngineSpec, run_in_worker, worker_pool
from anonpipe.anon.deidentify import Outcome
from anonpipe.logs import LoggingSetup, adopt_setup, get_logger, worker_setup

__all__ = ["DeidWorkers", "WorkersDied"]

log = get_logger(__name__)

#: (source file, clean folder, quarantine folder): what :func:`run_in_worker` takes.
Task = tuple[Path, Path, Path]


class WorkersDied(RuntimeError):
    """The pool broke again while redoing the files a dead worker lost."""


class DeidWorkers:
    """``submit`` files as they land, then ``outcomes`` of them all; ``shutdown`` at the end."""

    def __init__(self, spec: EngineSpec, jobs: int) -> None:
        self._spec = spec
        self._jobs = jobs
        self._pool = worker_pool(spec, jobs)
        #: How often the pool was rebuilt (for tests and the log); also the pool's generation.
        self.rebuilds = 0
        self._generation: dict[Task, int] = {}
        #: Each task's log context fields, kept for its redo in a rebuilt pool.
        self._fields: dict[Task, Mapping[str, object]] = {}
        self._logging = worker_setup()

    def submit(
        self, task: Task, fields: Mapping[str, object] | None = None
    ) -> asyncio.Future[Outcome]:
        """Start de-identifying one file; call from the event loop's thread.

        *fields* are the log context of the worker's lines for this file (run, study, step);
        by default the caller's context fields.
        """
        loop = asyncio.get_running_loop()
        self._generation[task] = self.rebuilds
        if fields is not None:
            self._fields[task] = fields  # shared by a study's files, not copied
        elif task not in self._fields:
            self._fields[task] = structlog.contextvars.get_contextvars()
        try:
            return loop.run_in_executor(
                self._pool, _deidentify, task, self._fields[task], self._logging
            )
        except BrokenProcessPool as exc:  # broke earlier: redone in outcomes()
            future: asyncio.Future[Outcome] = loop.create_future()
            future.set_exception(exc)
            return future

    async def outcomes(self, submitted: dict[Task, asyncio.Future[Outcome]]) -> list[Outcome]:
        """Each submitted file's outcome, in order; what a dead worker lost is done again once.

        Raises
        ------
        WorkersDied
            If the rebuilt pool breaks as well.
        """
        done: dict[Task, Outcome] = {}
        lost: list[Task] = []
        for task, future in submitted.items():
            try:
                done[task] = await future
            except (BrokenProcessPool, asyncio.CancelledError):
                if not _dropped(future):
                    raise
                lost.append(task)
        if lost:
            log.warning(
                "a de-identification worker died; its files are done again in a new pool",
                files=len(lost),
            )
            self._rebuild(min(self._generation[task] for task in lost))
            again = {task: self.submit(task) for task in lost}
            for task, future in again.items():
                try:
                    done[task] = await future
                except (BrokenProcessPool, asyncio.CancelledError) as exc:
                    if not _dropped(future):
                        raise
                    raise WorkersDied(
                        f"de-identification workers died twice on the same {len(lost)} files: "
                        "one of them may crash the engine or exhaust memory (see the kernel log); "
                        "move it aside, then restart-run"
                    ) from exc
        return [done[task] for task in submitted]

    def shutdown(self) -> None:
        """Stop the workers (files not started are dropped; a resumed run redoes them)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _rebuild(self, broken: int) -> None:
        """Replace the pool of generation *broken*, unless another study already did."""
        if broken != self.rebuilds:
            return
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = worker_pool(self._spec, self._jobs)
        self.rebuilds += 1


def _deidentify(task: Task, fields: Mapping[str, object], setup: LoggingSetup | None) -> Outcome:
    """In a worker: :func:`run_in_worker` with the submitter's log fields bound (the worker's
    logging set up like the daemon's first)."""
    adopt_setup(setup)
    with structlog.contextvars.bound_contextvars(**fields):
        return run_in_worker(task)


def _dropped(future: asyncio.Future[Outcome]) -> bool:
    """Whether *future* was lost with its pool (broken, or cancelled by the pool's shutdown),
    rather than our own task being cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return False
    return future.cancelled() or isinstance(future.exception(), BrokenProcessPool)
