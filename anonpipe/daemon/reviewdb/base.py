"""The review database's rules and records, and the small interface each backend implements.

Everything that decides what anonpipe does with the django-dicom-review database lives here and
is the same on every backend: which studies are eligible, which are held for conflicting reviews
(:data:`DISAGREEMENTS`, data that both the SQL and the Python below derive from), and which
columns the write-back sets with which values. A backend (:class:`Backend`: one module per
database, :mod:`.sqlite` and :mod:`.postgresql` today, a MySQL one would be a third) only opens
short transactions, reads column names, runs the statements it is given and says how its
datetime columns store a time. The SQL here is portable on purpose: ``TRUE``/``FALSE``
literals, ``IS [NOT]``, ``NOT column`` and double-quoted identifiers mean the same on SQLite
(0/1 integers) and on PostgreSQL (real booleans), so no backend carries a copy of the rules.

Nothing here logs a UID, an accession number, a reviewer comment or a password.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from typing import Any, Final, Protocol

from anonpipe.logs import get_logger

__all__ = [
    "BUSY_TIMEOUT", "DISAGREEMENTS", "Backend", "Candidate", "Held", "Review", "ReviewDatabase",
    "ReviewDatabaseError", "ReviewSchemaError", "Selection", "Session", "conflict_reason",
]  # fmt: skip

_log = get_logger(__name__)

#: Seconds a statement waits for a lock held by the web application before giving up.
BUSY_TIMEOUT: Final = 10.0

#: What makes a review disagree: (review column, value, phrase for the operator). A review that
#: matches none of these approves the study.
DISAGREEMENTS: Final[tuple[tuple[str, bool | None, str], ...]] = (
    ("has_phi", True, "says PHI is burnt in"),
    ("has_phi", None, "cannot tell whether PHI is burnt in"),
    ("relevant", False, "says it is not relevant"),
    ("has_reconstruction", True, "says it has a facial reconstruction"),
    ("exclude", True, "excludes it"),
)

#: Columns this package reads or writes, per table (checked by :meth:`ReviewDatabase.check`).
STUDY_COLUMNS: Final = (
    "id", "modified", "original_study_uid", "study_uid", "accession_no", "modality", "sop_class",
    "number_of_series", "total_images", "requested", "exclude", "image_published", "pub_date",
    "processing_error", "processing_error_date", "processing_error_msg",
)  # fmt: skip
REVIEW_COLUMNS: Final = (
    "id", "study_id", "user_id", "has_phi", "has_reconstruction", "has_protocol_series",
    "relevant", "exclude", "comment",
)  # fmt: skip
#: Column widths (Django ``max_length``) of free values we write; longer values are cut to fit.
_WIDTHS: Final = {"modality": 5, "sop_class": 30, "processing_error_msg": 400}
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: SQL literals of the values in DISAGREEMENTS, the same on every backend.
_LITERAL: Final = {True: "TRUE", False: "FALSE", None: "NULL"}


class ReviewDatabaseError(RuntimeError):
    """The review database is missing, unreachable, not the expected schema, or a write failed."""


class ReviewSchemaError(ReviewDatabaseError):
    """The review database answered, but lacks a table or column anonpipe uses: the fix is the
    database or the table prefix named, not the connection."""


class Session(Protocol):
    """One open transaction of a backend (see :meth:`Backend.transaction`)."""

    async def columns(self, table: str) -> set[str]:
        """The column names of `table`; empty when there is no such table."""
        ...

    async def fetch(self, query: str) -> list[tuple[Any, ...]]:
        """The rows of a parameter-free SELECT."""
        ...

    async def execute(self, statement: str, params: Sequence[Any]) -> int:
        """Run one statement (markers: :attr:`Backend.placeholder`); return the row count."""
        ...


class Backend(Protocol):
    """A database that holds the django-dicom-review tables: the one part that differs.

    Contract of :meth:`transaction`: it opens its own connection (read-only unless `write`),
    and for a write a transaction that commits when the block ends normally and rolls back when
    it raises; it waits at most :data:`BUSY_TIMEOUT` for a lock and closes the connection at the
    end, so nothing is held between calls and the web application is never kept waiting.
    Driver errors leave it as :class:`ReviewDatabaseError` naming :attr:`name` and never quoting
    a row or a password; a :class:`ReviewDatabaseError` raised in the block passes through.
    """

    #: How messages name the database: the file, or the URL without any password.
    name: str
    #: The driver's parameter marker: ``?`` (sqlite3) or ``%s`` (psycopg).
    placeholder: str

    def transaction(self, *, write: bool) -> AbstractAsyncContextManager[Session]:
        """A short transaction (see the class docstring)."""
        ...

    def timestamp(self, when: datetime) -> Any:
        """`when` as this backend's datetime columns keep it (as Django stores it there)."""
        ...


