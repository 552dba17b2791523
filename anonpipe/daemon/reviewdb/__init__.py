"""The django-dicom-review database: which studies reviewers approved, and the outcome written back.

The database belongs to the review web application. :class:`ReviewDatabase` holds the rules
(selection, held-back conflicts, write-back) once, in :mod:`.base`; a backend module per kind of
database does the I/O behind the small :class:`Backend` interface: :mod:`.sqlite` (a file path,
the embedded default) and :mod:`.postgresql` (a ``postgresql://`` URL). :func:`review_database`
picks one from ``[review] database``.

A study is *eligible* when it is not excluded, not yet published, has no processing error, has an
original Study Instance UID, and at least one review approves it. An eligible study that another
review disagrees about is *held* for a human instead of picked (the old pipeline stopped the whole
run). The disagreements are the data in :data:`DISAGREEMENTS`; SQL and Python both derive from it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from anonpipe.daemon.reviewdb.base import (
    BUSY_TIMEOUT,
    DISAGREEMENTS,
    Backend,
    Candidate,
    Held,
    Review,
    ReviewDatabase,
    ReviewDatabaseError,
    ReviewSchemaError,
    Selection,
    Session,
    conflict_reason,
)

__all__ = [
    "BUSY_TIMEOUT", "DISAGREEMENTS", "Backend", "Candidate", "Held", "Review", "ReviewDatabase",
    "ReviewDatabaseError", "ReviewSchemaError", "Selection", "Session", "conflict_reason",
    "review_database",
]  # fmt: skip

#: URL schemes of PostgreSQL, as libpq accepts them.
POSTGRESQL_SCHEMES = ("postgresql", "postgres")


def review_database(
    database: str | Path,
    table_prefix: str = "dicom_staging_",
    *,
    password_file: Path | None = None,
) -> ReviewDatabase:
    """The review database named by ``[review] database``, on the backend it calls for.

    Parameters
    ----------
    database : str or Path
        A SQLite file path, or a ``postgresql://`` (``postgres://``) URL.
    table_prefix : str, optional
        ``[review] table_prefix``.
    password_file : Path, optional
        ``[review] password_file``: PostgreSQL only; the password on its first line.

    Raises
    ------
    ReviewDatabaseError
        For a URL of another scheme (never echoed: it may hold a password), or a password file
        given for a SQLite file.
    """
    text = str(database)
    if "://" in text:
        scheme = urlsplit(text).scheme
        if scheme not in POSTGRESQL_SCHEMES:
            raise ReviewDatabaseError(
                f"review database URLs with scheme {scheme!r} are not supported; set [review] "
                "database to a SQLite file path or a postgresql:// URL"
            )
        from anonpipe.daemon.reviewdb.postgresql import PostgresqlBackend  # loads libpq

        return ReviewDatabase(PostgresqlBackend(text, password_file), table_prefix)
    if password_file is not None:
        raise ReviewDatabaseError(
            "[review] password_file is for a postgresql:// database; a SQLite file has none"
        )
    from anonpipe.daemon.reviewdb.sqlite import SqliteBackend

    return ReviewDatabase(SqliteBackend(database), table_prefix)
