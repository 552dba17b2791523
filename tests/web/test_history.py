"""Run tallies, study step times and the quarantine listing: counts, times and anonpipe's words,
never a file's value."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from anonpipe.daemon.pipeline import Step
from anonpipe.daemon.state import FileRecord, RunRecord, StudyRecord, StudyStep
from anonpipe.daemon.states import Failure, RunState, StepMark, StudyState
from anonpipe.web.history import (
    STUDY_STEPS,
    element_of,
    parse_time,
    quarantined_files,
    study_times,
    tally_run,
)

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
    size: int | None = None,
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
        size=size,
    )


#: The moment the steps below are counted from (a study_steps time is UTC, to the millisecond).
_T0 = datetime(2026, 12, 1, 10, tzinfo=UTC)


def _steps(review_id: int, *changes: tuple[StudyState | StepMark, float]) -> list[StudyStep]:
    """Rows of ``study_steps`` for one study: (state or mark, seconds after :data:`_T0`)."""
    return [
        StudyStep(
            review_id, state.value, (_T0 + timedelta(seconds=at)).isoformat(timespec="milliseconds")
        )
        for state, at in changes
    ]


#: A study through every step, the per-study hook included: pull 10 s, deidentify 2.5 s,
#: hook 0.5 s, push 7 s (from 20 s: the 6 s it waited for a push slot are no step's),
#: verify 1.25 s, writeback 1.75 s; 29 s from its pull's start to its publication.
_PUBLISHED = (
    (StudyState.SELECTED, 0.0),
    (StudyState.PULLING, 1.0),
    (StepMark.MOVED, 11.0),
    (StudyState.DEIDENTIFIED, 13.5),
    (StudyState.HOOKED, 14.0),
    (StudyState.PUSHING, 20.0),
    (StepMark.VERIFYING, 27.0),
    (StudyState.VERIFIED, 28.25),
    (StudyState.PUBLISHED, 30.0),
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


def test_every_step_of_a_published_study_is_timed() -> None:
    (times,) = study_times(_steps(1, *_PUBLISHED), {1: StudyState.PUBLISHED})
    assert times.study == 1
    assert dict(times.steps) == {
        Step.PULL: 10.0,
        Step.DEIDENTIFY: 2.5,
        Step.HOOK: 0.5,
        Step.PUSH: 7.0,
        Step.VERIFY: 1.25,
        Step.WRITEBACK: 1.75,
    }
    assert set(times.steps) == set(STUDY_STEPS)
    assert times.total == 29.0


def test_a_resumed_pull_and_push_are_timed_from_their_last_beginning() -> None:
    rows = _steps(
        4,
        (StudyState.SELECTED, 0.0),
        (StudyState.PULLING, 1.0),  # stopped; the resumed run pulls it again
        (StudyState.PULLING, 100.0),
        (StepMark.MOVED, 130.0),
        (StudyState.DEIDENTIFIED, 131.0),
        (StudyState.PUSHING, 140.0),  # the research PACS went away
        (StudyState.PUSHING, 200.0),
        (StepMark.VERIFYING, 203.0),
        (StudyState.VERIFIED, 204.0),
        (StudyState.PUBLISHED, 205.0),
    )
    (times,) = study_times(rows, {4: StudyState.PUBLISHED})
    assert times.steps[Step.PULL] == 30.0 and times.steps[Step.PUSH] == 3.0
    assert Step.HOOK not in times.steps  # no per-study hook ran
    assert times.total == 204.0  # from its first pull's start


def test_a_failed_study_times_what_it_went_through() -> None:
    never_found = _steps(
        2,
        (StudyState.PULLING, 0.0),
        (StepMark.MOVED, 4.0),
        (StudyState.FAILED, 4.5),
        (StudyState.FAILED_REPORTED, 6.0),
    )
    refused = _steps(
        3,
        (StudyState.PULLING, 0.0),
        (StepMark.MOVED, 3.0),
        (StudyState.DEIDENTIFIED, 5.0),
        (StudyState.PUSHING, 10.0),
        (StepMark.VERIFYING, 12.0),
        (StudyState.FAILED, 13.0),
    )
    states = {2: StudyState.FAILED_REPORTED, 3: StudyState.FAILED}
    first, second = study_times(refused + never_found, states)  # by review id
    assert first.study == 2
    assert dict(first.steps) == {Step.PULL: 4.0, Step.DEIDENTIFY: 0.5, Step.WRITEBACK: 1.5}
    assert first.total == 6.0
    assert second.study == 3
    assert dict(second.steps) == {
        Step.PULL: 3.0,
        Step.DEIDENTIFY: 2.0,
        Step.PUSH: 2.0,
        Step.VERIFY: 1.0,
    }
    assert second.total == 13.0  # failed is final, reported or not


def test_held_and_selected_studies_have_no_times_and_studies_in_flight_no_total() -> None:
    rows = [
        *_steps(5, (StudyState.HELD, 0.0)),
        *_steps(6, (StudyState.SELECTED, 0.0)),
        *_steps(7, (StudyState.SELECTED, 0.0), (StudyState.PULLING, 2.0)),
        *_steps(8, *_PUBLISHED[:4]),  # de-identified, its push to come
    ]
    states = {
        5: StudyState.HELD,
        6: StudyState.SELECTED,
        7: StudyState.PULLING,
        8: StudyState.DEIDENTIFIED,
    }
    pulling, deidentified = study_times(rows, states)
    assert pulling.study == 7 and dict(pulling.steps) == {} and pulling.total is None
    assert deidentified.study == 8 and deidentified.total is None
    assert dict(deidentified.steps) == {Step.PULL: 10.0, Step.DEIDENTIFY: 2.5}
    # The run ended (no push): its studies end where they are, and have their total.
    ended = study_times(rows, states, ended=True)
    assert [(t.study, t.total) for t in ended] == [(7, 0.0), (8, 12.5)]
    assert study_times([], states) == ()


def test_a_tally_with_steps_has_held_since_bytes_pushed_and_study_times() -> None:
    studies = [
        _study(1, StudyState.PUBLISHED),
        _study(2, StudyState.HELD),
        _study(3, StudyState.DEIDENTIFIED),
    ]
    files = [
        _file("a", "clean", pushed=True, size=1000),
        _file("b", "clean", pushed=True, size=2500),
        _file("c", "clean", pushed=False, size=4000),  # not in the research PACS
        _file("d", "clean", pushed=True),  # recorded before sizes were
        _file("e", "duplicate", size=8000),
        _file("f", "quarantined", "residual PHI", size=16000),
    ]
    steps = [
        *_steps(2, (StudyState.HELD, 0.5)),
        *_steps(1, *_PUBLISHED),
        *_steps(2, (StudyState.HELD, 40.0)),  # held again: it is held since the first
        *_steps(3, *_PUBLISHED[:4]),
    ]
    tally = tally_run(_run(RunState.PUSHING), studies, files, steps)
    assert tally.held == (2,)
    assert tally.held_since == {2: _T0 + timedelta(seconds=0.5)}
    assert tally.bytes_pushed == 3500
    assert [t.study for t in tally.study_times] == [1, 3]
    assert [t.total for t in tally.study_times] == [29.0, None]  # the run goes on
    assert tally.mean_step(Step.PULL) == 10.0
    assert tally.mean_step(Step.DEIDENTIFY) == 2.5
    assert tally.mean_step(Step.PUSH) == 7.0
    assert tally.mean_step(Step.SELECT) is None

    done = tally_run(_run(RunState.DONE), studies, files, steps)
    assert [t.total for t in done.study_times] == [29.0, 12.5]  # the run ended without it


def test_a_run_recorded_before_study_steps_has_no_times() -> None:
    tally = tally_run(_run(), [_study(2, StudyState.HELD)], [_file("a", "clean", pushed=True)])
    assert tally.held == (2,) and tally.held_since == {}
    assert tally.bytes_pushed == 0 and tally.study_times == ()
    assert tally.mean_step(Step.PULL) is None


@pytest.mark.parametrize("at", ["yesterday", ""])
def test_a_step_row_without_a_readable_time_is_skipped(at: str) -> None:
    rows = [*_steps(1, *_PUBLISHED[:2]), StudyStep(1, StepMark.MOVED.value, at)]
    (times,) = study_times(rows, {1: StudyState.PULLING})
    assert dict(times.steps) == {} and times.total is None
