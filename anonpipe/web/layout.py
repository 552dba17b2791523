"""The frame every page shares (head, navigation, style) and the small formatters they use.

Plain HTML and one inline style sheet: the pages work without JavaScript (none is sent, and the
Content-Security-Policy of :mod:`anonpipe.web.server` forbids it), the "now" page refreshes itself
with ``<meta http-equiv="refresh">``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from anonpipe.web.history import parse_time
from anonpipe.web.markup import Markup, tag

__all__ = [
    "NAV",
    "definition_list",
    "document",
    "duration",
    "number",
    "rate",
    "table",
    "when",
]

#: The navigation: path and label.
NAV: tuple[tuple[str, str], ...] = (
    ("/", "Now"),
    ("/runs", "Runs"),
    ("/quarantine", "Quarantine"),
    ("/metrics", "Metrics"),
)

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; }
header { display: flex; gap: 1.5em; align-items: baseline; border-bottom: 1px solid #ccc; }
header h1 { font-size: 1.2em; margin: .6em 0; }
nav a { margin-right: 1em; } nav a[aria-current] { font-weight: bold; text-decoration: none; }
h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; margin: .3em 0; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
dl { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; }
dt { color: #555; } dd { margin: 0; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; }
.bad { color: #a00; font-weight: bold; } .ok { color: #080; } .muted { color: #777; }
.state { font-size: 1.1em; font-weight: bold; }
svg.chart { display: block; margin: .5em 0; }
svg .grid { stroke: #e4e4e4; } svg text { font: 11px system-ui, sans-serif; fill: #444; }
ul.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: .3em 1.2em; }
.charts { display: flex; flex-wrap: wrap; gap: 0 2em; }
"""


def document(
    title: str, path: str, body: Iterable[object], *, refresh: int | None = None
) -> Markup:
    """A whole page: *title*, the navigation with *path* marked, then *body*."""
    head = [
        tag("meta", charset="utf-8"),
        tag("meta", name="viewport", content="width=device-width, initial-scale=1"),
        tag("meta", http_equiv="refresh", content=str(refresh)) if refresh else None,
        tag("title", f"{title} · anonpipe"),
        tag("style", Markup(_STYLE)),
    ]
    nav = tag(
        "nav",
        [
            tag("a", label, href=href, aria_current="page" if href == path else None)
            for href, label in NAV
        ],
    )
    page = tag(
        "html",
        tag("head", head),
        tag("body", tag("header", tag("h1", "anonpipe"), nav), tag("main", tag("h2", title), body)),
        lang="en",
    )
    return Markup("<!DOCTYPE html>\n" + page)


def when(text: str | datetime | None) -> str:
    """A stored time (ISO 8601, UTC) as ``2026-12-01 08:30:05 UTC``; ``-`` for none."""
    moment = text if isinstance(text, datetime) else parse_time(text)
    if moment is None:
        return "-" if not text else str(text)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | None) -> str:
    """``45 s``, ``12 min 5 s``, ``3 h 02 min``; ``-`` for none."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def rate(value: float | None) -> str:
    """Files per second with three significant digits; ``-`` for none."""
    return "-" if value is None else f"{value:.3g}"


def number(value: int | None) -> str:
    return "-" if value is None else str(value)


def table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, numeric: Iterable[int] = ()
) -> Markup:
    """A table; the columns whose index is in *numeric* are right-aligned."""
    right = frozenset(numeric)
    body = [
        tag(
            "tr",
            [tag("td", cell, class_="n" if i in right else None) for i, cell in enumerate(row)],
        )
        for row in rows
    ]
    if not body:
        return tag("p", "none", class_="muted")
    return tag(
        "table", tag("thead", tag("tr", [tag("th", h) for h in headers])), tag("tbody", body)
    )


def definition_list(items: Iterable[tuple[str, object]]) -> Markup:
    return tag("dl", [(tag("dt", key), tag("dd", value)) for key, value in items])


def now_utc() -> datetime:
    return datetime.now(UTC)