@dataclass(frozen=True, slots=True)
class Review:
    """One reviewer's answers about a study (``radiologystudyreview`` row)."""

    user_id: int
    has_phi: bool | None  # None: the reviewer could not tell
    has_reconstruction: bool
    has_protocol_series: bool
    relevant: bool
    exclude: bool
    comment: str | None

    @property
    def objections(self) -> tuple[str, ...]:
        """The :data:`DISAGREEMENTS` phrases this review matches (empty if it approves)."""
        return tuple(
            phrase for column, bad, phrase in DISAGREEMENTS if getattr(self, column) is bad
        )

    @property
    def approves(self) -> bool:
        """No PHI, relevant, no reconstruction and not excluded."""
        return not self.objections


@dataclass(frozen=True, slots=True)
class Candidate:
    """An eligible study with its reviews (in review id order)."""

    id: int
    original_study_uid: str
    accession_no: str
    reviews: tuple[Review, ...]

    @property
    def has_protocol_series(self) -> bool:
        """Whether any reviewer saw a "Patient Protocol" series."""
        return any(review.has_protocol_series for review in self.reviews)

    @property
    def comments(self) -> tuple[str, ...]:
        """The non-empty reviewer comments, stripped, in review id order."""
        return tuple(r.comment.strip() for r in self.reviews if r.comment and r.comment.strip())


@dataclass(frozen=True, slots=True)
class Held:
    """An approved study held back because another review disagrees."""

    candidate: Candidate
    reason: str  # e.g. "reviews conflict: user 2 says PHI is burnt in; user 3 excludes it"


@dataclass(frozen=True, slots=True)
class Selection:
    """The result of :meth:`ReviewDatabase.select`: studies to process and studies held."""

    picked: tuple[Candidate, ...]
    held: tuple[Held, ...]


def conflict_reason(candidate: Candidate) -> str | None:
    """Every objection of every review of `candidate`, in review order; None if there are none."""
    parts = [f"user {r.user_id} {phrase}" for r in candidate.reviews for phrase in r.objections]
    return f"reviews conflict: {'; '.join(parts)}" if parts else None


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _review(row: Sequence[Any]) -> Review:
    """Columns as in :meth:`ReviewDatabase.select`: user_id, has_phi, four flags, comment."""
    user_id, has_phi, reconstruction, protocol, relevant, exclude, comment = row
    phi = None if has_phi is None else bool(has_phi)
    flags = (bool(reconstruction), bool(protocol), bool(relevant), bool(exclude))
    return Review(int(user_id), phi, *flags, comment)


