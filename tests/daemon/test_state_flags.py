"""The state store's flags (the operator's pause) and its study step times (``study_steps``,
files' sizes): kept across opens, committed with the state they time, added to an older state.db."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from anonpipe.daemon.state import PAUSED, FileRecord, Flag, StateStore, StudyStep
from anonpipe.daemon.states import StepMark, StudyState

#: The tables of a state.db written before the flags existed (issue 12).
_OLDER_SCHEMA = """
CREATE TABLE runs (name TEXT PRIMARY KEY, path TEXT NOT NULL, state TEXT NOT NULL,
    practice INTEGER NOT NULL, no_push INTEGER NOT NULL, started TEXT NOT NULL, finished TEXT,
    error TEXT);
CREATE TABLE backoff (review_id INTEGER PRIMARY KEY, failures INTEGER NOT NULL,
    next_try TEXT NOT NULL, reason TEXT NOT NULL);
INSERT INTO runs VALUES ('run_at_1', '/x/run_at_1', 'done', 0, 0, '2026-01-01T00:00:00+00:00',
    '2026-01-01T00:01:00+00:00', NULL);
"""


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_an_older_state_db_gets_the_flags_table_and_keeps_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(_OLDER_SCHEMA)
    assert "flags" not in _tables(path)

    async def scenario() -> tuple[Flag | None, Flag | None, list[str]]:
        store = StateStore(path)
        await store.open()
        try:
            before = await store.flag(PAUSED)
            await store.set_flag(PAUSED, "operator")
            runs = [r.name for r in await store.runs()]
        finally:
            await store.close()
        store = StateStore(path)
        await store.open()
        try:
            return before, await store.flag(PAUSED), runs
        finally:
            await store.close()

    before, after, runs = asyncio.run(scenario())
    assert before is None and runs == ["run_at_1"]
    assert after is not None and after.value == "operator" and after.since
    assert "flags" in _tables(path)


def test_a_flag_keeps_its_time_until_it_changes_or_is_cleared(tmp_path: Path) -> None:
    async def scenario() -> tuple[Flag | None, Flag | None, Flag | None, Flag | None]:
        store = StateStore(tmp_path / "state.db")
        await store.open()
        try:
            first = await store.set_flag(PAUSED, "operator")
            with sqlite3.connect(store.path) as db:  # as if it had been set an hour ago
                db.execute("UPDATE flags SET since = '2026-01-01T00:00:00+00:00'")
            again = await store.set_flag(PAUSED, "operator")
            cleared = await store.set_flag(PAUSED, None)
            return first, again, cleared, await store.flag(PAUSED)
        finally:
            await store.close()

    first, again, cleared, gone = asyncio.run(scenario())
    assert first is not None and first.value == "operator"
    assert again == Flag("operator", "2026-01-01T00:00:00+00:00")  # paused twice: since the first
    assert cleared is None and gone is None


def _read(path: Path, sql: str) -> list[tuple[object, ...]]:
    """What another connection (``anonpipectl``, the web pages, a crash) sees: committed rows."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchall()


_STEPS = "SELECT review_id, state FROM study_steps ORDER BY rowid"
_STATE = "SELECT state FROM studies WHERE review_id = 1"


def _clean_file(name: str, size: int | None) -> FileRecord:
    return FileRecord(
        review_id=1,
        name=name,
        status="clean",
        output=f"/data/run_at_1/to_production/{name}",
        reason=None,
        cleaned_study_uid="2.25.7",
        sop_instance_uid=f"2.25.7.{name}",
        modality="CT",
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        series_uid="2.25.7.1",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=size,
    )


