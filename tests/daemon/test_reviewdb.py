"""Tests for anonpipe.daemon.reviewdb on real SQLite files in the django-dicom-review schema."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from anonpipe.daemon.reviewdb import (
    Candidate,
    Review,
    ReviewDatabase,
    ReviewDatabaseError,
    Selection,
)
from tests.harness.reviewdb import LEGACY_PREFIX, ReviewDB

WHEN = datetime(2024, 5, 3, 15, 15, 7)
LONG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2.1.2.3.4.5"  # 35 characters: column holds 30


def select(db: ReviewDB, limit: int = 10) -> Selection:
    return asyncio.run(ReviewDatabase(db.path, db.prefix).select(limit))


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


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_select_leaves_the_file_untouched(review_db: ReviewDB, mode: str) -> None:
    with sqlite3.connect(review_db.path) as conn:
        conn.execute(f"PRAGMA journal_mode={mode}")
    review_db.add_approved("1.2.1", comment="fine")
    review_db.add_conflicting("1.2.2")
    before = sha256(review_db.path)

    database = ReviewDatabase(review_db.path)
    asyncio.run(database.check())
    assert len(select(review_db).picked) == 1

    assert sha256(review_db.path) == before
    assert journal_mode(review_db.path) == mode


def test_legacy_table_prefix(tmp_path: Path) -> None:
    db = ReviewDB.create(tmp_path / "old.db", prefix=LEGACY_PREFIX)
    study_id = db.add_approved("1.2.3")

    asyncio.run(ReviewDatabase(db.path, LEGACY_PREFIX).check())
    assert picked_ids(select(db)) == [study_id]
    with pytest.raises(ReviewDatabaseError, match="no table dicom_staging_radiologystudy"):
        asyncio.run(ReviewDatabase(db.path).check())


def test_negative_limit_is_refused(review_db: ReviewDB) -> None:
    with pytest.raises(ValueError, match="limit"):
        select(review_db, limit=-1)


# -- write-back ---------------------------------------------------------------------------------


def test_mark_published_sets_exactly_the_write_back_columns(review_db: ReviewDB) -> None:
    study_id = review_db.add_processing_error("1.2.3", "ACC1")
    before = review_db.get_study(study_id)

    asyncio.run(
        ReviewDatabase(review_db.path).mark_published(
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

    asyncio.run(ReviewDatabase(review_db.path).mark_published(study_id, when=when))

    row = review_db.get_study(study_id)
    assert (row.study_uid, row.modality, row.number_of_series) == ("2.25.7", "MR", None)
    with sqlite3.connect(review_db.path) as conn:
        stored = conn.execute(
            f'SELECT pub_date, modified, image_published FROM "{review_db.study_table}"'
        ).fetchone()
    assert stored == ("2024-05-03 15:15:07", "2024-05-03 15:15:07", 1)


def test_mark_failed_sets_the_error_and_truncates_the_message(review_db: ReviewDB) -> None:
    study_id = review_db.add_approved("1.2.3")
    before = review_db.get_study(study_id)
    message = "never found in the source PACS " * 20

    asyncio.run(ReviewDatabase(review_db.path).mark_failed(study_id, message, when=WHEN))

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
    before = sha256(review_db.path)
    database = ReviewDatabase(review_db.path)

    with pytest.raises(ReviewDatabaseError, match="id 999"):
        if write == "published":
            asyncio.run(database.mark_published(999, when=WHEN))
        else:
            asyncio.run(database.mark_failed(999, "gone", when=WHEN))
    assert sha256(review_db.path) == before


# -- errors -------------------------------------------------------------------------------------


def test_missing_file_is_named_and_never_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    database = ReviewDatabase(path)

    with pytest.raises(ReviewDatabaseError, match=r"absent\.db"):
        asyncio.run(database.check())
    with pytest.raises(ReviewDatabaseError, match=r"absent\.db"):
        asyncio.run(database.mark_failed(1, "gone", when=WHEN))
    assert not path.exists()


def test_missing_table_is_named(review_db: ReviewDB) -> None:
    with sqlite3.connect(review_db.path) as conn:
        conn.execute(f'DROP TABLE "{review_db.review_table}"')

    with pytest.raises(
        ReviewDatabaseError, match=r"review\.db has no table .*radiologystudyreview"
    ):
        asyncio.run(ReviewDatabase(review_db.path).check())
    with pytest.raises(ReviewDatabaseError, match="radiologystudyreview"):
        select(review_db)


def test_wrong_column_is_named(review_db: ReviewDB) -> None:
    with sqlite3.connect(review_db.path) as conn:
        conn.execute(f'ALTER TABLE "{review_db.review_table}" RENAME COLUMN has_phi TO phi')

    with pytest.raises(
        ReviewDatabaseError,
        match=r"table dicom_staging_radiologystudyreview lacks column.* has_phi",
    ):
        asyncio.run(ReviewDatabase(review_db.path).check())


def test_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not sqlite at all\n" * 100)

    with pytest.raises(ReviewDatabaseError, match=r"notes\.txt"):
        asyncio.run(ReviewDatabase(path).check())


def test_good_database_passes_check(review_db: ReviewDB) -> None:
    asyncio.run(ReviewDatabase(str(review_db.path)).check())


@pytest.mark.parametrize("url", ["postgresql://anon:s3cret@db/review", "postgres://db/review"])
def test_postgresql_url_is_not_supported_yet(url: str) -> None:
    with pytest.raises(ReviewDatabaseError, match="not supported yet") as caught:
        ReviewDatabase(url)
    assert "s3cret" not in str(caught.value)


def test_bad_table_prefix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="table_prefix"):
        ReviewDatabase(tmp_path / "review.db", 'x"; DROP TABLE y; --')
