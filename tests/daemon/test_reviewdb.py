"""Tests for anonpipe.daemon.reviewdb on both backends: SQLite files and a real PostgreSQL
server, each with the schema Django's own migrations create (tests/harness/djangoschema.py).

Every test that takes ``review_db`` runs once per backend; the rest say which backend they are
about in their name.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from anonpipe.daemon.reviewdb import (
    Candidate,
    Review,
    ReviewDatabase,
    ReviewDatabaseError,
    Selection,
    review_database,
)
from tests.harness.ports import free_port
from tests.harness.postgres import PASSWORD_ROLE, PostgresServer
from tests.harness.reviewdb import LEGACY_PREFIX, ReviewDB

WHEN = datetime(2024, 5, 3, 15, 15, 7)
LONG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2.1.2.3.4.5"  # 35 characters: column holds 30
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def review_db(
    request: pytest.FixtureRequest, review_db_factory: Callable[..., ReviewDB]
) -> ReviewDB:
    """An empty review database, once on each backend."""
    db: ReviewDB = review_db_factory(request.param)
    return db


@pytest.fixture
def pg_db(review_db_factory: Callable[..., ReviewDB]) -> ReviewDB:
    """An empty review database on the PostgreSQL server."""
    db: ReviewDB = review_db_factory("postgresql")
    return db


def database(db: ReviewDB) -> ReviewDatabase:
    return review_database(db.database, db.prefix)


def select(db: ReviewDB, limit: int = 10) -> Selection:
    return asyncio.run(database(db).select(limit))


def picked_ids(selection: Selection) -> list[int]:
    return [candidate.id for candidate in selection.picked]


def held_ids(selection: Selection) -> list[int]:
    return [held.candidate.id for held in selection.held]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def journal_mode(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])


# -- selection ----------------------------------------------------------------------------------


def test_approved_study_is_picked(review_db: ReviewDB) -> None:
    study_id = review_db.add_approved("1.2.3.4", "ACC1", comment="fine")

    selection = select(review_db)

    assert selection.held == ()
    assert selection.picked == (
        Candidate(
            id=study_id,
            original_study_uid="1.2.3.4",
            accession_no="ACC1",
            reviews=(Review(1, False, False, False, True, False, "fine"),),
        ),
    )


NOT_ELIGIBLE: dict[str, Callable[[ReviewDB], int]] = {
    "rejected_phi": lambda db: db.add_rejected_phi("1.2.9"),
    "not_relevant": lambda db: db.add_not_relevant("1.2.9"),
    "reconstruction": lambda db: db.add_reconstruction("1.2.9"),
    "excluded_by_study": lambda db: db.add_excluded("1.2.9", by="study"),
    "excluded_by_review": lambda db: db.add_excluded("1.2.9", by="review"),
    "published": lambda db: db.add_published("1.2.9"),
    "processing_error": lambda db: db.add_processing_error("1.2.9"),
    "phi_unknown_only": lambda db: db.add_review(db.add_study("1.2.9"), has_phi=None),
    "no_review": lambda db: db.add_study("1.2.9"),
    "no_original_uid": lambda db: db.add_review(db.add_study(None)),
    "empty_original_uid": lambda db: db.add_review(db.add_study("  ")),
}


@pytest.mark.parametrize("build", NOT_ELIGIBLE.values(), ids=NOT_ELIGIBLE.keys())
def test_ineligible_study_is_neither_picked_nor_held(
    review_db: ReviewDB, build: Callable[[ReviewDB], int]
) -> None:
    build(review_db)
    approved = review_db.add_approved("1.2.10")

    selection = select(review_db)

    assert picked_ids(selection) == [approved]
    assert selection.held == ()


@pytest.mark.parametrize(
    ("conflict", "phrase"),
    [
        ("has_phi", "user 2 says PHI is burnt in"),
        ("has_reconstruction", "user 2 says it has a facial reconstruction"),
        ("exclude", "user 2 excludes it"),
        ("not_relevant", "user 2 says it is not relevant"),
    ],
)
def test_conflicting_reviews_hold_the_study(
    review_db: ReviewDB, conflict: str, phrase: str
) -> None:
    study_id = review_db.add_conflicting("1.2.3", conflict=conflict)

    selection = select(review_db)

    assert selection.picked == ()
    assert held_ids(selection) == [study_id]
    assert selection.held[0].reason == f"reviews conflict: {phrase}"


def test_unknown_phi_next_to_an_approving_review_holds_the_study(review_db: ReviewDB) -> None:
    study_id = review_db.add_approved("1.2.3")
    review_db.add_review(study_id, has_phi=None, user_id=4)

    selection = select(review_db)

    assert selection.picked == ()
    assert [h.reason for h in selection.held] == [
        "reviews conflict: user 4 cannot tell whether PHI is burnt in"
    ]


def test_reason_names_every_disagreeing_review_in_order(review_db: ReviewDB) -> None:
    study_id = review_db.add_approved("1.2.3")
    review_db.add_review(study_id, has_phi=True, relevant=False, user_id=2)
    review_db.add_review(study_id, exclude=True, user_id=3)

    (held,) = select(review_db).held

    assert held.reason == (
        "reviews conflict: user 2 says PHI is burnt in; user 2 says it is not relevant; "
        "user 3 excludes it"
    )
    assert [review.approves for review in held.candidate.reviews] == [True, False, False]


def test_limit_picks_lowest_ids_and_held_do_not_count(review_db: ReviewDB) -> None:
    first = review_db.add_approved("1.2.1")
    conflicting = review_db.add_conflicting("1.2.2")
    second = review_db.add_approved("1.2.3")
    review_db.add_approved("1.2.4")
    later_conflict = review_db.add_conflicting("1.2.5", conflict="exclude")

    selection = select(review_db, limit=2)

    assert picked_ids(selection) == [first, second]
    assert held_ids(selection) == [conflicting, later_conflict]
    assert picked_ids(select(review_db, limit=0)) == []


def test_comments_and_protocol_series_are_carried(review_db: ReviewDB) -> None:
    flagged = review_db.add_approved("1.2.1", comment="  first look  ")
    review_db.add_review(flagged, user_id=2, comment="")
    review_db.add_review(flagged, user_id=3, has_protocol_series=True, comment="protocol seen")
    plain = review_db.add_approved("1.2.2")

    first, second = select(review_db).picked

    assert (first.id, second.id) == (flagged, plain)
    assert first.comments == ("first look", "protocol seen")
    assert first.has_protocol_series
    assert second.comments == ()
    assert not second.has_protocol_series


def test_reads_write_nothing(review_db: ReviewDB) -> None:
    review_db.add_approved("1.2.1", comment="fine")
    review_db.add_conflicting("1.2.2")
    before = review_db.fingerprint()  # file bytes; on PostgreSQL every row and its xmin

    asyncio.run(database(review_db).check())
    assert len(select(review_db).picked) == 1

    assert review_db.fingerprint() == before


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_sqlite_select_leaves_the_file_and_its_journal_mode_untouched(
    tmp_path: Path, mode: str
) -> None:
    review_db = ReviewDB.create(tmp_path / "review.db")
    with sqlite3.connect(review_db.path) as conn:
        conn.execute(f"PRAGMA journal_mode={mode}")
    review_db.add_approved("1.2.1", comment="fine")
    review_db.add_conflicting("1.2.2")
    before = sha256(review_db.path)

    asyncio.run(database(review_db).check())
    assert len(select(review_db).picked) == 1

    assert sha256(review_db.path) == before
    assert journal_mode(review_db.path) == mode


@pytest.mark.parametrize("backend", BACKENDS)
def test_legacy_table_prefix(review_db_factory: Callable[..., ReviewDB], backend: str) -> None:
    db: ReviewDB = review_db_factory(backend, prefix=LEGACY_PREFIX)
    study_id = db.add_approved("1.2.3")

    asyncio.run(database(db).check())
    assert picked_ids(select(db)) == [study_id]
    with pytest.raises(ReviewDatabaseError, match="no table dicom_staging_radiologystudy"):
        asyncio.run(review_database(db.database).check())


def test_negative_limit_is_refused(review_db: ReviewDB) -> None:
    with pytest.raises(ValueError, match="limit"):
        select(review_db, limit=-1)


# -- write-back ---------------------------------------------------------------------------------


def test_mark_published_sets_exactly_the_write_back_columns(review_db: ReviewDB) -> None:
    study_id = review_db.add_processing_error("1.2.3", "ACC1")
    before = review_db.get_study(study_id)

    asyncio.run(
        database(review_db).mark_published(
            study_id,
            when=WHEN,
            study_uid="2.25.42",
            number_of_series=3,
            total_images=120,
            modality="CTMROT",
            sop_class=LONG_SOP_CLASS,
        )
    )

    assert review_db.get_study(study_id) == replace(
        before,
        modified=WHEN,
        image_published=True,
        pub_date=WHEN,
        requested=True,
        processing_error=False,
        processing_error_msg=None,
        processing_error_date=None,
        study_uid="2.25.42",
        number_of_series=3,
        total_images=120,
        modality="CTMRO",
        sop_class=LONG_SOP_CLASS[:30],
    )
    assert select(review_db).picked == ()


def test_mark_published_leaves_omitted_values_alone(review_db: ReviewDB) -> None:
    study_id = review_db.add_study("1.2.3", study_uid="2.25.7", modality="MR")
    review_db.add_review(study_id)
    when = WHEN.replace(microsecond=123456)

    asyncio.run(database(review_db).mark_published(study_id, when=when))

    row = review_db.get_study(study_id)
    assert (row.study_uid, row.modality, row.number_of_series) == ("2.25.7", "MR", None)
    with review_db.connect() as conn:
        stored = conn.execute(
            "SELECT pub_date, modified, image_published, processing_error "
            f'FROM "{review_db.study_table}"'
        ).fetchone()
    if review_db.postgresql:  # timestamp with time zone and boolean, as Django made them
        local = WHEN.astimezone()
        assert tuple(stored) == (local, local, True, False)
        assert all(value.tzinfo is not None for value in stored[:2])
    else:  # Django's SQLite text (local time) and 0/1
        assert stored == ("2024-05-03 15:15:07", "2024-05-03 15:15:07", 1, 0)


def test_an_aware_time_is_stored_as_the_same_instant(review_db: ReviewDB) -> None:
    study_id = review_db.add_approved("1.2.3")
    aware = WHEN.astimezone()

    asyncio.run(database(review_db).mark_failed(study_id, "gone", when=aware))

    row = review_db.get_study(study_id)
    assert row.processing_error_date == row.modified == WHEN  # read back as naive local time


def test_mark_failed_sets_the_error_and_truncates_the_message(review_db: ReviewDB) -> None:
    study_id = review_db.add_approved("1.2.3")
    before = review_db.get_study(study_id)
    message = "never found in the source PACS " * 20

    asyncio.run(database(review_db).mark_failed(study_id, message, when=WHEN))

    assert review_db.get_study(study_id) == replace(
        before,
        modified=WHEN,
        requested=True,
        processing_error=True,
        processing_error_date=WHEN,
        processing_error_msg=message[:400],
    )
    assert select(review_db).picked == ()


@pytest.mark.parametrize("write", ["published", "failed"])
def test_unknown_study_id_raises_and_changes_nothing(review_db: ReviewDB, write: str) -> None:
    review_db.add_approved("1.2.3")
    before = review_db.fingerprint()
    db = database(review_db)

    with pytest.raises(ReviewDatabaseError, match="id 999"):
        if write == "published":
            asyncio.run(db.mark_published(999, when=WHEN))
        else:
            asyncio.run(db.mark_failed(999, "gone", when=WHEN))
    assert review_db.fingerprint() == before


# -- errors -------------------------------------------------------------------------------------


def test_sqlite_missing_file_is_named_and_never_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    db = review_database(path)

    with pytest.raises(ReviewDatabaseError, match=r"absent\.db"):
        asyncio.run(db.check())
    with pytest.raises(ReviewDatabaseError, match=r"absent\.db"):
        asyncio.run(db.mark_failed(1, "gone", when=WHEN))
    assert not path.exists()


def test_missing_table_is_named(review_db: ReviewDB) -> None:
    review_db.execute(f'DROP TABLE "{review_db.review_table}"')
    name = re.escape(database(review_db).name)

    with pytest.raises(ReviewDatabaseError, match=rf"{name} has no table .*radiologystudyreview"):
        asyncio.run(database(review_db).check())
    with pytest.raises(ReviewDatabaseError, match="radiologystudyreview"):
        select(review_db)


def test_wrong_column_is_named(review_db: ReviewDB) -> None:
    review_db.execute(f'ALTER TABLE "{review_db.review_table}" RENAME COLUMN has_phi TO phi')

    with pytest.raises(
        ReviewDatabaseError,
        match=r"table dicom_staging_radiologystudyreview lacks column.* has_phi",
    ):
        asyncio.run(database(review_db).check())


def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not sqlite at all\n" * 100)

    with pytest.raises(ReviewDatabaseError, match=r"notes\.txt"):
        asyncio.run(review_database(path).check())


def test_good_database_passes_check(review_db: ReviewDB) -> None:
    asyncio.run(review_database(review_db.database).check())


@pytest.mark.parametrize("url", ["mysql://anon:s3cret@db/review", "sqlite:///tmp/review.db"])
def test_other_url_schemes_are_refused_without_echoing_the_url(url: str) -> None:
    with pytest.raises(ReviewDatabaseError, match="not supported") as caught:
        review_database(url)
    assert "s3cret" not in str(caught.value) and "db/review" not in str(caught.value)


def test_a_password_file_for_a_sqlite_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReviewDatabaseError, match="postgresql://"):
        review_database(tmp_path / "review.db", password_file=tmp_path / "pass")


def test_bad_table_prefix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="table_prefix"):
        review_database(tmp_path / "review.db", 'x"; DROP TABLE y; --')


# -- PostgreSQL: connection, password, privileges, concurrency -----------------------------------


def test_postgresql_schema_is_djangos_boolean_and_timestamptz(pg_db: ReviewDB) -> None:
    with pg_db.connect() as conn:
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = %s",
                (pg_db.study_table,),
            ).fetchall()
        )
    assert types["image_published"] == types["processing_error"] == "boolean"
    assert types["pub_date"] == types["modified"] == "timestamp with time zone"


def test_postgresql_server_that_does_not_answer_is_named_without_secrets(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    secret = tmp_path / "review.pass"
    secret.write_text("s3cret\n", encoding="utf-8")
    port = free_port()  # nothing listens there
    url = f"postgresql://anon@127.0.0.1:{port}/review"

    with pytest.raises(ReviewDatabaseError, match="cannot connect") as caught:
        asyncio.run(review_database(url, password_file=secret).check())
    assert f"postgresql://anon@127.0.0.1:{port}/review" in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.fixture
def password_role(postgres_server: PostgresServer, pg_db: ReviewDB) -> Iterator[str]:
    """:data:`PASSWORD_ROLE` with password "s3cret-pw"; the URL of `pg_db` as that role."""
    postgres_server.create_password_role("s3cret-pw")
    yield pg_db.database.replace("postgres@", f"{PASSWORD_ROLE}@", 1)


@pytest.mark.parametrize("source", ["password_file", "PGPASSWORD", "PGPASSFILE"])
def test_postgresql_password_from_a_file_or_the_environment(
    password_role: str,
    pg_db: ReviewDB,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    study_id = pg_db.add_approved("1.2.3")
    secret = tmp_path / "review.pass"
    password_file = None
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))  # not ~/.pgpass of whoever runs this
    if source == "password_file":
        secret.write_text("s3cret-pw\n", encoding="utf-8")
        password_file = secret
    elif source == "PGPASSWORD":
        monkeypatch.setenv("PGPASSWORD", "s3cret-pw")
    else:
        secret.write_text(f"127.0.0.1:*:*:{PASSWORD_ROLE}:s3cret-pw\n", encoding="utf-8")
        secret.chmod(0o600)
        monkeypatch.setenv("PGPASSFILE", str(secret))

    db = review_database(password_role, password_file=password_file)
    assert picked_ids(asyncio.run(db.select(10))) == [study_id]
    asyncio.run(db.mark_published(study_id, when=WHEN))
    assert pg_db.get_study(study_id).image_published


def test_postgresql_wrong_or_missing_password_is_a_clear_error(
    password_role: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not-it-at-all\n", encoding="utf-8")

    with pytest.raises(ReviewDatabaseError, match="password authentication failed") as caught:
        asyncio.run(review_database(password_role, password_file=wrong).check())
    assert "not-it-at-all" not in str(caught.value)
    with pytest.raises(ReviewDatabaseError, match=r"cannot connect.*password"):
        asyncio.run(review_database(password_role).check())
    empty = tmp_path / "empty.pass"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ReviewDatabaseError, match=r"password_file .*empty"):
        asyncio.run(review_database(password_role, password_file=empty).check())


def test_postgresql_password_and_identifiers_never_reach_the_log(
    password_role: str,
    pg_db: ReviewDB,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    log_output: io.StringIO,
) -> None:
    """At debug level, psycopg's own records included: a good run of every call and a refused
    connection log neither the password nor a UID, an accession number or a comment."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    secret, wrong = tmp_path / "review.pass", tmp_path / "wrong.pass"
    secret.write_text("s3cret-pw\n", encoding="utf-8")
    wrong.write_text("wr0ng-pw\n", encoding="utf-8")
    approved = pg_db.add_approved("2.25.4242", "ACC4242", comment="reviewer words")
    pg_db.add_conflicting("2.25.4343", "ACC4343")
    db = review_database(password_role, password_file=secret)

    asyncio.run(db.check())
    assert picked_ids(asyncio.run(db.select(10))) == [approved]
    asyncio.run(db.mark_published(approved, when=WHEN, study_uid="2.25.99"))
    with pytest.raises(ReviewDatabaseError):
        asyncio.run(review_database(password_role, password_file=wrong).check())

    logged = log_output.getvalue()
    assert "review_marked_published" in logged  # the log was captured
    for value in ("s3cret-pw", "wr0ng-pw", "2.25.4242", "2.25.4343", "ACC4242", "reviewer words"):
        assert value not in logged, value