def _scenario(
    path: Path, body: Callable[[StateStore], Awaitable[None]] | None, *, with_study: bool = True
) -> None:
    """Open the store at *path* (with a run of two studies, the second held), run *body*."""

    async def scenario() -> None:
        store = StateStore(path)
        await store.open()
        try:
            if with_study:
                await store.add_run(
                    "run_at_1", path.parent / "run_at_1", practice=False, no_push=False
                )
                await store.add_studies(
                    "run_at_1",
                    [
                        (1, "1.2.3.1", "ACC1", False, StudyState.SELECTED, None),
                        (2, "1.2.3.2", "ACC2", False, StudyState.HELD, "conflicting reviews"),
                    ],
                )
            if body is not None:
                await body(store)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_state_change_is_timed_in_the_same_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    seen: list[tuple[str, list[tuple[object, ...]], list[tuple[object, ...]]]] = []

    async def body(store: StateStore) -> None:
        # The studies are added with a row each, in their first state.
        assert _read(path, _STEPS) == [(1, "selected"), (2, "held")]
        real_commit = store.db.commit

        async def commit() -> None:  # what another connection sees around each commit
            seen.append(("before", _read(path, _STATE), _read(path, _STEPS)))
            await real_commit()
            seen.append(("after", _read(path, _STATE), _read(path, _STEPS)))

        monkeypatch.setattr(store.db, "commit", commit)
        await store.update_study("run_at_1", 1, state=StudyState.PULLING)
        await store.update_study("run_at_1", 1, landed=3)  # no state: no step row
        await store.update_study("run_at_1", 1, state=StudyState.PULLING)  # a resumed pull

    before = datetime.now(UTC)
    _scenario(path, body)
    after = datetime.now(UTC)
    held, pulling = [(2, "held")], [(1, "pulling")]
    assert seen == [
        ("before", [("selected",)], [(1, "selected"), *held]),
        ("after", [("pulling",)], [(1, "selected"), *held, *pulling]),
        ("before", [("pulling",)], [(1, "selected"), *held, *pulling]),
        ("after", [("pulling",)], [(1, "selected"), *held, *pulling]),
        ("before", [("pulling",)], [(1, "selected"), *held, *pulling]),
        ("after", [("pulling",)], [(1, "selected"), *held, *pulling, *pulling]),
    ]
    times = [str(row[0]) for row in _read(path, "SELECT at FROM study_steps")]
    for at in times:  # UTC, to the millisecond
        moment = datetime.fromisoformat(at)
        assert moment.utcoffset() == timedelta(0)
        assert before.replace(microsecond=0) <= moment <= after
        assert len(at.split("T")[1].split("+")[0]) == len("10:00:00.000")
    assert times == sorted(times)


