"""The pages as pure functions of the status model: escaped, linked, without script."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from html.parser import HTMLParser

from anonpipe.daemon.states import Failure, RunState, StudyState
from anonpipe.daemon.status import (
    HeldStudy,
    RunDetail,
    RunSummary,
    ServiceState,
    StatusReport,
    StudyStatus,
)
from anonpipe.web import pages
from anonpipe.web.history import QuarantinedFile, RunTally

HOSTILE = "<script>alert('x')</script>"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k == "href" and v]


def _parse(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    return parser


def _study(review_id: int, step: StudyState, reason: str | None = None) -> StudyStatus:
    return StudyStatus(
        study=review_id,
        step=step,
        expected=10,
        landed=10,
        clean=9,
        quarantined=1,
        duplicates=0,
        pushed=9,
        reason=reason,
        notes=None,
        cleaned_study_uid="2.25.42",
        failure=Failure.PUSH_REFUSED if step is StudyState.FAILED else None,
    )


def _tally(name: str = "run_at_1000") -> RunTally:
    return RunTally(
        name=name,
        state=RunState.DONE,
        practice=False,
        no_push=False,
        started=datetime(2026, 12, 1, 10, tzinfo=UTC),
        finished=datetime(2026, 12, 1, 10, 2, tzinfo=UTC),
        error=HOSTILE,
        files=Counter(clean=9, quarantined=1, pushed=9),
        quarantine=Counter({HOSTILE: 1}),
    )


def test_now_page_shows_state_studies_held_and_escapes_everything() -> None:
    run = RunSummary(name="run_at_1000", state=RunState.PUSHING, error=None, started="2026-12-01")
    status = StatusReport(
        state="running run_at_1000: pushing",
        service=ServiceState.RUNNING,
        current="run_at_1000",
        run=run,
        studies=(_study(1, StudyState.PUSHING), _study(2, StudyState.FAILED, HOSTILE)),
        held=(HeldStudy(3, HOSTILE),),
        errors=(HOSTILE,),
        runs=(run,),
    )
    html = pages.now_page(status)
    parsed = _parse(html)
    assert "script" not in parsed.tags
    assert html.count("&lt;script&gt;") == 3
    assert '<meta http-equiv="refresh" content="5">' in html
    assert "/runs/run_at_1000" in parsed.links
    assert "push failed" in html and "2.25.42" in html


def test_runs_and_run_pages_link_and_plot() -> None:
    tallies = [_tally(f"run_at_{n}") for n in range(1000, 1000 + pages.RUNS_PER_PAGE + 5)]
    html = pages.runs_page(tallies, page=1)
    parsed = _parse(html)
    assert parsed.tags.count("svg") == 3
    assert "/runs?page=2" in parsed.links and "script" not in parsed.tags
    assert f"/runs/run_at_{1000 + pages.RUNS_PER_PAGE + 4}" in parsed.links  # newest first
    assert "/runs/run_at_1000" not in parsed.links  # on page 2
    assert "/runs/run_at_1000" in _parse(pages.runs_page(tallies, page=2)).links
    detail = RunDetail(
        name="run_at_1000",
        state=RunState.DONE,
        error=None,
        path="/data/run_at_1000",
        studies=(_study(1, StudyState.PUBLISHED),),
        overview=("Starting at 2026-12-01 10:00", HOSTILE),
    )
    html = pages.run_page(detail, _tally())
    assert "Starting at" in html and "&lt;script&gt;" in html and "<script" not in html
    assert "/quarantine/run_at_1000" in _parse(html).links


def test_quarantine_pages_show_reason_and_element_escaped() -> None:
    html = pages.quarantine_page([_tally()])
    assert "<script" not in html and "/quarantine/run_at_1000" in _parse(html).links
    files = [QuarantinedFile(1, "0123.dcm", HOSTILE, "PatientName at (0010,0010)")]
    html = pages.quarantine_run_page(_tally(), files, total=3)
    assert "PatientName at (0010,0010)" in html and "<script" not in html
    assert "The first 1 of 3 files are shown." in html
