"""Run tallies and the quarantine listing: counts and anonpipe's words, never a file's value."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from anonpipe.daemon.state import FileRecord, RunRecord, StudyRecord
from anonpipe.daemon.states import Failure, RunState, StudyState
from anonpipe.web.history import element_of, parse_time, quarantined_files, tally_run

ORIGINAL_UID = "2.25.111111111111111111111111111111111111"


def _run(state: RunState = RunState.DONE) -> RunRecord:
    return RunRecord(
        name="run_at_1000",
        path=Path("/data/run_at_1000"),
        state=state,
        practice=False,
        no_push=False,
        started="2026-12-01T10:00:00+00:00",
        finished="2026-12-01T10:01:40+00:00" if state.finished else None,
        error=None,
    )


def _study(review_id: int, state: StudyState, failure: Failure | None = None) -> StudyRecord:
    return StudyRecord(
        run="run_at_1000",
        review_id=review_id,
        original_study_uid=ORIGINAL_UID,
        accession_no="ACC123",
        has_protocol_series=False,
        state=state,
        reason=None,
        expected=None,
        landed=0,
        clean=0,
        quarantined=0,
        pushed=0,
        cleaned_study_uid=None,
        failure=failure,
    )


def _file(
    name: str,
    status: str,
    reason: str | None = None,
    output: str | None = None,
    pushed: bool = False,
) -> FileRecord:
    return FileRecord(
        review_id=1,
        name=name,
        status=status,
        output=output,
        reason=reason,
        cleaned_study_uid=None,
        sop_instance_uid=None,
        modality="CT",
        sop_class=None,
        series_uid=None,
        pushed=pushed,
    )


def test_a_run_is_summed_by_state_outcome_and_reason() -> None:
    studies = [
        _study(1, StudyState.PUBLISHED),
        _study(2, StudyState.HELD),
        _study(3, StudyState.FAILED_REPORTED, Failure.NEVER_FOUND),
    ]
    files = [
        _file("a", "clean", pushed=True),
        _file("b", "clean", pushed=True),
        _file("c", "duplicate"),
        _file("d", "quarantined", "burned-in annotation"),
        _file("e", "quarantined", "residual PHI"),
        _file("f", "error", "unreadable"),
    ]
    tally = tally_run(_run(), studies, files)
    assert tally.studies[StudyState.PUBLISHED] == 1 and tally.held == (2,)
    assert tally.failures == {"NEVER_FOUND": 1}
    assert dict(tally.files) == {
        "clean": 2,
        "pushed": 2,
        "duplicate": 1,
        "quarantined": 2,
        "error": 1,
    }
    assert dict(tally.quarantine) == {"burned-in annotation": 1, "residual PHI": 1}
    assert tally.handled == 6
    assert tally.duration() == 100.0
    assert tally.files_per_second() == 0.06


def test_a_running_run_is_timed_to_now() -> None:
    tally = tally_run(_run(RunState.PULLING), [], [])
    now = datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC)
    assert tally.duration(now) == 30.0
    assert tally.files_per_second(now) is None  # no file yet


def test_times_without_a_zone_are_utc_and_bad_ones_none() -> None:
    assert parse_time("2026-12-01T10:00:00") == datetime(2026, 12, 1, 10, tzinfo=UTC)
    assert parse_time("yesterday") is None and parse_time(None) is None


def test_element_keeps_tag_paths_and_the_residual_kind_only() -> None:
    assert element_of("PatientName value at (0008,1030)") == "PatientName at (0008,1030)"
    assert element_of("private text value at (0009,1010)") == "private text at (0009,1010)"
    assert element_of("private text value at an element boundary") == "private text"
    assert element_of("ValueError at (0040,0275)[0].(0010,0010)") == "(0040,0275)[0].(0010,0010)"
    assert element_of("element (7FE0,0010) at offset 12") == "(7FE0,0010)"
    # whatever else a detail holds (an error message quoting a value) is dropped
    assert element_of("invalid literal: 'SMITH^JOHN' in (0010,0010)") == "(0010,0010)"
    assert element_of("SMITH^JOHN is not a known syntax") == ""
    assert element_of(None) == ""


def test_quarantined_files_name_the_copy_reason_and_element(tmp_path: Path) -> None:
    quarantine = tmp_path / "quarantine"
    quarantine.mkdir()
    records = []
    for n in range(3):
        copy = quarantine / f"{n:024x}.dcm"
        copy.write_bytes(b"")
        detail = f"PatientName value at ({n:04X},0010)"
        source = f"/data/from_staging/{ORIGINAL_UID}.dcm"
        copy.with_suffix(".json").write_text(
            json.dumps({"source": source, "reason": "residual PHI", "detail": detail})
        )
        records.append(_file(f"{ORIGINAL_UID}.{n}.dcm", "quarantined", "residual PHI", str(copy)))
    records.append(_file("clean.dcm", "clean"))
    shown, total = quarantined_files(records, limit=2)
    assert total == 3 and len(shown) == 2
    assert shown[0].file == f"{0:024x}.dcm"
    assert shown[1].element == "PatientName at (0001,0010)"
    assert ORIGINAL_UID not in repr(shown)


def test_a_missing_quarantine_record_leaves_the_element_empty(tmp_path: Path) -> None:
    shown, _total = quarantined_files(
        [_file("x.dcm", "quarantined", None, str(tmp_path / "gone.dcm"))], limit=10
    )
    assert shown[0].element == "" and shown[0].reason == "unknown"