def test_postgresql_needs_only_select_and_update_on_the_study_table(
    postgres_server: PostgresServer, pg_db: ReviewDB
) -> None:
    """The least privilege a site grants anonpipe (README): SELECT on both tables, UPDATE on
    the study table; reads run in READ ONLY transactions, the write touches one row."""
    role = "anonpipe_least"
    with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if not exists:
            conn.execute(f'CREATE ROLE "{role}" LOGIN')
    pg_db.execute(f'GRANT SELECT ON "{pg_db.review_table}" TO "{role}"')
    pg_db.execute(f'GRANT SELECT, UPDATE ON "{pg_db.study_table}" TO "{role}"')
    published = pg_db.add_approved("1.2.3")
    failed = pg_db.add_approved("1.2.4")
    db = review_database(pg_db.database.replace("postgres@", f"{role}@", 1))

    asyncio.run(db.check())
    assert picked_ids(asyncio.run(db.select(10))) == [published, failed]
    asyncio.run(db.mark_published(published, when=WHEN, modality="CT"))
    asyncio.run(db.mark_failed(failed, "never found in the source PACS", when=WHEN))

    assert pg_db.get_study(published).image_published
    assert pg_db.get_study(failed).processing_error
    pg_db.execute(f'REVOKE UPDATE ON "{pg_db.study_table}" FROM "{role}"')
    with pytest.raises(ReviewDatabaseError, match="permission denied") as caught:
        asyncio.run(db.mark_failed(published, "x", when=WHEN))
    assert "1.2.3" not in str(caught.value)