def test_a_mark_is_committed_with_the_studys_next_write(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    steps: list[StudyStep] = []

    async def body(store: StateStore) -> None:
        await store.update_study("run_at_1", 1, state=StudyState.PULLING)
        await store.mark_step("run_at_1", 1, StepMark.MOVED)
        # Not committed yet: a crash here loses the mark and nothing else.
        assert (1, "moved") not in _read(path, _STEPS)
        await store.add_files("run_at_1", [_clean_file("a", 1234)])
        assert _read(path, _STEPS)[-1] == (1, "moved")
        await store.update_study("run_at_1", 1, state=StudyState.DEIDENTIFIED)
        await store.update_study("run_at_1", 1, state=StudyState.PUSHING)
        await store.mark_step("run_at_1", 1, StepMark.VERIFYING)
        assert _read(path, _STEPS)[-1] == (1, "pushing")
        await store.update_study("run_at_1", 1, state=StudyState.VERIFIED)  # with the state
        steps.extend(await store.study_steps("run_at_1"))
        assert await store.study_steps("run_at_2") == []

    _scenario(path, body)
    assert [(s.review_id, s.state) for s in steps] == [
        (1, "selected"),
        (2, "held"),
        (1, "pulling"),
        (1, "moved"),
        (1, "deidentified"),
        (1, "pushing"),
        (1, "verifying"),
        (1, "verified"),
    ]
    assert [s.state for s in steps] == [
        str(row[1]) for row in _read(path, _STEPS)
    ]  # committed, in the order written
    assert all(datetime.fromisoformat(s.at).tzinfo is not None for s in steps)


def test_a_clean_files_size_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    files: list[FileRecord] = []

    async def body(store: StateStore) -> None:
        await store.add_files("run_at_1", [_clean_file("a", 1234), _clean_file("b", None)])
        await store.mark_pushed("run_at_1", 1, ["a", "b"])
        files.extend(await store.files("run_at_1"))

    _scenario(path, body)
    assert {(f.name, f.size, f.pushed) for f in files} == {("a", 1234, True), ("b", None, True)}


#: A state.db of the version before study step times: no ``files.size``, no ``study_steps``.
_BEFORE_STEPS_SCHEMA = """
CREATE TABLE runs (name TEXT PRIMARY KEY, path TEXT NOT NULL, state TEXT NOT NULL,
    practice INTEGER NOT NULL, no_push INTEGER NOT NULL, started TEXT NOT NULL, finished TEXT,
    error TEXT);
CREATE TABLE studies (run TEXT NOT NULL REFERENCES runs(name), review_id INTEGER NOT NULL,
    original_study_uid TEXT NOT NULL, accession_no TEXT NOT NULL,
    has_protocol_series INTEGER NOT NULL, state TEXT NOT NULL, reason TEXT, expected INTEGER,
    landed INTEGER NOT NULL DEFAULT 0, clean INTEGER NOT NULL DEFAULT 0,
    quarantined INTEGER NOT NULL DEFAULT 0, pushed INTEGER NOT NULL DEFAULT 0,
    cleaned_study_uid TEXT, updated TEXT NOT NULL, duplicates INTEGER NOT NULL DEFAULT 0,
    notes TEXT, failure TEXT, PRIMARY KEY (run, review_id));
CREATE TABLE files (run TEXT NOT NULL, review_id INTEGER NOT NULL, name TEXT NOT NULL,
    status TEXT NOT NULL, output TEXT, reason TEXT, cleaned_study_uid TEXT,
    sop_instance_uid TEXT, modality TEXT, sop_class TEXT, series_uid TEXT,
    pushed INTEGER NOT NULL DEFAULT 0, transfer_syntax TEXT,
    PRIMARY KEY (run, review_id, name));
CREATE TABLE backoff (review_id INTEGER PRIMARY KEY, failures INTEGER NOT NULL,
    next_try TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE flags (name TEXT PRIMARY KEY, value TEXT NOT NULL, since TEXT NOT NULL);
INSERT INTO runs VALUES ('run_at_0', '/x/run_at_0', 'done', 0, 0, '2026-01-01T00:00:00+00:00',
    '2026-01-01T00:01:00+00:00', NULL);
INSERT INTO studies (run, review_id, original_study_uid, accession_no, has_protocol_series,
    state, updated) VALUES ('run_at_0', 1, '1.2.3.1', 'ACC1', 0, 'published',
    '2026-01-01T00:01:00+00:00');
INSERT INTO files (run, review_id, name, status, output, pushed) VALUES
    ('run_at_0', 1, 'old.dcm', 'clean', '/x/run_at_0/to_production/old.dcm', 1);
"""


def _columns(path: Path, table: str) -> set[str]:
    return {str(row[1]) for row in _read(path, f"PRAGMA table_info({table})")}


def test_an_older_state_db_gets_file_sizes_and_study_steps_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(_BEFORE_STEPS_SCHEMA)
    assert "size" not in _columns(path, "files") and "study_steps" not in _tables(path)
    old: dict[str, object] = {}

    async def body(store: StateStore) -> None:
        (record,) = await store.files("run_at_0")
        old["file"] = record
        old["steps"] = await store.study_steps("run_at_0")
        await store.add_files("run_at_1", [_clean_file("a", 1234)])
        await store.update_study("run_at_1", 1, state=StudyState.PULLING)

    _scenario(path, body)
    assert "size" in _columns(path, "files") and "study_steps" in _tables(path)
    assert isinstance(old["file"], FileRecord)
    assert old["file"].name == "old.dcm" and old["file"].pushed and old["file"].size is None
    assert old["steps"] == []  # recorded before steps were: no times, and no error
    assert _read(path, "SELECT name, size FROM files ORDER BY name") == [
        ("a", 1234),
        ("old.dcm", None),
    ]
    assert _read(path, _STEPS) == [(1, "selected"), (2, "held"), (1, "pulling")]

    # Opened again: nothing is added twice, nothing is lost.
    _scenario(path, None, with_study=False)
    assert _read(path, "SELECT count(*) FROM study_steps") == [(3,)]
    assert _read(path, "SELECT name, size FROM files ORDER BY name")[0] == ("a", 1234)
