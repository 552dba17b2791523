"""The pages: now, runs, one run, quarantine, one run's quarantine. Pure functions of their data.

Every page is built from the typed status model (:mod:`anonpipe.daemon.status`) and the run
tallies (:mod:`anonpipe.web.history`), which name studies by review id and, once de-identified,
by their cleaned Study Instance UID; a quarantined file by the name of anonpipe's copy, its
reason and its element. No page receives an original UID, accession number or any value read
from a file, so none can show one; and every text goes through :func:`~anonpipe.web.markup.tag`,
which escapes it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from urllib.parse import quote

from anonpipe.daemon.states import StudyState
from anonpipe.daemon.status import RunDetail, StatusReport, StudyStatus
from anonpipe.tools.cleandata import format_size
from anonpipe.web import svg
from anonpipe.web.history import STUDY_STEPS, QuarantinedFile, RunTally, StudyTimes
from anonpipe.web.layout import (
    definition_list,
    document,
    duration,
    number,
    rate,
    table,
    when,
)
from anonpipe.web.markup import Markup, tag

__all__ = [
    "PLOTTED_RUNS",
    "RUNS_PER_PAGE",
    "not_found",
    "now_page",
    "quarantine_page",
    "quarantine_run_page",
    "run_page",
    "runs_page",
]

#: How many of the newest runs the plots show.
PLOTTED_RUNS = 20
#: Runs per page of the run history.
RUNS_PER_PAGE = 50
#: Seconds between the "now" page's own reloads.
REFRESH_SECONDS = 5


def _run_link(name: str) -> Markup:
    return tag("a", name, href=f"/runs/{quote(name)}")


def _flag(ok: bool, good: str = "yes", bad: str = "no") -> Markup:
    return tag("span", good if ok else bad, class_="ok" if ok else "bad")


def _studies_table(studies: Sequence[StudyStatus]) -> Markup:
    rows = [
        (
            s.study,
            s.step.value,
            number(s.expected),
            s.landed,
            s.clean,
            s.quarantined,
            s.duplicates,
            s.pushed,
            number(s.verified),
            s.retries or "",
            s.push_error or "",
            s.failure.label if s.failure is not None else "",
            s.reason or "",
            s.notes or "",
            s.cleaned_study_uid or "",
        )
        for s in studies
    ]
    headers = (
        "review id",
        "step",
        "expected",
        "landed",
        "clean",
        "quarantined",
        "duplicates",
        "pushed",
        "verified",
        "push retries",
        "last push refusal",
        "failure",
        "reason",
        "notes",
        "cleaned Study Instance UID",
    )
    return table(headers, rows, numeric=(0, 2, 3, 4, 5, 6, 7, 8, 9))


def _size(count: int) -> str:
    """Bytes as the tools show them (``512 B``, ``1.5 MB``), with the exact count after."""
    return f"{count} B" if count < 1000 else f"{format_size(count)} ({count} bytes)"


def _step_time(seconds: float | None) -> str:
    """A step's time: tenths of a second under ten seconds (steps are often that short)."""
    if seconds is not None and seconds < 10:
        return f"{seconds:.1f} s"
    return duration(seconds)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items())) or "none"


