"""The review database on SQLite (django-dicom-review's embedded default), through aiosqlite.

Reads open the file read-only (``mode=ro``: no journal-mode or schema change, not a byte
written); a write is ``BEGIN IMMEDIATE``, one UPDATE, ``COMMIT``, waiting up to
:data:`~.base.BUSY_TIMEOUT` seconds for the web application's own writes. The file is never
created. Datetimes are stored as Django's SQLite backend stores them: local time as
``YYYY-MM-DD HH:MM:SS`` text; booleans as 0/1 (sqlite3 stores Python booleans so).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from anonpipe.daemon.reviewdb.base import BUSY_TIMEOUT, ReviewDatabaseError

__all__ = ["SqliteBackend"]


class _SqliteSession:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def columns(self, table: str) -> set[str]:
        rows = await self._conn.execute_fetchall("SELECT name FROM pragma_table_info(?)", (table,))
        return {str(row[0]) for row in rows}

    async def fetch(self, query: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self._conn.execute_fetchall(query)]

    async def execute(self, statement: str, params: Sequence[Any]) -> int:
        cursor = await self._conn.execute(statement, params)
        return cursor.rowcount


class SqliteBackend:
    """A django-dicom-review SQLite file (``[review] database`` is a path)."""

    placeholder = "?"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[_SqliteSession]:
        """``mode=ro`` and no transaction for reads, ``BEGIN IMMEDIATE`` for writes."""
        if not self.path.is_file():
            raise ReviewDatabaseError(
                f"review database {self.path} not found or not a file; check [review] database"
            )
        uri = f"{self.path.absolute().as_uri()}?mode={'rw' if write else 'ro'}"
        try:
            async with aiosqlite.connect(
                uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None
            ) as conn:
                if not write:
                    yield _SqliteSession(conn)
                    return
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    yield _SqliteSession(conn)
                except BaseException:
                    await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise ReviewDatabaseError(f"review database {self.path}: {exc}") from exc

    def timestamp(self, when: datetime) -> str:
        """Django's SQLite text for a datetime: local time, ``YYYY-MM-DD HH:MM:SS``."""
        if when.tzinfo is not None:
            when = when.astimezone().replace(tzinfo=None)
        return when.isoformat(sep=" ", timespec="seconds")
