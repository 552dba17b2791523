"""De-identify many files in parallel worker processes, each with its own identity-store handle.

Work is spread over processes (the engine is CPU-bound Python, so threads would not help); each
worker opens the identity store once and keeps its caches warm across files. Results come back
in input order through a callback, so the caller can count, print and index as files finish.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from anonpipe.anon.clean import Recipe
from anonpipe.anon.deidentify import Outcome, deidentify_file
from anonpipe.anon.duplicates import Duplicates
from anonpipe.anon.identity import IdentityStore
from anonpipe.anon.profile import build_profile
from anonpipe.anon.quarantine import QuarantineRule, load_rules
from anonpipe.anon.vocabulary import Vocabulary
from anonpipe.durable import sync_filesystem

if TYPE_CHECKING:
    from anonpipe.config import AnonSettings


@dataclass(frozen=True)
class EngineSpec:
    """Everything a worker process needs to build its engine (picklable, no open handles)."""

    identity_db: Path
    key: bytes
    options: tuple[str, ...]
    dates: str
    allowed_modalities: tuple[str, ...]
    shift_days: tuple[int, int] = (-365, -1)
    vocabulary: Path | None = None
    safe_private: tuple[str, ...] = ()
    patient_key: str = "id"


def engine_spec(anon: AnonSettings, key: bytes, identity_db: Path | None = None) -> EngineSpec:
    """The engine of ``[anon]`` settings (*identity_db* overrides, e.g. a practice copy)."""
    return EngineSpec(
        identity_db=identity_db or anon.identity_db,
        key=key,
        options=anon.options,
        dates=anon.dates,
        allowed_modalities=anon.allowed_modalities,
        shift_days=anon.date_shift_days,
        vocabulary=anon.limited_vocabulary,
        safe_private=anon.safe_private,
        patient_key=anon.patient_key,
    )


@dataclass
class Summary:
    """Counts of one batch, by outcome and reason.

    ``disagreements`` counts, per identifying attribute, the objects that named their patient
    differently from their study's first object (they got the study's pseudonyms all the same).
    """

    clean: int = 0
    duplicates: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    disagreements: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: Outcome) -> None:
        """Count one outcome."""
        if outcome.status == "clean":
            self.clean += 1
        elif outcome.status == "duplicate":
            self.duplicates += 1
        elif outcome.status == "quarantined":
            self.quarantined[outcome.reason or "unknown"] += 1
        else:
            self.errors[outcome.reason or "unknown"] += 1
        self.disagreements.update(outcome.disagrees)

    @property
    def total(self) -> int:
        """Files handled."""
        handled = self.clean + self.duplicates
        return handled + sum(self.quarantined.values()) + sum(self.errors.values())


class Engine:
    """One process's engine: recipe, rules and identity store, opened once."""

    def __init__(self, spec: EngineSpec) -> None:
        self.recipe = Recipe(
            profile=build_profile(spec.options, spec.dates),
            dates=spec.dates,
            vocabulary=Vocabulary.load(spec.vocabulary),
            safe_private=frozenset(s.strip().casefold() for s in spec.safe_private),
        )
        self.rules: tuple[QuarantineRule, ...] = load_rules(spec.allowed_modalities)
        self.store = IdentityStore(
            spec.identity_db, spec.key, spec.shift_days, patient_key=spec.patient_key
        )

    def run(
        self, source: Path, clean_dir: Path, quarantine_dir: Path, durable: bool = True
    ) -> Outcome:
        """De-identify one file (see :func:`deidentify_file`)."""
        recipe, rules, store = self.recipe, self.rules, self.store
        return deidentify_file(source, clean_dir, quarantine_dir, recipe, rules, store, durable)

    def close(self) -> None:
        """Close the identity store."""
        self.store.close()


_worker: Engine | None = None


def _init_worker(spec: EngineSpec) -> None:
    global _worker
    _worker = Engine(spec)
    # What the worker holds for good (imports, pydicom's dictionaries, the engine's tables) is
    # moved out of the collector's reach: otherwise every full collection walks it again, and in
    # a forked worker also writes to pages it shares with its parent (measured: -10 % CPU).
    gc.freeze()


def run_in_worker(task: tuple[Path, Path, Path]) -> Outcome:
    """De-identify ``(source, clean_dir, quarantine_dir)`` in a :func:`worker_pool` process
    (no per-file fsync: the caller syncs once per batch)."""
    if _worker is None:  # pragma: no cover - the pool initializer always runs first
        raise RuntimeError("worker engine not initialised")
    return _worker.run(*task, durable=False)


def worker_pool(spec: EngineSpec, jobs: int = 0) -> ProcessPoolExecutor:
    """A process pool whose workers each hold an :class:`Engine`; submit :func:`run_in_worker`.

    For a caller that feeds files as they arrive (the daemon) rather than a list up front. The
    identity store is created here first (see :func:`run_batch`).
    """
    IdentityStore(spec.identity_db, spec.key, spec.shift_days).close()
    return ProcessPoolExecutor(jobs or os.cpu_count() or 1, _context(), _init_worker, (spec,))


def _context() -> multiprocessing.context.BaseContext:
    """fork when this process has no other thread (fast: workers inherit the imports);
    forkserver otherwise (the daemon's SCP threads make fork unsafe)."""
    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def iter_files(root: Path) -> Iterator[Path]:
    """Regular files under `root` in a stable order, skipping hidden and temporary names."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(folder) / name


def run_batch(
    files: Iterable[Path],
    clean_dir: Path,
    quarantine_dir: Path,
    spec: EngineSpec,
    jobs: int = 0,
    on_outcome: Callable[[Outcome], None] | None = None,
    sync: bool = False,
) -> Summary:
    """De-identify `files` with `jobs` worker processes (0: one per core; 1: in this process).

    Files are written without a per-file fsync (thousands of flushes cost more than the work);
    ``sync=True`` makes the whole batch durable with one ``syncfs`` before returning, for a
    caller that records the batch as done (the daemon). Without it, like ``cp``, a power cut
    may lose output the kernel had not yet written; a killed process loses nothing.

    Raises
    ------
    IdentityError
        When the identity store cannot be opened or created.

    Parameters
    ----------
    on_outcome
        Called in this process for every file, in input order, as results arrive (after the
        :class:`~anonpipe.anon.duplicates.Duplicates` judge: one clean outcome per output).
    """
    jobs = jobs or os.cpu_count() or 1
    # create the identity store (schema, WAL) here, once: workers racing to create a new file
    # can fail ("disk I/O error" on the WAL switch), and an error belongs to the caller
    IdentityStore(spec.identity_db, spec.key, spec.shift_days).close()
    summary = Summary()
    duplicates = Duplicates(quarantine_dir)
    tasks = ((path, clean_dir, quarantine_dir) for path in files)

    def report(outcome: Outcome) -> None:
        outcome = duplicates.judge(outcome)
        summary.add(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    if jobs == 1:
        engine = Engine(spec)
        try:
            for task in tasks:
                report(engine.run(*task, durable=False))
        finally:
            engine.close()
    else:
        with ProcessPoolExecutor(jobs, _context(), _init_worker, (spec,)) as pool:
            for outcome in pool.map(run_in_worker, tasks, chunksize=16):
                report(outcome)
    if sync:
        sync_filesystem(clean_dir)
        sync_filesystem(quarantine_dir)
    return summary