def test_postgresql_an_open_review_transaction_blocks_nothing(pg_db: ReviewDB) -> None:
    """The web application in the middle of a transaction (a review inserted, another study
    row locked, nothing committed yet): selection and write-back go on at once, and the review
    counts from its commit on."""
    waiting = pg_db.add_approved("1.2.1")
    busy = pg_db.add_approved("1.2.2")
    late = pg_db.add_study("1.2.3")
    db = database(pg_db)
    with psycopg.connect(pg_db.database) as app:
        app.execute(
            f'UPDATE "{pg_db.study_table}" SET impression = %s WHERE id = %s', ("edited", busy)
        )
        app.execute(
            f'INSERT INTO "{pg_db.review_table}" (created, modified, study_id, user_id, has_phi, '
            "has_reconstruction, has_protocol_series, relevant, exclude, comment) "
            "VALUES (now(), now(), %s, 5, false, false, false, true, false, 'ok')",
            (late,),
        )
        started = time.monotonic()
        assert picked_ids(asyncio.run(db.select(10))) == [waiting, busy]  # not yet committed
        asyncio.run(db.mark_published(waiting, when=WHEN))
        assert time.monotonic() - started < 2
    # The web application's transaction committed at the end of the block.
    assert picked_ids(asyncio.run(db.select(10))) == [busy, late]
    assert pg_db.get_study(busy).impression == "edited"
    assert pg_db.get_study(waiting).image_published


