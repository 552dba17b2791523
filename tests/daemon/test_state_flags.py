"""The state store's flags (the operator's pause): kept across opens, added to an older state.db."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from anonpipe.daemon.state import PAUSED, Flag, StateStore

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
