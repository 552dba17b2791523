"""The state store: runs, their studies and files, and the step each is at (SQLite, WAL).

This is the machine truth the daemon resumes from after a crash; the run directory's text files
are the human audit trail. A transition is written here (committed) before the next step starts,
with its time in ``study_steps`` (one small row per state change, in the same commit): how long a
study spent in each step is read from there.
It holds original Study Instance UIDs and accession numbers, so the file is created 0600 and lives
beside the data folder, never inside a run directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from anonpipe.daemon.states import Failure, RunState, StepMark, StudyState

__all__ = [
    "PAUSED",
    "Deferred",
    "FileRecord",
    "Flag",
    "RunRecord",
    "StateStore",
    "StudyRecord",
    "StudyStep",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    practice INTEGER NOT NULL,
    no_push INTEGER NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS studies (
    run TEXT NOT NULL REFERENCES runs(name),
    review_id INTEGER NOT NULL,
    original_study_uid TEXT NOT NULL,
    accession_no TEXT NOT NULL,
    has_protocol_series INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    expected INTEGER,
    landed INTEGER NOT NULL DEFAULT 0,
    clean INTEGER NOT NULL DEFAULT 0,
    quarantined INTEGER NOT NULL DEFAULT 0,
    pushed INTEGER NOT NULL DEFAULT 0,
    cleaned_study_uid TEXT,
    updated TEXT NOT NULL,
    duplicates INTEGER NOT NULL DEFAULT 0,
    notes TEXT,
    PRIMARY KEY (run, review_id)
);
CREATE TABLE IF NOT EXISTS files (
    run TEXT NOT NULL,
    review_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    output TEXT,
    reason TEXT,
    cleaned_study_uid TEXT,
    sop_instance_uid TEXT,
    modality TEXT,
    sop_class TEXT,
    series_uid TEXT,
    pushed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run, review_id, name)
);
CREATE TABLE IF NOT EXISTS backoff (
    review_id INTEGER PRIMARY KEY,
    failures INTEGER NOT NULL,
    next_try TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS flags (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    since TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS study_steps (
    run TEXT NOT NULL,
    review_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS study_steps_by_study ON study_steps (run, review_id);
"""

#: Columns added after the first release: (table, column, definition), added to older files.
_ADDED_COLUMNS = (
    ("studies", "duplicates", "INTEGER NOT NULL DEFAULT 0"),
    ("studies", "notes", "TEXT"),
    ("studies", "failure", "TEXT"),
    ("files", "transfer_syntax", "TEXT"),
    ("files", "size", "INTEGER"),
)

#: The failure kind of a failed study recorded before ``studies.failure`` existed, from the
#: start of the reason that version wrote; used once, when the column is added.
_LEGACY_FAILURES = (
    ("never found%", Failure.NEVER_FOUND),
    ("every file was quarantined%", Failure.ALL_QUARANTINED),
    ("push failed%", Failure.PUSH_REFUSED),
    ("verification failed%", Failure.VERIFICATION),
    ("staging PACS unavailable%", Failure.STAGING_REFUSED),
    ("pull %", Failure.PULL_INCOMPLETE),
)


#: The flag of an operator's pause (``anonpipectl pause``), kept until ``resume``.
PAUSED = "paused"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _stamp() -> str:
    """A step's time: to the millisecond (a study's steps may take less than a second)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class RunRecord:
    name: str
    path: Path
    state: RunState
    practice: bool
    no_push: bool
    started: str
    finished: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class StudyRecord:
    """One study of a run. ``original_study_uid`` and ``accession_no`` are PHI: never log them."""

    run: str
    review_id: int
    original_study_uid: str
    accession_no: str
    has_protocol_series: bool
    state: StudyState
    reason: str | None
    expected: int | None
    landed: int
    clean: int
    quarantined: int
    pushed: int
    cleaned_study_uid: str | None
    #: Files that repeated an object already written (same SOP Instance UID and content).
    duplicates: int = 0
    #: What an operator should know that did not stop the study (no PHI), e.g. objects that
    #: named their patient differently from the study's first object.
    notes: str | None = None
    #: Why it failed (``state`` failed or failed-reported), which decides the write-back.
    failure: Failure | None = None

    @property
    def hooked(self) -> bool:
        """Whether the per-study hook ran on it: it got that far and did not fail before."""
        return (
            self.cleaned_study_uid is not None
            and self.state.rank >= StudyState.HOOKED.rank
            and (self.failure is None or not self.failure.before_hook)
        )


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One landed file's outcome: ``status`` is clean, duplicate, quarantined or error."""

    review_id: int
    name: str
    status: str
    output: str | None
    reason: str | None
    cleaned_study_uid: str | None
    sop_instance_uid: str | None
    modality: str | None
    sop_class: str | None
    series_uid: str | None
    pushed: bool = False
    #: The clean output's transfer syntax: with the SOP class and instance, all a C-STORE needs.
    transfer_syntax: str | None = None
    #: The clean output's size in bytes (None for other outcomes, and in older records).
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Deferred:
    """A study that failed again and again for a reason that repeats: not picked before
    ``next_try`` (UTC, ISO 8601). ``reason`` is the last one (no PHI)."""

    review_id: int
    failures: int
    next_try: str
    reason: str