def now_page(status: StatusReport) -> Markup:
    """What the service is doing now (reloads itself every few seconds)."""
    facts: list[tuple[str, object]] = [
        ("state", tag("span", status.state, class_="state")),
        ("service", status.service.value),
    ]
    if status.paused:
        facts.append(("paused", f"since {when(status.paused_since)} (anonpipectl resume)"))
    if status.misroute:
        facts.append(
            ("misroute guard", tag("span", f"{status.misroute} (anonpipectl resume)", class_="bad"))
        )
    facts.append(("current run", _run_link(status.current) if status.current else "none"))
    facts.append(("as of", f"{when(status.generated)}, anonpipe {status.version}"))
    body: list[object] = [definition_list(facts)]

    run = status.run
    if run is None:
        body += [tag("h2", "Newest run"), tag("p", "no run yet", class_="muted")]
    else:
        title = f"Newest run: {run.name} ({run.state.value})"
        body.append(tag("h2", title))
        if run.error:
            body.append(tag("p", run.error, class_="bad"))
        body.append(
            definition_list(
                [
                    ("run", _run_link(run.name)),
                    ("started", when(run.started)),
                    ("finished", when(run.finished)),
                    ("mode", _mode(run.practice, run.no_push)),
                ]
            )
        )
        body.append(_studies_table(status.studies))

    body.append(tag("h2", "Held studies"))
    body.append(table(("review id", "reason"), [(h.study, h.reason) for h in status.held]))
    body.append(tag("h2", "Deferred studies"))
    body.append(
        table(
            ("review id", "next try", "failures", "last reason"),
            [(d.study, when(d.next_try), d.failures, d.reason) for d in status.deferred],
            numeric=(0, 2),
        )
    )
    body.append(tag("h2", "Peers"))
    body.append(
        table(
            ("peer", "PACS", "reachable", "TLS", "error", "last checked", "down since"),
            [
                (
                    name,
                    p.peer,
                    _flag(p.ok),
                    "yes" if p.tls else "no",
                    p.error,
                    when(p.checked),
                    when(p.down_since) if p.down_since else "",
                )
                for name, p in sorted(status.peers.items())
            ],
        )
    )
    body.append(tag("h2", "Storage SCP"))
    scp = status.scp
    if scp is None:
        body.append(tag("p", "not started", class_="muted"))
    else:
        body.append(
            definition_list(
                [
                    ("AE title", scp.ae_title),
                    (
                        "listening",
                        tag("span", f"{scp.bind}:{scp.port}", class_="ok")
                        if scp.listening
                        else _flag(False),
                    ),
                    ("active associations", scp.active_associations),
                    ("studies expected", scp.expected_studies),
                    ("objects landed", scp.landed),
                    ("bytes received", _size(scp.bytes_received)),
                    ("objects refused", _counts(scp.refused)),
                    ("associations accepted", scp.accepted_associations),
                    ("associations refused", _counts(scp.rejected_associations)),
                ]
            )
        )
    body.append(tag("h2", "Last errors"))
    body.append(
        tag("ul", [tag("li", line) for line in status.errors])
        if status.errors
        else tag("p", "none", class_="muted")
    )
    body.append(tag("h2", "Recent runs"))
    body.append(
        table(
            ("run", "state", "started", "finished"),
            [
                (_run_link(r.name), r.state.value, when(r.started), when(r.finished))
                for r in reversed(status.runs)
            ],
        )
    )
    return document("Now", "/", body, refresh=REFRESH_SECONDS)


def _mode(practice: bool, no_push: bool) -> str:
    if practice:
        return "practice (no push, no write-back)"
    return "no push" if no_push else "normal"


def _plotted(tallies: Sequence[RunTally]) -> list[RunTally]:
    return list(tallies[-PLOTTED_RUNS:])


def _short(name: str, tally: RunTally) -> str:
    """A bar's label: the start time, short (the run name is in its tooltip's table)."""
    return tally.started.strftime("%m-%d %H:%M") if tally.started else name


def _charts(tallies: Sequence[RunTally]) -> Markup:
    shown = _plotted(tallies)
    labels = [_short(t.name, t) for t in shown]
    reasons = sorted({reason for t in shown for reason in t.quarantine})
    return tag(
        "div",
        tag(
            "figure",
            svg.bars("Files per second", labels, [t.files_per_second() for t in shown], "files/s"),
            tag(
                "figcaption", f"Files de-identified or set aside per second, last {len(shown)} runs"
            ),
        ),
        tag(
            "figure",
            svg.bars(
                "Run duration",
                labels,
                [(d / 60 if (d := t.duration()) is not None else None) for t in shown],
                "min",
            ),
            tag("figcaption", "Run durations, start to end"),
        ),
        tag(
            "figure",
            svg.stacked_bars(
                "Study durations by step",
                labels,
                {step.value: [t.mean_step(step) or 0.0 for t in shown] for step in STUDY_STEPS},
                "s",
            ),
            tag(
                "figcaption",
                "Study durations: the mean time a study of the run spent in each step (runs "
                "recorded before step times were kept show none)",
            ),
        ),
        tag(
            "figure",
            svg.stacked_bars(
                "Quarantined files by reason",
                labels,
                {reason: [t.quarantine[reason] for t in shown] for reason in reasons},
                "files",
            ),
            tag("figcaption", "Quarantined files by reason, by run"),
        ),
        class_="charts",
    )