class ReviewDatabase:
    """The review web application's database, on any :class:`Backend`.

    Every call is one short transaction on a connection of its own (:meth:`Backend.transaction`):
    reads are read-only, and writes set only the write-back columns and ``modified`` (as
    Django's ``auto_now`` would) of exactly one study row. Build one with
    :func:`anonpipe.daemon.reviewdb.review_database`, which picks the backend from ``[review]
    database``.

    Parameters
    ----------
    backend : Backend
        Where the tables are.
    table_prefix : str, optional
        Django table prefix (``[review] table_prefix``); very old installs used ``staging_``.
        ValueError unless it is an SQL identifier.
    """

    def __init__(self, backend: Backend, table_prefix: str = "dicom_staging_") -> None:
        if not _IDENTIFIER.match(table_prefix):
            raise ValueError(f"table_prefix must be an SQL identifier, got {table_prefix!r}")
        self.backend = backend
        self.study_table = f"{table_prefix}radiologystudy"
        self.review_table = f"{table_prefix}radiologystudyreview"
        self._warned_held: dict[int, str] = {}

    @property
    def name(self) -> str:
        """The database as messages name it (never with a password)."""
        return self.backend.name

    async def _verify(self, session: Session) -> None:
        tables = {self.study_table: STUDY_COLUMNS, self.review_table: REVIEW_COLUMNS}
        for table, needed in tables.items():
            have = await session.columns(table)
            if not have:
                raise ReviewSchemaError(
                    f"review database {self.name} has no table {table}; is it the "
                    "django-dicom-review database, and is [review] table_prefix right "
                    "(very old installs use 'staging_')?"
                )
            missing = [column for column in needed if column not in have]
            if missing:
                raise ReviewSchemaError(
                    f"review database {self.name}: table {table} lacks column(s) "
                    f"{', '.join(missing)}; not the django-dicom-review schema anonpipe expects"
                )

    async def check(self) -> None:
        """Open the database read-only and verify both tables and the columns used, or raise
        :class:`ReviewDatabaseError` naming the database, and the table and columns missing.
        """
        async with self.backend.transaction(write=False) as session:
            await self._verify(session)

    def _selection_sql(self) -> str:
        """Eligible studies (with every review, in id order) as one portable SELECT."""
        approves = " AND ".join(
            f"a.{_quote(column)} IS NOT {_LITERAL[bad]}" for column, bad, _ in DISAGREEMENTS
        )
        return f"""
            SELECT s.id, s.original_study_uid, s.accession_no, r.user_id, r.has_phi,
                   r.has_reconstruction, r.has_protocol_series, r.relevant, r.exclude, r.comment
            FROM {_quote(self.study_table)} AS s
            JOIN {_quote(self.review_table)} AS r ON r.study_id = s.id
            WHERE NOT s.exclude AND NOT s.image_published AND s.processing_error IS NOT TRUE
              AND TRIM(COALESCE(s.original_study_uid, '')) <> ''
              AND EXISTS (SELECT 1 FROM {_quote(self.review_table)} AS a
                          WHERE a.study_id = s.id AND {approves})
            ORDER BY s.id, r.id
        """

    async def select(self, limit: int, exclude: Collection[int] = ()) -> Selection:
        """The approved studies to process next, and those held for conflicting reviews.

        Parameters
        ----------
        limit : int
            At most this many studies are picked (held studies do not count); >= 0.
        exclude : collection of int
            Study ids not to pick now (waiting out their back-off); they do not count either.

        Returns
        -------
        Selection
            `picked`: up to `limit` eligible studies no review disagrees about, by ascending id;
            `held`: every eligible study some review disagrees about, by id.
            :class:`ReviewDatabaseError` when the database cannot be read or has another schema.
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        async with self.backend.transaction(write=False) as session:
            await self._verify(session)
            rows = await session.fetch(self._selection_sql())
        picked: list[Candidate] = []
        held: list[Held] = []
        for _, group in groupby(rows, key=lambda row: row[0]):
            study_rows = list(group)
            study_id, uid, accession = study_rows[0][:3]
            candidate = Candidate(
                id=int(study_id),
                original_study_uid=str(uid).strip(),
                accession_no=accession or "",
                reviews=tuple(_review(row[3:]) for row in study_rows),
            )
            reason = conflict_reason(candidate)
            if reason is not None:
                held.append(Held(candidate, reason))
                if self._warned_held.get(candidate.id) != reason:  # once per study and reason
                    self._warned_held[candidate.id] = reason
                    _log.warning("review_study_held", row_id=candidate.id, reason=reason)
            elif len(picked) < limit and candidate.id not in exclude:
                picked.append(candidate)
        if picked:
            _log.info("review_selection", picked=len(picked), held=len(held), limit=limit)
        return Selection(tuple(picked), tuple(held))

    async def mark_published(
        self,
        study_id: int,
        *,
        when: datetime,
        study_uid: str | None = None,
        number_of_series: int | None = None,
        total_images: int | None = None,
        modality: str | None = None,
        sop_class: str | None = None,
    ) -> None:
        """Record that study `study_id` reached the research PACS; clear any processing error.

        Parameters
        ----------
        study_id : int
            The ``radiologystudy`` row id (:attr:`Candidate.id`).
        when : datetime
            Publication time, also stored as ``modified`` (to the second; naive = local time).
        study_uid, number_of_series, total_images, modality, sop_class : optional
            The de-identified study's values; None leaves a column as it is. `modality` and
            `sop_class` are cut to their column widths (5 and 30).

        Raises
        ------
        ReviewDatabaseError
            When no study has that id, or the write fails.
        """
        stamp = self.backend.timestamp(when.replace(microsecond=0))
        given = {
            "study_uid": study_uid,
            "number_of_series": number_of_series,
            "total_images": total_images,
            "modality": modality,
            "sop_class": sop_class,
        }
        values: dict[str, Any] = {
            "image_published": True,
            "pub_date": stamp,
            "requested": True,
            "processing_error": False,
            "processing_error_msg": None,
            "processing_error_date": None,
            **{column: value for column, value in given.items() if value is not None},
            "modified": stamp,
        }
        await self._update(study_id, values)
        _log.info("review_marked_published", row_id=study_id)

    async def mark_failed(self, study_id: int, message: str, *, when: datetime) -> None:
        """Record that study `study_id` was requested but could not be processed.

        `message` (shown to reviewers, e.g. "never found in the source PACS") is cut to 400
        characters; `when` is also stored as ``modified``. Raises :class:`ReviewDatabaseError`
        like :meth:`mark_published`.
        """
        stamp = self.backend.timestamp(when.replace(microsecond=0))
        await self._update(
            study_id,
            {
                "processing_error": True,
                "processing_error_date": stamp,
                "processing_error_msg": message,
                "requested": True,
                "modified": stamp,
            },
        )
        _log.info("review_marked_failed", row_id=study_id)

    async def _update(self, study_id: int, values: dict[str, Any]) -> None:
        """Set `values` (strings cut to :data:`_WIDTHS`) on exactly one study row, or none.

        Booleans go to the driver as Python booleans: sqlite3 stores them as the 0/1 Django
        uses on SQLite, psycopg as PostgreSQL booleans.
        """
        mark = self.backend.placeholder
        assignments = ", ".join(f"{_quote(column)} = {mark}" for column in values)
        params = [v[: _WIDTHS[c]] if c in _WIDTHS and v else v for c, v in values.items()]
        sql = f"UPDATE {_quote(self.study_table)} SET {assignments} WHERE id = {mark}"
        async with self.backend.transaction(write=True) as session:
            count = await session.execute(sql, [*params, study_id])
            if count != 1:  # raised inside the transaction: rolled back
                raise ReviewDatabaseError(
                    f"review database {self.name}: {count} rows of {self.study_table} have id "
                    f"{study_id}, expected exactly 1"
                )
