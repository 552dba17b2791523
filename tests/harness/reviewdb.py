"""Review databases in the django-dicom-review schema, on SQLite or on PostgreSQL.

anonpipe reads which studies reviewers approved from the database of the django-dicom-review web
application and writes the outcome back. Tests build that database here with Django's own
migrations (:mod:`tests.harness.djangoschema`, models mirroring django-dicom-models, see
``reference/ORIGINALS.md``), so the service is tested against the columns a site has on either
backend, not against a schema of its own. Each schema is migrated once per process (per table
prefix and server) into a template, then copied: a SQLite file byte for byte, a PostgreSQL
database with ``CREATE DATABASE ... TEMPLATE``.

Values go in and come out the way Django keeps them: on SQLite booleans as 0/1 and datetimes as
local ``YYYY-MM-DD HH:MM:SS`` text; on PostgreSQL ``boolean`` and ``timestamp with time zone``.
Rows read back are typed alike on both (bool, naive local datetime).

Examples
--------
>>> db = ReviewDB.create(tmp_path / "review.db")            # doctest: +SKIP
>>> db = ReviewDB.create_postgresql(postgres_server)          # doctest: +SKIP
>>> approved = db.add_approved("2.25.1", "ACC1")             # doctest: +SKIP
>>> db.get_study(approved).image_published                   # doctest: +SKIP
False
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

from tests.harness.djangoschema import migrate

if TYPE_CHECKING:
    from tests.harness.postgres import PostgresServer

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

#: ``<prefix>radiologystudy``: (column, kind) in the order Django creates them.
STUDY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "integer"),
    ("created", "datetime"),
    ("modified", "datetime"),
    ("original_study_uid", "varchar"),
    ("study_uid", "varchar"),
    ("accession_no", "varchar"),
    ("study_date", "datetime"),
    ("modality", "varchar"),
    ("sop_class", "varchar"),
    ("number_of_series", "integer"),
    ("total_images", "integer"),
    ("requested", "bool"),
    ("exclude", "bool"),
    ("image_published", "bool"),
    ("high_risk_flag", "bool"),
    ("pub_date", "datetime"),
    ("processing_error", "bool"),
    ("processing_error_date", "datetime"),
    ("processing_error_msg", "varchar"),
    ("high_risk_message", "varchar"),
    ("impression", "text"),
    # Foreign keys into the research database's patient and encounter tables (another
    # database, so plain indexed integers).
    ("patient_id", "integer"),
    ("encounter_id", "integer"),
)

#: ``<prefix>radiologystudyreview``, in the order Django creates them (the foreign key last).
REVIEW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "integer"),
    ("created", "datetime"),
    ("modified", "datetime"),
    # The reviewer, a row of Django's auth_user (not part of this database).
    ("user_id", "integer"),
    ("has_phi", "bool"),
    ("has_reconstruction", "bool"),
    ("has_protocol_series", "bool"),
    ("relevant", "bool"),
    ("exclude", "bool"),
    ("comment", "text"),
    ("study_id", "integer"),
)

_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _now() -> datetime:
    return datetime.now().replace(microsecond=0)


def _to_db(value: Any, postgresql: bool) -> Any:
    """Python -> the column as Django stores it on the backend."""
    if isinstance(value, datetime):
        if postgresql:  # timestamp with time zone: a naive time is local time
            return value if value.tzinfo else value.astimezone()
        return value.isoformat(sep=" ")
    if isinstance(value, bool) and not postgresql:
        return int(value)
    return value


def _from_db(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "datetime":
        if isinstance(value, datetime):  # PostgreSQL: aware; shown as naive local time
            return value.astimezone().replace(tzinfo=None)
        return datetime.fromisoformat(str(value))
    if kind == "bool":
        return bool(value)
    return value


@dataclass(frozen=True)
class StudyRow:
    """One ``radiologystudy`` row, typed (bool columns as bool, datetimes as naive local)."""

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
    user_id: int
    has_phi: bool | None
    has_reconstruction: bool
    has_protocol_series: bool
    relevant: bool
    exclude: bool
    comment: str | None
    study_id: int


_STUDY_KINDS = dict(STUDY_COLUMNS)
_REVIEW_KINDS = dict(REVIEW_COLUMNS)

# Migrated templates: SQLite file bytes per table prefix; PostgreSQL template databases per
# (server, prefix).
_sqlite_templates: dict[str, bytes] = {}
_postgresql_templates: dict[tuple[Path, str], str] = {}


def _rename_tables(db: ReviewDB) -> None:
    """Give Django's ``dicom_staging_`` tables `db`'s prefix (the legacy ``staging_``)."""
    if db.prefix != DEFAULT_PREFIX:
        for suffix in ("radiologystudy", "radiologystudyreview"):
            db.execute(f'ALTER TABLE "{DEFAULT_PREFIX}{suffix}" RENAME TO "{db.prefix}{suffix}"')


def _sqlite_template(prefix: str) -> bytes:
    """The bytes of a freshly migrated SQLite file (kept in memory: nothing left on disk)."""
    if prefix not in _sqlite_templates:
        with tempfile.TemporaryDirectory(prefix="anonpipe-review-template-") as folder:
            path = Path(folder) / "review.db"
            migrate(path)
            _rename_tables(ReviewDB(path, prefix))
            _sqlite_templates[prefix] = path.read_bytes()
    return _sqlite_templates[prefix]


def _postgresql_template(server: PostgresServer, prefix: str) -> str:
    key = (server.root, prefix)  # a folder of its own per server, never reused
    if key not in _postgresql_templates:
        name = server.create_database("review_template")
        migrate(server.url(name))
        _rename_tables(ReviewDB(server.url(name), prefix))
        _postgresql_templates[key] = name
    return _postgresql_templates[key]


class ReviewDB:
    """A django-dicom-review database, SQLite or PostgreSQL, that tests fill and inspect.

    Every method opens its own short connection and commits, so the database is never held
    open while the service under test reads or writes it.

    Parameters
    ----------
    database : Path or str
        The SQLite file, or a ``postgresql://`` URL (no password: the test server trusts).
    prefix : str, optional
        Table name prefix: :data:`DEFAULT_PREFIX` or :data:`LEGACY_PREFIX`.

    Attributes
    ----------
    database : str
        What ``[review] database`` says for it: the file's path or the URL.
    study_table, review_table : str
        Full table names.
    """

    def __init__(self, database: Path | str, prefix: str = DEFAULT_PREFIX) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must be an SQL identifier like 'dicom_staging_': {prefix!r}")
        self.database = str(database)
        self.postgresql = "://" in self.database
        self.prefix = prefix
        self.study_table = f"{prefix}radiologystudy"
        self.review_table = f"{prefix}radiologystudyreview"
        self._mark = "%s" if self.postgresql else "?"
        #: The server a PostgreSQL database was created on (for :meth:`drop`).
        self.server: PostgresServer | None = None

    @property
    def backend(self) -> str:
        """``"postgresql"`` or ``"sqlite"``."""
        return "postgresql" if self.postgresql else "sqlite"

    @property
    def path(self) -> Path:
        """The SQLite file (TypeError for a PostgreSQL database: it has no file)."""
        if self.postgresql:
            raise TypeError("a PostgreSQL review database has no file; use fingerprint()")
        return Path(self.database)

    @classmethod
    def create(cls, path: Path | str, prefix: str = DEFAULT_PREFIX) -> Self:
        """A new SQLite file with the tables Django's migration creates (a copy of a migrated
        template; an existing file is migrated in place)."""
        db = cls(path, prefix)
        if Path(path).exists():
            migrate(path)
            _rename_tables(db)
        else:
            Path(path).write_bytes(_sqlite_template(prefix))
        return db

    @classmethod
    def create_postgresql(cls, server: PostgresServer, prefix: str = DEFAULT_PREFIX) -> Self:
        """A new database on `server` with the tables Django's migration creates."""
        name = server.create_database("review", template=_postgresql_template(server, prefix))
        db = cls(server.url(name), prefix)
        db.server = server
        return db

    def drop(self) -> None:
        """Remove the database: the file, or the PostgreSQL database (if created here)."""
        if not self.postgresql:
            self.path.unlink(missing_ok=True)
        elif self.server is not None:
            self.server.drop_database(urlsplit(self.database).path.lstrip("/"))

    @contextmanager
    def connect(self) -> Iterator[Any]:
        """A DB-API connection (sqlite3 or psycopg) that commits on success, rolls back on
        error and is always closed."""
        if self.postgresql:
            import psycopg

            with psycopg.connect(self.database) as pg:
                yield pg
        else:
            with closing(sqlite3.connect(self.database)) as lite, lite:
                yield lite

    def execute(self, statement: str) -> None:
        """Run one statement in its own transaction (to break the schema in a test, say)."""
        with self.connect() as conn:
            conn.execute(statement)

    def fingerprint(self) -> str:
        """A digest that changes with any write: the file's bytes (SQLite), or every row with
        its row version ``xmin`` (PostgreSQL: an UPDATE that changes no value still shows)."""
        if not self.postgresql:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        digest = hashlib.sha256()
        with self.connect() as conn:
            for table in (self.study_table, self.review_table):
                for row in conn.execute(f'SELECT xmin, * FROM "{table}" ORDER BY id'):
                    digest.update(repr(row).encode())
        return digest.hexdigest()

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
        assignments = ", ".join(f'"{name}" = {self._mark}' for name in columns)
        with self.connect() as conn:
            cursor = conn.execute(
                f'UPDATE "{self.study_table}" SET {assignments} WHERE id = {self._mark}',
                [*(_to_db(v, self.postgresql) for v in columns.values()), study_id],
            )
            if cursor.rowcount != 1:
                raise KeyError(f"no study with id {study_id}")

    def _insert(self, table: str, kinds: dict[str, str], values: dict[str, Any]) -> int:
        unknown = set(values) - set(kinds)
        if unknown:
            raise ValueError(f"{table} has no column(s) {sorted(unknown)}")
        names = ", ".join(f'"{name}"' for name in values)
        marks = ", ".join(self._mark for _ in values)
        with self.connect() as conn:
            row = conn.execute(
                f'INSERT INTO "{table}" ({names}) VALUES ({marks}) RETURNING id',
                [_to_db(v, self.postgresql) for v in values.values()],
            ).fetchone()
        if row is None:
            raise RuntimeError(f"INSERT into {table} returned no row id")
        return int(row[0])

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
        rows = self._select(self.study_table, "id", study_id)
        if not rows:
            raise KeyError(f"no study with id {study_id}")
        return StudyRow(**_typed(rows[0], _STUDY_KINDS))

    def find_study(self, original_study_uid: str) -> StudyRow:
        """The study row with this original (staging) Study Instance UID (KeyError if absent)."""
        rows = self._select(self.study_table, "original_study_uid", original_study_uid)
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
            else self._select(self.review_table, "study_id", study_id)
        )
        return [ReviewRow(**_typed(r, _REVIEW_KINDS)) for r in rows]

    def _select(
        self, table: str, column: str | None = None, value: Any = None
    ) -> list[dict[str, Any]]:
        """Rows of `table` (those whose `column` equals `value`, if given) by id, as dicts."""
        where = f'WHERE "{column}" = {self._mark}' if column else ""
        with self.connect() as conn:
            cursor = conn.execute(
                f'SELECT * FROM "{table}" {where} ORDER BY id', [value] if column else []
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _typed(row: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    return {key: _from_db(value, kinds[key]) for key, value in row.items()}


# Keep the row classes and column tables in step: a schema edit must update both.
if [f.name for f in fields(StudyRow)] != [n for n, _ in STUDY_COLUMNS] or [
    f.name for f in fields(ReviewRow)
] != [n for n, _ in REVIEW_COLUMNS]:
    raise ImportError("reviewdb: row dataclasses and column tables disagree")