def runs_page(tallies: Sequence[RunTally], page: int) -> Markup:
    """The run history, newest first, :data:`RUNS_PER_PAGE` at a time, with the plots."""
    newest_first = list(reversed(tallies))
    pages = max((len(newest_first) + RUNS_PER_PAGE - 1) // RUNS_PER_PAGE, 1)
    page = min(max(page, 1), pages)
    chunk = newest_first[(page - 1) * RUNS_PER_PAGE : page * RUNS_PER_PAGE]
    rows = [
        (
            _run_link(t.name),
            t.state.value,
            _mode(t.practice, t.no_push),
            when(t.started),
            when(t.finished),
            duration(t.duration()),
            sum(t.studies.values()),
            t.studies[StudyState.PUBLISHED],
            t.handled,
            t.files["quarantined"],
            t.files["pushed"],
            rate(t.files_per_second()),
            t.error or "",
        )
        for t in chunk
    ]
    headers = (
        "run",
        "state",
        "mode",
        "started",
        "finished",
        "duration",
        "studies",
        "published",
        "files",
        "quarantined",
        "pushed",
        "files/s",
        "error",
    )
    body: list[object] = [_charts(tallies), table(headers, rows, numeric=(6, 7, 8, 9, 10, 11))]
    if pages > 1:
        body.append(
            tag(
                "p",
                "Pages: ",
                [
                    (
                        tag("a", str(n), href=f"/runs?page={n}") if n != page else tag("b", str(n)),
                        " ",
                    )
                    for n in range(1, pages + 1)
                ],
            )
        )
    return document("Runs", "/runs", body)


def run_page(detail: RunDetail, tally: RunTally) -> Markup:
    """One run: facts, its studies, its overview.txt and its quarantine by reason."""
    facts = definition_list(
        [
            ("state", detail.state.value),
            ("mode", _mode(detail.practice, detail.no_push)),
            ("started", when(detail.started)),
            ("finished", when(detail.finished)),
            ("duration", duration(tally.duration())),
            ("files", tally.handled),
            ("files per second", rate(tally.files_per_second())),
            ("pushed", tally.files["pushed"]),
            ("bytes pushed", _size(tally.bytes_pushed)),
            (
                "quarantined",
                tag(
                    "a",
                    str(tally.files["quarantined"]),
                    href=f"/quarantine/{quote(detail.name)}",
                ),
            ),
            ("folder", detail.path),
        ]
    )
    body: list[object] = [facts]
    if detail.error:
        body.append(tag("p", detail.error, class_="bad"))
    body += [
        tag("h2", "Studies"),
        _studies_table(detail.studies),
        tag("h2", "Study step times"),
        _times_table(tally.study_times),
        tag("h2", "overview.txt"),
        tag("pre", "\n".join(detail.overview))
        if detail.overview
        else tag("p", "empty", class_="muted"),
        tag("h2", "Quarantined files by reason"),
        table(("reason", "files"), sorted(tally.quarantine.items()), numeric=(1,)),
    ]
    return document(f"Run {detail.name}", "/runs", body)


def _times_table(times: Sequence[StudyTimes]) -> Markup:
    """Each pulled study's time in each step it finished, and in all once it ended."""
    rows = [
        (
            t.study,
            *(_step_time(t.steps.get(step)) for step in STUDY_STEPS),
            _step_time(t.total),
        )
        for t in times
    ]
    headers = ("study", *(step.value for step in STUDY_STEPS), "total")
    return table(headers, rows, numeric=range(len(headers)))


def quarantine_page(tallies: Sequence[RunTally]) -> Markup:
    """Quarantined files of every run by reason (newest run first), with the plot."""
    shown = _plotted(tallies)
    labels = [_short(t.name, t) for t in shown]
    reasons = sorted({reason for t in shown for reason in t.quarantine})
    chart = svg.stacked_bars(
        "Quarantined files by reason",
        labels,
        {reason: [t.quarantine[reason] for t in shown] for reason in reasons},
        "files",
    )
    total: Counter[str] = Counter()
    for t in tallies:
        total.update(t.quarantine)
    rows = [
        (
            tag("a", t.name, href=f"/quarantine/{quote(t.name)}"),
            t.state.value,
            t.files["quarantined"],
            _counts(dict(t.quarantine)),
        )
        for t in reversed(tallies)
    ]
    body = [
        tag("figure", chart, tag("figcaption", f"Last {len(shown)} runs")),
        tag("h2", "Every run, by reason"),
        table(("reason", "files"), sorted(total.items()), numeric=(1,)),
        tag("h2", "By run"),
        table(("run", "state", "quarantined", "by reason"), rows, numeric=(2,)),
    ]
    return document("Quarantine", "/quarantine", body)


def quarantine_run_page(tally: RunTally, files: Sequence[QuarantinedFile], total: int) -> Markup:
    """One run's quarantined files: count by reason, then each file's reason and element."""
    body: list[object] = [
        tag("p", "Run ", _run_link(tally.name), f": {total} quarantined files."),
        table(("reason", "files"), sorted(tally.quarantine.items()), numeric=(1,)),
        tag("h2", "Files"),
        tag(
            "p",
            "Each file by the name of anonpipe's copy in the run's quarantine/ folder; the "
            "element is where the engine found the problem (never its value).",
            class_="muted",
        ),
        table(
            ("review id", "file", "reason", "element"),
            [(f.study, f.file, f.reason, f.element or "-") for f in files],
            numeric=(0,),
        ),
    ]
    if total > len(files):
        body.append(tag("p", f"The first {len(files)} of {total} files are shown.", class_="muted"))
    return document(f"Quarantine of {tally.name}", "/quarantine", body)


def not_found(what: str) -> Markup:
    return document("Not found", "", [tag("p", what), tag("p", tag("a", "Back to now", href="/"))])
