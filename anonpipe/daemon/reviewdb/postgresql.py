"""The review database on PostgreSQL, through psycopg 3 (the driver Django itself uses).

Each call connects, runs one short transaction and disconnects: ``BEGIN``, the time limits,
``SET TRANSACTION READ ONLY`` for reads, the statements, ``COMMIT``. PostgreSQL readers never
block writers, and our one UPDATE holds a single row lock until its commit milliseconds later;
``lock_timeout`` (:data:`~.base.BUSY_TIMEOUT`), ``statement_timeout`` and
``idle_in_transaction_session_timeout`` bound every wait on either side, so the review web
application is never kept waiting by anonpipe. Prepared statements are off (safe behind
PgBouncer in transaction mode).

The password never comes from the configuration file: it is read from ``[review]
password_file`` at each connection (so a rotated password needs no restart), or else libpq finds
it as usual (``PGPASSWORD``, ``PGPASSFILE`` or ``~/.pgpass``). Error messages name the database
by its URL without any password and quote only PostgreSQL's primary message, never its
DETAIL (which can quote a row: identifiers of a patient).

Columns are what Django creates on PostgreSQL: ``boolean`` (psycopg sends Python booleans) and
``timestamp with time zone`` (an aware time is sent; a naive one is taken as local time).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import psycopg

from anonpipe.daemon.reviewdb.base import BUSY_TIMEOUT, ReviewDatabaseError

__all__ = ["PostgresqlBackend", "display_url"]

#: Seconds to wait for the server to accept a connection.
CONNECT_TIMEOUT: Final = 10
#: Milliseconds any one statement may take (a select of the eligible studies is far quicker).
_STATEMENT_TIMEOUT_MS: Final = 30_000
_LIMITS: Final = (
    "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true),"
    " set_config('idle_in_transaction_session_timeout', %s, true)"
)
_COLUMNS: Final = (
    "SELECT attname FROM pg_catalog.pg_attribute"
    " WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped"
)


def display_url(url: str) -> str:
    """`url` for messages: scheme, user, host, port and database; no password, no parameters."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    shown = f"{user}@{netloc[2]}" if netloc[1] else netloc[2]
    return urlunsplit((parts.scheme, shown, parts.path, "", ""))


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class _PostgresqlSession:
    def __init__(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        self._conn = conn

    async def columns(self, table: str) -> set[str]:
        cursor = await self._conn.execute(_COLUMNS, (_quote(table),))
        return {str(row[0]) for row in await cursor.fetchall()}

    async def fetch(self, query: str) -> list[tuple[Any, ...]]:
        cursor = await self._conn.execute(query)
        return await cursor.fetchall()

    async def execute(self, statement: str, params: Sequence[Any]) -> int:
        cursor = await self._conn.execute(statement, params)
        return cursor.rowcount


class PostgresqlBackend:
    """A django-dicom-review database on a PostgreSQL server (``[review] database`` is a
    ``postgresql://`` URL; ``password_file`` optional, see the module docstring)."""

    placeholder = "%s"

    def __init__(self, url: str, password_file: Path | None = None) -> None:
        self.url = url
        self.password_file = password_file
        self.name = display_url(url)

    def _password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            lines = self.password_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ReviewDatabaseError(
                f"review database {self.name}: cannot read [review] password_file "
                f"{self.password_file}: {reason}"
            ) from None
        if not lines or not lines[0]:
            raise ReviewDatabaseError(
                f"review database {self.name}: [review] password_file {self.password_file} is "
                "empty; write the password on its first line"
            )
        return lines[0]

    def _message(self, exc: psycopg.Error, password: str | None) -> str:
        """PostgreSQL's primary message (never DETAIL or the query), the password masked."""
        text = exc.diag.message_primary or str(exc).strip().splitlines()[0] or type(exc).__name__
        return text.replace(password, "***") if password else text

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[_PostgresqlSession]:
        """Connect, BEGIN (READ ONLY unless `write`), yield, COMMIT or ROLLBACK, disconnect."""
        password = self._password()
        extra: dict[str, Any] = {"password": password} if password is not None else {}
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=True,  # transactions are explicit: transaction() below
                prepare_threshold=None,
                connect_timeout=CONNECT_TIMEOUT,
                application_name="anonpipe",
                **extra,
            )
        except psycopg.Error as exc:
            raise ReviewDatabaseError(
                f"review database {self.name}: cannot connect: {self._message(exc, password)}"
            ) from None
        try:
            async with conn, conn.transaction():
                if not write:
                    await conn.execute("SET TRANSACTION READ ONLY")
                limits = (f"{int(BUSY_TIMEOUT * 1000)}ms", f"{_STATEMENT_TIMEOUT_MS}ms")
                await conn.execute(_LIMITS, (*limits, f"{_STATEMENT_TIMEOUT_MS}ms"))
                yield _PostgresqlSession(conn)
        except psycopg.Error as exc:
            raise ReviewDatabaseError(
                f"review database {self.name}: {self._message(exc, password)}"
            ) from None

    def timestamp(self, when: datetime) -> datetime:
        """An aware time for ``timestamp with time zone`` (a naive `when` is local time)."""
        return when if when.tzinfo is not None else when.astimezone()
