"""The django-dicom-review database: which studies reviewers approved, and the outcome written back.

The database belongs to the review web application. Reads open it read-only (``mode=ro``: no
journal-mode or schema change, not a byte written); writes set only the write-back columns and
``modified`` (as Django's ``auto_now`` would), in one short transaction that waits up to
:data:`BUSY_TIMEOUT` seconds for the web application's own writes.

A study is *eligible* when it is not excluded, not yet published, has no processing error, has an
original Study Instance UID, and at least one review approves it. An eligible study that another
review disagrees about is *held* for a human instead of picked (the old pipeline stopped the whole
run). The disagreements are the data in :data:`DISAGREEMENTS`; SQL and Python both derive from it.

Nothing here logs a UID, an accession number or a reviewer comment.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiosqlite

from anonpipe.logs import get_logger

__all__ = [
    "BUSY_TIMEOUT", "DISAGREEMENTS", "Candidate", "Held", "Review", "ReviewDatabase",
    "ReviewDatabaseError", "Selection", "conflict_reason",
]  # fmt: skip

_log = get_logger(__name__)

#: Seconds a connection waits for a lock held by the web application before giving up.
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

#: Columns this module reads or writes, per table (checked by :meth:`ReviewDatabase.check`).
_STUDY_COLUMNS: Final = (
    "id", "modified", "original_study_uid", "study_uid", "accession_no", "modality", "sop_class",
    "number_of_series", "total_images", "requested", "exclude", "image_published", "pub_date",
    "processing_error", "processing_error_date", "processing_error_msg",
)  # fmt: skip
_REVIEW_COLUMNS: Final = (
    "id", "study_id", "user_id", "has_phi", "has_reconstruction", "has_protocol_series",
    "relevant", "exclude", "comment",
)  # fmt: skip
#: Column widths (Django ``max_length``) of free values we write; longer values are cut to fit.
_WIDTHS: Final = {"modality": 5, "sop_class": 30, "processing_error_msg": 400}
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class ReviewDatabaseError(RuntimeError):
    """The review database is missing, unreadable, not the expected schema, or a write failed."""


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


def _db_datetime(when: datetime) -> str:
    """Django's SQLite text for a datetime: local time, ``YYYY-MM-DD HH:MM:SS``."""
    if when.tzinfo is not None:
        when = when.astimezone().replace(tzinfo=None)
    return when.isoformat(sep=" ", timespec="seconds")


def _review(row: Sequence[Any]) -> Review:
    """Columns as in :meth:`ReviewDatabase.select`: user_id, has_phi, four flags, comment."""
    user_id, has_phi, reconstruction, protocol, relevant, exclude, comment = row
    phi = None if has_phi is None else bool(has_phi)
    flags = (bool(reconstruction), bool(protocol), bool(relevant), bool(exclude))
    return Review(int(user_id), phi, *flags, comment)