@dataclass(frozen=True, slots=True)
class StudyStep:
    """When a study of a run entered a state (a :class:`StudyState` value) or passed a
    :class:`StepMark` (its ``value``), UTC, ISO 8601 to the millisecond: a row of
    ``study_steps``. A state written again (a resumed step) has a row each time."""

    review_id: int
    state: str
    at: str


@dataclass(frozen=True, slots=True)
class Flag:
    """A setting of the service that outlives it (table ``flags``): its value, and since when
    (UTC, ISO 8601)."""

    value: str
    since: str


class StateStore:
    """Async access to the state store; one connection, owned by the event loop's thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = await aiosqlite.connect(self.path)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=FULL")
        await self._db.executescript(_SCHEMA)
        for table, column, definition in _ADDED_COLUMNS:
            async with self._db.execute(f"PRAGMA table_info({table})") as cursor:
                present = {row["name"] for row in await cursor.fetchall()}
            if column not in present:
                await self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                if (table, column) == ("studies", "failure"):
                    for pattern, failure in _LEGACY_FAILURES:
                        await self._db.execute(
                            "UPDATE studies SET failure = ? WHERE failure IS NULL"
                            " AND state IN ('failed', 'failed-reported') AND reason LIKE ?",
                            (failure.name, pattern),
                        )
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("state store is not open")
        return self._db

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self.db.execute(sql, params)
        await self.db.commit()

    # -- runs ------------------------------------------------------------------------------

    async def add_run(self, name: str, path: Path, *, practice: bool, no_push: bool) -> None:
        await self._write(
            "INSERT INTO runs (name, path, state, practice, no_push, started) VALUES (?,?,?,?,?,?)",
            (name, str(path), RunState.SELECTING, int(practice), int(no_push), _now()),
        )

    async def set_run_state(self, name: str, state: RunState, error: str | None = None) -> None:
        finished = _now() if state.finished else None
        await self._write(
            "UPDATE runs SET state = ?, error = ?, finished = COALESCE(?, finished) WHERE name = ?",
            (state, error, finished, name),
        )

    async def runs(self) -> list[RunRecord]:
        async with self.db.execute("SELECT * FROM runs ORDER BY started, name") as cursor:
            rows = await cursor.fetchall()
        return [_run(row) for row in rows]

    async def run(self, name: str) -> RunRecord | None:
        async with self.db.execute("SELECT * FROM runs WHERE name = ?", (name,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _run(row)

    async def latest_run(self) -> RunRecord | None:
        """The newest run (one row read, whatever the history's length)."""
        async with self.db.execute(
            "SELECT * FROM runs ORDER BY started DESC, name DESC LIMIT 1"
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _run(row)

    async def recent_runs(self, limit: int) -> list[RunRecord]:
        """The newest *limit* runs, oldest first (status reads these, not the whole history)."""
        async with self.db.execute(
            "SELECT * FROM runs ORDER BY started DESC, name DESC LIMIT ?", (limit,)
        ) as cursor:
            rows = await cursor.fetchall()
        return [_run(row) for row in reversed(list(rows))]

    async def unfinished_run(self) -> RunRecord | None:
        """The newest run that is neither done nor failed (a crash or stop interrupted it).

        The scheduler asks at every poll: only that row is read, not every run ever made (the
        soak's 600 runs in 30 minutes were all loaded every 2 s, the cost growing with history).
        """
        async with self.db.execute(
            "SELECT * FROM runs WHERE state NOT IN ('done', 'failed')"  # RunState.finished
            " ORDER BY started DESC, name DESC LIMIT 1"
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _run(row)

    # -- studies ---------------------------------------------------------------------------

    async def add_studies(
        self, run: str, rows: Iterable[tuple[int, str, str, bool, StudyState, str | None]]
    ) -> None:
        """Insert (review_id, original uid, accession, protocol flag, state, reason) rows."""
        now, at = _now(), _stamp()
        rows = list(rows)
        await self.db.executemany(
            "INSERT INTO studies (run, review_id, original_study_uid, accession_no, "
            "has_protocol_series, state, reason, updated) VALUES (?,?,?,?,?,?,?,?)",
            [
                (run, rid, uid, acc, int(proto), state, reason, now)
                for rid, uid, acc, proto, state, reason in rows
            ],
        )
        await self.db.executemany(
            "INSERT INTO study_steps (run, review_id, state, at) VALUES (?,?,?,?)",
            [(run, rid, state, at) for rid, _uid, _acc, _proto, state, _reason in rows],
        )
        await self.db.commit()

    async def update_study(self, run: str, review_id: int, **columns: Any) -> None:
        """Set *columns* of one study (``failure`` takes a :class:`Failure` or None); a
        ``state`` is also recorded with its time in ``study_steps``, in the same commit."""
        if "failure" in columns:
            failure = columns["failure"]
            columns["failure"] = failure.name if failure is not None else None
        allowed = {
            "failure",
            "state",
            "reason",
            "expected",
            "landed",
            "clean",
            "quarantined",
            "pushed",
            "cleaned_study_uid",
            "duplicates",
            "notes",
        }
        unknown = set(columns) - allowed
        if unknown:
            raise ValueError(f"unknown study columns {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in columns)
        await self.db.execute(
            f"UPDATE studies SET {assignments}, updated = ? WHERE run = ? AND review_id = ?",
            (*columns.values(), _now(), run, review_id),
        )
        if "state" in columns:
            await self.db.execute(
                "INSERT INTO study_steps (run, review_id, state, at) VALUES (?,?,?,?)",
                (run, review_id, columns["state"], _stamp()),
            )
        await self.db.commit()

    async def mark_step(self, run: str, review_id: int, mark: StepMark) -> None:
        """Record that a study passed *mark* now. Not committed here: it goes with the study's
        next write (its files, its state), so a mark costs no sync of its own; one lost to a
        crash only leaves that part of the step untimed."""
        await self.db.execute(
            "INSERT INTO study_steps (run, review_id, state, at) VALUES (?,?,?,?)",
            (run, review_id, mark.value, _stamp()),
        )

    async def study_steps(self, run: str) -> list[StudyStep]:
        """Every state change and mark of the studies of *run*, in the order they were written
        (empty for a run recorded before ``study_steps`` existed)."""
        async with self.db.execute(
            "SELECT review_id, state, at FROM study_steps WHERE run = ? ORDER BY rowid", (run,)
        ) as cursor:
            rows = await cursor.fetchall()
        return [StudyStep(r["review_id"], r["state"], r["at"]) for r in rows]

    async def studies(self, run: str) -> list[StudyRecord]:
        async with self.db.execute(
            "SELECT * FROM studies WHERE run = ? ORDER BY review_id", (run,)
        ) as cursor:
            rows = await cursor.fetchall()
        return [_study(row) for row in rows]

    async def study(self, run: str, review_id: int) -> StudyRecord | None:
        async with self.db.execute(
            "SELECT * FROM studies WHERE run = ? AND review_id = ?", (run, review_id)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _study(row)

    # -- files -----------------------------------------------------------------------------

    async def add_files(self, run: str, records: Iterable[FileRecord]) -> None:
        """Record file outcomes (replacing a previous record of the same file), one commit."""
        await self.db.executemany(
            "INSERT OR REPLACE INTO files (run, review_id, name, status, output, reason, "
            "cleaned_study_uid, sop_instance_uid, modality, sop_class, series_uid, pushed, "
            "transfer_syntax, size) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    run,
                    r.review_id,
                    r.name,
                    r.status,
                    r.output,
                    r.reason,
                    r.cleaned_study_uid,
                    r.sop_instance_uid,
                    r.modality,
                    r.sop_class,
                    r.series_uid,
                    int(r.pushed),
                    r.transfer_syntax,
                    r.size,
                )
                for r in records
            ],
        )
        await self.db.commit()

    async def files(self, run: str, review_id: int | None = None) -> list[FileRecord]:
        sql = "SELECT * FROM files WHERE run = ?"
        params: tuple[Any, ...] = (run,)
        if review_id is not None:
            sql += " AND review_id = ?"
            params = (run, review_id)
        async with self.db.execute(sql + " ORDER BY review_id, name", params) as cursor:
            rows = await cursor.fetchall()
        return [_file(row) for row in rows]

    # -- back-off ----------------------------------------------------------------------------

    async def defer(self, review_id: int, reason: str, base: float, cap: float) -> Deferred:
        """Count one more failure of *review_id* and set when it is tried next: *base* seconds
        after the first failure, doubling each time, at most *cap*."""
        async with self.db.execute(
            "SELECT failures FROM backoff WHERE review_id = ?", (review_id,)
        ) as cursor:
            row = await cursor.fetchone()
        failures = (row["failures"] if row else 0) + 1
        wait = min(base * 2 ** (failures - 1), cap)
        next_try = (datetime.now(UTC) + timedelta(seconds=wait)).isoformat(timespec="seconds")
        await self._write(
            "INSERT OR REPLACE INTO backoff (review_id, failures, next_try, reason) "
            "VALUES (?,?,?,?)",
            (review_id, failures, next_try, reason),
        )
        return Deferred(review_id, failures, next_try, reason)

    async def clear_backoff(self, review_id: int) -> None:
        await self._write("DELETE FROM backoff WHERE review_id = ?", (review_id,))

    async def deferred(self) -> list[Deferred]:
        """The studies whose next try is still to come, by id."""
        now = _now()
        async with self.db.execute(
            "SELECT * FROM backoff WHERE next_try > ? ORDER BY review_id", (now,)
        ) as cursor:
            rows = await cursor.fetchall()
        return [Deferred(r["review_id"], r["failures"], r["next_try"], r["reason"]) for r in rows]

    # -- flags -----------------------------------------------------------------------------

    async def flag(self, name: str) -> Flag | None:
        """The flag *name*, or None when it is not set."""
        async with self.db.execute(
            "SELECT value, since FROM flags WHERE name = ?", (name,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else Flag(row["value"], row["since"])

    async def set_flag(self, name: str, value: str | None) -> Flag | None:
        """Set the flag *name* to *value* (kept with its time when the value is the same), or
        clear it with None; committed when this returns."""
        if value is None:
            await self._write("DELETE FROM flags WHERE name = ?", (name,))
            return None
        await self._write(
            "INSERT INTO flags (name, value, since) VALUES (?,?,?) ON CONFLICT(name) DO UPDATE"
            " SET value = excluded.value, since = excluded.since WHERE value != excluded.value",
            (name, value, _now()),
        )
        return await self.flag(name)

    async def mark_pushed(self, run: str, review_id: int, names: Iterable[str]) -> None:
        await self.db.executemany(
            "UPDATE files SET pushed = 1 WHERE run = ? AND review_id = ? AND name = ?",
            [(run, review_id, name) for name in names],
        )
        await self.db.commit()


def _run(row: Any) -> RunRecord:
    return RunRecord(
        row["name"],
        Path(row["path"]),
        RunState(row["state"]),
        bool(row["practice"]),
        bool(row["no_push"]),
        row["started"],
        row["finished"],
        row["error"],
    )


def _study(row: Any) -> StudyRecord:
    return StudyRecord(
        row["run"],
        row["review_id"],
        row["original_study_uid"],
        row["accession_no"],
        bool(row["has_protocol_series"]),
        StudyState(row["state"]),
        row["reason"],
        row["expected"],
        row["landed"],
        row["clean"],
        row["quarantined"],
        row["pushed"],
        row["cleaned_study_uid"],
        row["duplicates"],
        row["notes"],
        Failure[row["failure"]] if row["failure"] else None,
    )


def _file(row: Any) -> FileRecord:
    return FileRecord(
        row["review_id"],
        row["name"],
        row["status"],
        row["output"],
        row["reason"],
        row["cleaned_study_uid"],
        row["sop_instance_uid"],
        row["modality"],
        row["sop_class"],
        row["series_uid"],
        bool(row["pushed"]),
        row["transfer_syntax"],
        row["size"],
    )
