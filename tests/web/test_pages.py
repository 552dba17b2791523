"""The pages as pure functions of the status model: escaped, linked, without script."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from html.parser import HTMLParser

from anonpipe.daemon.pipeline import Step
from anonpipe.daemon.states import Failure, RunState, StudyState
from anonpipe.daemon.status import (
    HeldStudy,
    RunDetail,
    RunSummary,
    ServiceState,
    StatusReport,
    StudyStatus,
)
from anonpipe.scp import ScpStatus
from anonpipe.web import pages
from anonpipe.web.history import STUDY_STEPS, QuarantinedFile, RunTally, StudyTimes

HOSTILE = "<script>alert('x')</script>"
NS = "{http://www.w3.org/2000/svg}"


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
    assert parsed.tags.count("svg") == 4
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


def _scp(**counts: int) -> ScpStatus:
    return ScpStatus(
        ae_title="ANONPIPE",
        bind="127.0.0.1",
        port=11112,
        listening=True,
        active_associations=0,
        expected_studies=0,
        landed=42,
        refused={},
        rejected_associations={},
        **counts,
    )


def test_now_page_shows_bytes_received_and_associations_accepted() -> None:
    status = StatusReport(
        state="idle", scp=_scp(bytes_received=2_345_678, accepted_associations=17)
    )
    html = pages.now_page(status)
    assert "<dt>bytes received</dt><dd>2.3 MB (2345678 bytes)</dd>" in html
    assert "<dt>associations accepted</dt><dd>17</dd>" in html
    html = pages.now_page(StatusReport(state="idle", scp=_scp()))  # nothing received yet
    assert "<dt>bytes received</dt><dd>0 B</dd>" in html
    assert "<dt>associations accepted</dt><dd>0</dd>" in html


def _cells(html: str, after: str) -> list[list[str]]:
    """The body rows of the first table after the heading *after*, as cell texts."""
    section = html.split(f"<h2>{after}</h2>", 1)[1].split("</table>", 1)[0]
    return [
        re.findall(r"<td[^>]*>(.*?)</td>", row)
        for row in re.findall(r"<tr>(.*?)</tr>", section.split("<tbody>", 1)[1])
    ]


def test_run_page_shows_bytes_pushed_and_each_studys_step_times() -> None:
    detail = RunDetail(name="run_at_1000", state=RunState.DONE, error=None, path="/data/x")
    tally = replace(
        _tally(),
        bytes_pushed=1_500_000,
        study_times=(
            StudyTimes(1, {Step.PULL: 10.0, Step.DEIDENTIFY: 2.5, Step.PUSH: 75.0}, 130.0),
            StudyTimes(2, {Step.PULL: 0.5}),  # still pulling: no total
        ),
    )
    html = pages.run_page(detail, tally)
    assert "<dt>bytes pushed</dt><dd>1.5 MB (1500000 bytes)</dd>" in html
    assert "<th>study</th><th>pull</th><th>deidentify</th><th>hook</th><th>push</th>" in html
    assert "<th>verify</th><th>writeback</th><th>total</th>" in html
    assert _cells(html, "Study step times") == [
        ["1", "10 s", "2.5 s", "-", "1 min 15 s", "-", "-", "2 min 10 s"],
        ["2", "0.5 s", "-", "-", "-", "-", "-", "-"],
    ]
    # A run recorded before step times were kept: no table, and nothing pushed counted.
    html = pages.run_page(detail, _tally())
    assert '<h2>Study step times</h2><p class="muted">none</p>' in html
    assert "<dt>bytes pushed</dt><dd>0 B</dd>" in html


def test_runs_page_plots_each_runs_mean_study_step_times() -> None:
    timed = replace(
        _tally("run_at_2000"),
        started=datetime(2026, 12, 2, 9, tzinfo=UTC),
        study_times=(
            StudyTimes(1, {Step.PULL: 10.0, Step.PUSH: 4.0}, 30.0),
            StudyTimes(2, {Step.PULL: 20.0, Step.VERIFY: 1.0}, 40.0),
        ),
    )
    untimed = _tally("run_at_1000")  # recorded before step times were kept
    html = pages.runs_page([untimed, timed], page=1)
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    (steps,) = [s for s in svgs if "<title>Study durations by step</title>" in s]
    root = ET.fromstring(steps)
    titles = [
        t.text for rect in root.iter(f"{NS}rect") if (t := rect.find(f"{NS}title")) is not None
    ]
    # The mean over the run's studies that finished the step: pull (10 + 20) / 2, push and
    # verify from the one study each; the run without times draws no bar.
    assert titles == [
        "12-02 09:00: pull: 15 s",
        "12-02 09:00: push: 4 s",
        "12-02 09:00: verify: 1 s",
    ]
    desc = root.find(f"{NS}desc")
    assert desc is not None and desc.text == (
        "Study durations by step (s), by run: 12-01 10:00 0; 12-02 09:00 20"
    )
    legend = html.split(steps, 1)[1].split("</ul>", 1)[0]
    assert re.findall(r"</span> (\w+)</li>", legend) == [step.value for step in STUDY_STEPS]


def test_quarantine_pages_show_reason_and_element_escaped() -> None:
    html = pages.quarantine_page([_tally()])
    assert "<script" not in html and "/quarantine/run_at_1000" in _parse(html).links
    files = [QuarantinedFile(1, "0123.dcm", HOSTILE, "PatientName at (0010,0010)")]
    html = pages.quarantine_run_page(_tally(), files, total=3)
    assert "PatientName at (0010,0010)" in html and "<script" not in html
    assert "The first 1 of 3 files are shown." in html
