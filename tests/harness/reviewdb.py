"""SQLite review databases in the django-dicom-review schema.

anonpipe reads which studies reviewers approved from the database of the django-dicom-review web
application and writes the outcome back. Tests build that database here, table for table and
column for column as Django created it on SQLite (see ``reference/ORIGINALS.md``), so the service
is tested against the schema it meets in production, not against one of its own.

Examples
--------
>>> db = ReviewDB.create(tmp_path / "review.db")            # doctest: +SKIP
>>> approved = db.add_approved("2.25.1", "ACC1")             # doctest: +SKIP
>>> db.get_study(approved).image_published                   # doctest: +SKIP
False
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Self

__all__ = [
    "DEFAULT_PREFIX",
    "LEGACY_PREFIX",
    "REVIEW_COLUMNS",
    "STUDY_COLUMNS",
    "ReviewDB",
    "ReviewRow",
    "StudyRow",
]

#: Table prefix of the Django app label ``dicom_staging``.
DEFAULT_PREFIX = "dicom_staging_"
#: Prefix used by very old installs.
LEGACY_PREFIX = "staging_"

#: ``<prefix>radiologystudy`` as Django's SQLite backend declares it: (name, declaration).
STUDY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "integer NOT NULL PRIMARY KEY AUTOINCREMENT"),
    ("created", "datetime NOT NULL"),
    ("modified", "datetime NOT NULL"),
    ("original_study_uid", "varchar(64) NULL"),
    ("study_uid", "varchar(64) NULL"),
    ("accession_no", "varchar(20) NOT NULL"),
    ("study_date", "datetime NULL"),
    ("modality", "varchar(5) NULL"),
    ("sop_class", "varchar(30) NULL"),
    ("number_of_series", "integer NULL"),
    ("total_images", "integer NULL"),
    ("requested", "bool NOT NULL"),
    ("exclude", "bool NOT NULL"),
    ("image_published", "bool NOT NULL"),
    ("high_risk_flag", "bool NOT NULL"),
    ("pub_date", "datetime NULL"),
    ("processing_error", "bool NULL"),
    ("processing_error_date", "datetime NULL"),
    ("processing_error_msg", "varchar(400) NULL"),
    ("high_risk_message", "varchar(500) NULL"),
    ("impression", "text NULL"),
    # Foreign keys into the research database's patient and encounter tables (another
    # database, so no REFERENCES clause here).
    ("patient_id", "integer NOT NULL"),
    ("encounter_id", "integer NOT NULL"),
)

#: ``<prefix>radiologystudyreview``; ``{study_table}`` is replaced by the study table's name.
REVIEW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "integer NOT NULL PRIMARY KEY AUTOINCREMENT"),
    ("created", "datetime NOT NULL"),
    ("modified", "datetime NOT NULL"),
    (
        "study_id",
        'integer NOT NULL REFERENCES "{study_table}" ("id") DEFERRABLE INITIALLY DEFERRED',
    ),
    # The reviewer, a row of Django's auth_user (not part of this database).
    ("user_id", "integer NOT NULL"),
    ("has_phi", "bool NULL"),
    ("has_reconstruction", "bool NOT NULL"),
    ("has_protocol_series", "bool NOT NULL"),
    ("relevant", "bool NOT NULL"),
    ("exclude", "bool NOT NULL"),
    ("comment", "text NULL"),
)

_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _now() -> datetime:
    return datetime.now().replace(microsecond=0)


def _to_db(value: Any) -> Any:
    """Python -> SQLite the way Django stores it (datetimes as ``YYYY-MM-DD HH:MM:SS``)."""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, bool):
        return int(value)
    return value


def _from_db(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind.startswith("datetime"):
        return datetime.fromisoformat(str(value))
    if kind.startswith("bool"):
        return bool(value)
    return value


@dataclass(frozen=True)
class StudyRow:
    """One ``radiologystudy`` row, typed (bool columns as bool, datetimes as datetime)."""

    id: int
    created: datetime
    modified: datetime
    original_study_uid: str | None
    study_uid: str | None
    accession_no: str
    study_date: datetime | None
    modality: str | None
    sop_class: str | None
    number_of_series: int | None
    total_images: int | None
    requested: bool
    exclude: bool
    image_published: bool
    high_risk_flag: bool
    pub_date: datetime | None
    processing_error: bool | None
    processing_error_date: datetime | None
    processing_error_msg: str | None
    high_risk_message: str | None
    impression: str | None
    patient_id: int
    encounter_id: int


@dataclass(frozen=True)
class ReviewRow:
    """One ``radiologystudyreview`` row, typed."""

    id: int
    created: datetime
    modified: datetime
    study_id: int
    user_id: int
    has_phi: bool | None
    has_reconstruction: bool
    has_protocol_series: bool
    relevant: bool
    exclude: bool
    comment: str | None


_STUDY_KINDS = dict(STUDY_COLUMNS)
_REVIEW_KINDS = dict(REVIEW_COLUMNS)


class ReviewDB:
    """A django-dicom-review SQLite database that tests fill and inspect.

    Every method opens its own short connection and commits, so the file is never held open
    while the service under test reads or writes it.

    Parameters
    ----------
    path : Path
        The SQLite file.
    prefix : str, optional
        Table name prefix: :data:`DEFAULT_PREFIX` or :data:`LEGACY_PREFIX`.

    Attributes
    ----------
    study_table, review_table : str
        Full table names.
    """

    def __init__(self, path: Path | str, prefix: str = DEFAULT_PREFIX) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must be an SQL identifier like 'dicom_staging_': {prefix!r}")
        self.path = Path(path)
        self.prefix = prefix
        self.study_table = f"{prefix}radiologystudy"
        self.review_table = f"{prefix}radiologystudyreview"

    @classmethod
    def create(cls, path: Path | str, prefix: str = DEFAULT_PREFIX) -> Self:
        """Create the file (if needed) with both tables and Django's foreign-key indexes."""
        db = cls(path, prefix)
        db.create_schema()
        return db

    def schema_sql(self) -> list[str]:
        """The ``CREATE`` statements Django's migration would have run on SQLite."""
        study_cols = ", ".join(f'"{name}" {decl}' for name, decl in STUDY_COLUMNS)
        review_cols = ", ".join(
            f'"{name}" {decl.format(study_table=self.study_table)}' for name, decl in REVIEW_COLUMNS
        )
        return [
            f'CREATE TABLE "{self.study_table}" ({study_cols})',
            f'CREATE TABLE "{self.review_table}" ({review_cols})',
            f'CREATE INDEX "{self.study_table}_patient_id" ON "{self.study_table}" ("patient_id")',
            f'CREATE INDEX "{self.study_table}_encounter_id" '
            f'ON "{self.study_table}" ("encounter_id")',
            f'CREATE INDEX "{self.review_table}_study_id" ON "{self.review_table}" ("study_id")',
            f'CREATE INDEX "{self.review_table}_user_id" ON "{self.review_table}" ("user_id")',
        ]

    def create_schema(self) -> None:
        """Create both tables and their indexes in an empty database."""
        with self.connect() as conn:
            for statement in self.schema_sql():
                conn.execute(statement)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits on success, rolls back on error and is always closed."""
        with closing(sqlite3.connect(self.path)) as conn, conn:
            yield conn

    # ------------------------------------------------------------------ writing

    def add_study(
        self,
        original_study_uid: str | None,
        accession_no: str = "",
        *,
        requested: bool = False,
        exclude: bool = False,
        image_published: bool = False,
        high_risk_flag: bool = False,
        processing_error: bool | None = None,
        processing_error_msg: str | None = None,
        pub_date: datetime | None = None,
        study_date: datetime | None = None,
        patient_id: int = 1,
        encounter_id: int = 1,
        **columns: Any,
    ) -> int:
        """Insert a study row and return its id.

        Parameters
        ----------
        original_study_uid : str or None
            Study Instance UID on the staging PACS.
        accession_no : str, optional
            Accession number (``NOT NULL`` in the schema; empty by default).
        **columns
            Any other column of the table (``study_uid``, ``modality``, ``impression``, ...).

        Raises
        ------
        ValueError
            For a column the table does not have.
        """
        now = _now()
        values: dict[str, Any] = {
            "created": now,
            "modified": now,
            "original_study_uid": original_study_uid,
            "accession_no": accession_no,
            "study_date": study_date,
            "requested": requested,
            "exclude": exclude,
            "image_published": image_published,
            "high_risk_flag": high_risk_flag,
            "pub_date": pub_date,
            "processing_error": processing_error,
            "processing_error_msg": processing_error_msg,
            "patient_id": patient_id,
            "encounter_id": encounter_id,
            **columns,
        }
        return self._insert(self.study_table, _STUDY_KINDS, values)

    def add_review(
        self,
        study_id: int,
        *,
        has_phi: bool | None = False,
        has_reconstruction: bool = False,
        has_protocol_series: bool = False,
        relevant: bool = True,
        exclude: bool = False,
        comment: str | None = None,
        user_id: int = 1,
    ) -> int:
        """Insert a review of study `study_id` and return its id.

        The defaults describe an approving review: no PHI, no reconstruction, relevant.
        """
        now = _now()
        values: dict[str, Any] = {
            "created": now,
            "modified": now,
            "study_id": study_id,
            "user_id": user_id,
            "has_phi": has_phi,
            "has_reconstruction": has_reconstruction,
            "has_protocol_series": has_protocol_series,
            "relevant": relevant,
            "exclude": exclude,
            "comment": comment,
        }
        return self._insert(self.review_table, _REVIEW_KINDS, values)

    def update_study(self, study_id: int, **columns: Any) -> None:
        """Set columns of a study row (``modified`` is refreshed unless given)."""
        columns.setdefault("modified", _now())
        unknown = set(columns) - set(_STUDY_KINDS)
        if unknown:
            raise ValueError(f"{self.study_table} has no column(s) {sorted(unknown)}")
        assignments = ", ".join(f'"{name}" = ?' for name in columns)
        with self.connect() as conn:
            cursor = conn.execute(
                f'UPDATE "{self.study_table}" SET {assignments} WHERE id = ?',
                [*(_to_db(v) for v in columns.values()), study_id],
            )
            if cursor.rowcount != 1:
                raise KeyError(f"no study with id {study_id}")

    def _insert(self, table: str, kinds: dict[str, str], values: dict[str, Any]) -> int:
        unknown = set(values) - set(kinds)
        if unknown:
            raise ValueError(f"{table} has no column(s) {sorted(unknown)}")
        names = ", ".join(f'"{name}"' for name in values)
        marks = ", ".join("?" for _ in values)
        with self.connect() as conn:
            cursor = conn.execute(
                f'INSERT INTO "{table}" ({names}) VALUES ({marks})',
                [_to_db(v) for v in values.values()],
            )
            row_id = cursor.lastrowid
        if row_id is None:
            raise RuntimeError(f"INSERT into {table} returned no row id")
        return row_id

    # ------------------------------------------------------------------ typical cases

    def add_approved(
        self, original_study_uid: str, accession_no: str = "", *, comment: str | None = None
    ) -> int:
        """A study with one approving review: picked by a run."""
        study_id = self.add_study(original_study_uid, accession_no)
        self.add_review(study_id, comment=comment)
        return study_id

    def add_rejected_phi(
        self, original_study_uid: str, accession_no: str = "", *, comment: str | None = None
    ) -> int:
        """A study whose only review says PHI is burnt in (has_phi = 1): never picked."""
        study_id = self.add_study(original_study_uid, accession_no)
        self.add_review(study_id, has_phi=True, comment=comment or "burnt-in name")
        return study_id

    def add_not_relevant(self, original_study_uid: str, accession_no: str = "") -> int:
        """A study reviewed as not relevant to the project: never picked."""
        study_id = self.add_study(original_study_uid, accession_no)
        self.add_review(study_id, relevant=False, comment="not relevant")
        return study_id

    def add_reconstruction(self, original_study_uid: str, accession_no: str = "") -> int:
        """A study reviewed as containing a facial reconstruction: never picked."""
        study_id = self.add_study(original_study_uid, accession_no)
        self.add_review(study_id, has_reconstruction=True, comment="3D face")
        return study_id

    def add_conflicting(
        self, original_study_uid: str, accession_no: str = "", *, conflict: str = "has_phi"
    ) -> int:
        """A study with two reviews that disagree: one approves, the other sets `conflict`.

        Parameters
        ----------
        conflict : {"has_phi", "has_reconstruction", "exclude", "not_relevant"}, optional
            What the second reviewer (user 2) says.
        """
        second: dict[str, Any] = {
            "has_phi": {"has_phi": True},
            "has_reconstruction": {"has_reconstruction": True},
            "exclude": {"exclude": True},
            "not_relevant": {"relevant": False},
        }.get(conflict, {})
        if not second:
            raise ValueError(f"unknown conflict {conflict!r}")
        study_id = self.add_study(original_study_uid, accession_no)
        self.add_review(study_id, user_id=1, comment="looks fine")
        self.add_review(study_id, user_id=2, comment=f"disagree: {conflict}", **second)
        return study_id

    def add_excluded(
        self, original_study_uid: str, accession_no: str = "", *, by: str = "study"
    ) -> int:
        """An approved study that is excluded: never picked.

        Parameters
        ----------
        by : {"study", "review"}, optional
            Exclude with the study's own ``exclude`` column, or with a review whose ``exclude``
            is set (its other answers approving).
        """
        if by not in ("study", "review"):
            raise ValueError(f"by must be 'study' or 'review', got {by!r}")
        study_id = self.add_study(original_study_uid, accession_no, exclude=by == "study")
        self.add_review(study_id, exclude=by == "review", comment="excluded")
        return study_id

    def add_published(self, original_study_uid: str, accession_no: str = "") -> int:
        """An approved study already pushed (image_published = 1, pub_date set): never again."""
        study_id = self.add_study(
            original_study_uid, accession_no, image_published=True, pub_date=_now()
        )
        self.add_review(study_id)
        return study_id

    def add_processing_error(self, original_study_uid: str, accession_no: str = "") -> int:
        """An approved study that failed before (processing_error = 1): not picked again."""
        study_id = self.add_study(
            original_study_uid,
            accession_no,
            requested=True,
            processing_error=True,
            processing_error_msg="never found in the source PACS",
            processing_error_date=_now(),
        )
        self.add_review(study_id)
        return study_id

    # ------------------------------------------------------------------ reading

    def get_study(self, study_id: int) -> StudyRow:
        """The study row with id `study_id` (KeyError if absent)."""
        rows = self._select(self.study_table, "id = ?", (study_id,))
        if not rows:
            raise KeyError(f"no study with id {study_id}")
        return StudyRow(**_typed(rows[0], _STUDY_KINDS))

    def find_study(self, original_study_uid: str) -> StudyRow:
        """The study row with this original (staging) Study Instance UID (KeyError if absent)."""
        rows = self._select(self.study_table, "original_study_uid = ?", (original_study_uid,))
        if len(rows) != 1:
            raise KeyError(f"{len(rows)} studies with original_study_uid {original_study_uid}")
        return StudyRow(**_typed(rows[0], _STUDY_KINDS))

    def studies(self) -> list[StudyRow]:
        """All study rows, by id."""
        return [StudyRow(**_typed(r, _STUDY_KINDS)) for r in self._select(self.study_table)]

    def reviews(self, study_id: int | None = None) -> list[ReviewRow]:
        """Reviews of one study (or all), by id."""
        rows = (
            self._select(self.review_table)
            if study_id is None
            else self._select(self.review_table, "study_id = ?", (study_id,))
        )
        return [ReviewRow(**_typed(r, _REVIEW_KINDS)) for r in rows]

    def _select(
        self, table: str, where: str = "1", params: tuple[Any, ...] = ()
    ) -> list[sqlite3.Row]:
        with self.connect() as conn:
            conn.row_factory = sqlite3.Row
            return list(conn.execute(f'SELECT * FROM "{table}" WHERE {where} ORDER BY id', params))


def _typed(row: sqlite3.Row, kinds: dict[str, str]) -> dict[str, Any]:
    return {key: _from_db(row[key], kinds[key]) for key in row.keys()}  # noqa: SIM118


# Keep the row classes and column tables in step: a schema edit must update both.
if [f.name for f in fields(StudyRow)] != [n for n, _ in STUDY_COLUMNS] or [
    f.name for f in fields(ReviewRow)
] != [n for n, _ in REVIEW_COLUMNS]:
    raise ImportError("reviewdb: row dataclasses and column tables disagree")