class ReviewDatabase:
    """The review web application's SQLite database; every call opens its own short connection.

    Parameters
    ----------
    database : str or Path
        The SQLite file (``[review] database``). A ``postgresql://`` URL is not supported yet.
    table_prefix : str, optional
        Django table prefix (``[review] table_prefix``); very old installs used ``staging_``.
        ValueError unless it is an SQL identifier.
    """

    def __init__(self, database: str | Path, table_prefix: str = "dicom_staging_") -> None:
        if isinstance(database, str) and "://" in database:
            scheme = urlsplit(database).scheme  # never echo the URL: it may hold a password
            if scheme in ("postgresql", "postgres"):
                raise ReviewDatabaseError(
                    "a postgresql:// review database is not supported yet; "
                    "set [review] database to the SQLite file of django-dicom-review"
                )
            raise ReviewDatabaseError(
                f"review database URLs with scheme {scheme!r} are not supported; "
                "set [review] database to a SQLite file path"
            )
        if not _IDENTIFIER.match(table_prefix):
            raise ValueError(f"table_prefix must be an SQL identifier, got {table_prefix!r}")
        self.path = Path(database)
        self._warned_held: dict[int, str] = {}
        self.study_table = f"{table_prefix}radiologystudy"
        self.review_table = f"{table_prefix}radiologystudyreview"

    @asynccontextmanager
    async def _connect(self, *, readonly: bool) -> AsyncIterator[aiosqlite.Connection]:
        """A connection (``mode=ro`` or ``mode=rw``, never creating the file), errors mapped."""
        if not self.path.is_file():
            raise ReviewDatabaseError(
                f"review database {self.path} not found or not a file; check [review] database"
            )
        uri = f"{self.path.absolute().as_uri()}?mode={'ro' if readonly else 'rw'}"
        try:
            async with aiosqlite.connect(
                uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None
            ) as conn:
                yield conn
        except sqlite3.Error as exc:
            raise ReviewDatabaseError(f"review database {self.path}: {exc}") from exc

    async def _verify(self, conn: aiosqlite.Connection) -> None:
        tables = {self.study_table: _STUDY_COLUMNS, self.review_table: _REVIEW_COLUMNS}
        for table, needed in tables.items():
            rows = await conn.execute_fetchall("SELECT name FROM pragma_table_info(?)", (table,))
            have = {row[0] for row in rows}
            if not have:
                raise ReviewDatabaseError(
                    f"review database {self.path} has no table {table}; is it the "
                    "django-dicom-review database, and is [review] table_prefix right "
                    "(very old installs use 'staging_')?"
                )
            missing = [column for column in needed if column not in have]
            if missing:
                raise ReviewDatabaseError(
                    f"review database {self.path}: table {table} lacks column(s) "
                    f"{', '.join(missing)}; not the django-dicom-review schema anonpipe expects"
                )

    async def check(self) -> None:
        """Open the file read-only and verify both tables and the columns used, or raise
        :class:`ReviewDatabaseError` naming the file, and the table and columns that are missing.
        """
        async with self._connect(readonly=True) as conn:
            await self._verify(conn)

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
            :class:`ReviewDatabaseError` when the file cannot be read or has another schema.
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        approves = " AND ".join(f"a.{_quote(column)} IS NOT ?" for column, _, _ in DISAGREEMENTS)
        sql = f"""
            SELECT s.id, s.original_study_uid, s.accession_no, r.user_id, r.has_phi,
                   r.has_reconstruction, r.has_protocol_series, r.relevant, r.exclude, r.comment
            FROM {_quote(self.study_table)} AS s
            JOIN {_quote(self.review_table)} AS r ON r.study_id = s.id
            WHERE s.exclude = 0 AND s.image_published = 0 AND COALESCE(s.processing_error, 0) = 0
              AND TRIM(COALESCE(s.original_study_uid, '')) <> ''
              AND EXISTS (SELECT 1 FROM {_quote(self.review_table)} AS a
                          WHERE a.study_id = s.id AND {approves})
            ORDER BY s.id, r.id
        """
        async with self._connect(readonly=True) as conn:
            await self._verify(conn)
            rows = await conn.execute_fetchall(sql, [bad for _, bad, _ in DISAGREEMENTS])
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
            Publication time, also stored as ``modified`` (an aware time as local time).
        study_uid, number_of_series, total_images, modality, sop_class : optional
            The de-identified study's values; None leaves a column as it is. `modality` and
            `sop_class` are cut to their column widths (5 and 30).

        Raises
        ------
        ReviewDatabaseError
            When no study has that id, or the write fails.
        """
        stamp = _db_datetime(when)
        given = {
            "study_uid": study_uid,
            "number_of_series": number_of_series,
            "total_images": total_images,
            "modality": modality,
            "sop_class": sop_class,
        }
        values: dict[str, Any] = {
            "image_published": 1,
            "pub_date": stamp,
            "requested": 1,
            "processing_error": 0,
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
        stamp = _db_datetime(when)
        await self._update(
            study_id,
            {
                "processing_error": 1,
                "processing_error_date": stamp,
                "processing_error_msg": message,
                "requested": 1,
                "modified": stamp,
            },
        )
        _log.info("review_marked_failed", row_id=study_id)

    async def _update(self, study_id: int, values: dict[str, Any]) -> None:
        """Set `values` (strings cut to :data:`_WIDTHS`) on exactly one study row, or none."""
        assignments = ", ".join(f"{_quote(column)} = ?" for column in values)
        params = [v[: _WIDTHS[c]] if c in _WIDTHS and v else v for c, v in values.items()]
        sql = f"UPDATE {_quote(self.study_table)} SET {assignments} WHERE id = ?"
        async with self._connect(readonly=False) as conn:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = await conn.execute(sql, [*params, study_id])
                if cursor.rowcount != 1:
                    raise ReviewDatabaseError(
                        f"review database {self.path}: {cursor.rowcount} rows of "
                        f"{self.study_table} have id {study_id}, expected exactly 1"
                    )
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")