def test_postgresql_a_row_the_app_keeps_locked_times_out_instead_of_hanging(
    pg_db: ReviewDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("anonpipe.daemon.reviewdb.postgresql.BUSY_TIMEOUT", 0.5)
    study_id = pg_db.add_approved("1.2.1")
    db = database(pg_db)
    with psycopg.connect(pg_db.database) as app:
        app.execute(f'SELECT 1 FROM "{pg_db.study_table}" WHERE id = %s FOR UPDATE', (study_id,))
        started = time.monotonic()
        with pytest.raises(ReviewDatabaseError, match="lock timeout"):
            asyncio.run(db.mark_published(study_id, when=WHEN))
        assert time.monotonic() - started < 5
    asyncio.run(db.mark_published(study_id, when=WHEN))  # once the lock is gone it goes through
    assert pg_db.get_study(study_id).image_published


@pytest.mark.parametrize("backend", BACKENDS)
def test_reviews_written_during_selections_and_write_backs_are_never_lost(
    review_db_factory: Callable[..., ReviewDB], backend: str
) -> None:
    """Another connection adds studies and reviews while anonpipe selects and writes back in
    a loop: every write of theirs lands quickly, and every approved study is picked once."""
    db_rows: ReviewDB = review_db_factory(backend)
    db = database(db_rows)
    added: list[int] = []
    slowest = 0.0
    stop = threading.Event()

    def reviewer() -> None:
        nonlocal slowest
        n = 0
        while not stop.is_set() and n < 100:
            started = time.monotonic()
            added.append(db_rows.add_approved(f"2.25.{n}", comment=f"c{n}"))
            slowest = max(slowest, time.monotonic() - started)
            n += 1

    thread = threading.Thread(target=reviewer)
    thread.start()
    published: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while (thread.is_alive() or len(published) < len(added)) and time.monotonic() < deadline:
            for candidate in asyncio.run(db.select(5)).picked:
                assert candidate.id not in published
                asyncio.run(db.mark_published(candidate.id, when=WHEN))
                published.append(candidate.id)
    finally:
        stop.set()
        thread.join()
    assert sorted(published) == sorted(added) and len(added) == 100
    assert all(row.image_published for row in db_rows.studies())
    assert [r.comment for r in db_rows.reviews()] == [f"c{n}" for n in range(100)]
    assert slowest < 2.0, f"a reviewer's write waited {slowest:.1f} s"
