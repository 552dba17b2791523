"""Small server-rendered SVG bar charts for the status pages: no JavaScript, no library.

Two shapes are enough for what reads better as a picture than as numbers: :func:`bars` (one value
per run: files per second, run durations) and :func:`stacked_bars` (several values per run:
quarantined files by reason, a study's mean time in each step). Every label goes through
:func:`~anonpipe.web.markup.tag`, so it is escaped; each chart carries a ``<title>`` and
``<desc>`` for screen readers, and each bar a ``<title>`` with its exact value (a browser shows
it on hover).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from anonpipe.web.markup import Markup, tag

__all__ = ["PALETTE", "bars", "stacked_bars"]

#: Colours of the series of a stacked chart, in order (then again from the first).
PALETTE: tuple[str, ...] = (
    "#4477aa",
    "#ee6677",
    "#228833",
    "#ccbb44",
    "#66ccee",
    "#aa3377",
    "#bbbbbb",
)

_WIDTH = 460
_HEIGHT = 200
_LEFT = 56  # room for the value axis
_BOTTOM = 48  # room for the run labels
_TOP = 16
_RIGHT = 12


def _nice_max(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= value (1 for nothing)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return float(step * power)
    return float(10 * power)


def _number(value: float) -> str:
    if value == int(value):
        return f"{int(value)}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _frame(title: str, description: str, top: float, unit: str, body: list[Markup]) -> Markup:
    plot_h = _HEIGHT - _TOP - _BOTTOM
    axis: list[Markup] = []
    for i in range(5):
        value = top * i / 4
        y = _TOP + plot_h - plot_h * i / 4
        axis.append(
            tag("line", x1=_LEFT, x2=_WIDTH - _RIGHT, y1=f"{y:.1f}", y2=f"{y:.1f}", class_="grid")
        )
        axis.append(
            tag(
                "text",
                _number(value),
                x=_LEFT - 6,
                y=f"{y + 4:.1f}",
                class_="tick",
                text_anchor="end",
            )
        )
    axis.append(tag("text", unit, x=4, y=_TOP - 4, class_="unit"))
    return tag(
        "svg",
        tag("title", title),
        tag("desc", description),
        axis,
        body,
        xmlns="http://www.w3.org/2000/svg",
        viewBox=f"0 0 {_WIDTH} {_HEIGHT}",
        width=_WIDTH,
        height=_HEIGHT,
        role="img",
        class_="chart",
    )


def _slot(count: int) -> tuple[float, float]:
    """Width of one bar's slot and of the bar in it, for *count* bars."""
    slot = (_WIDTH - _LEFT - _RIGHT) / max(count, 1)
    return slot, max(min(slot * 0.7, 48.0), 2.0)


def _label(text: str, x: float, count: int) -> Markup:
    y = _HEIGHT - _BOTTOM + 14
    if count > 8:  # long run names side by side would overlap: slant them
        return tag(
            "text",
            text,
            x=f"{x:.1f}",
            y=y,
            class_="label",
            text_anchor="end",
            transform=f"rotate(-30 {x:.1f} {y})",
        )
    return tag("text", text, x=f"{x:.1f}", y=y, class_="label", text_anchor="middle")


def _bar(title: str, centre: float, width: float, top: float, height: float, fill: str) -> Markup:
    """One bar centred on *centre*, from *top* down *height*, its exact value in its title."""
    return tag(
        "rect",
        tag("title", title),
        x=f"{centre - width / 2:.1f}",
        y=f"{top:.1f}",
        width=f"{width:.1f}",
        height=f"{height:.1f}",
        fill=fill,
    )


def bars(
    title: str,
    labels: Sequence[str],
    values: Sequence[float | None],
    unit: str,
) -> Markup:
    """One bar per label (None: no bar, "no data" in its tooltip), on a value axis from 0.

    Parameters
    ----------
    title : str
        What the chart shows (its ``<title>``).
    labels : sequence of str
        One per bar, under it (e.g. the runs' start times).
    values : sequence of float or None
        The bars' heights, in *unit*.
    unit : str
        Shown over the value axis and in each bar's tooltip.
    """
    if len(labels) != len(values):
        raise ValueError("bars: labels and values must have the same length")
    top = _nice_max(max((v for v in values if v is not None), default=0.0))
    plot_h = _HEIGHT - _TOP - _BOTTOM
    slot, width = _slot(len(values))
    body: list[Markup] = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        centre = _LEFT + slot * (i + 0.5)
        height = 0.0 if value is None else plot_h * value / top
        shown = "no data" if value is None else f"{_number(value)} {unit}"
        body.append(
            _bar(f"{label}: {shown}", centre, width, _TOP + plot_h - height, height, PALETTE[0])
        )
        body.append(_label(label, centre, len(values)))
    described = ", ".join(
        f"{label} {'no data' if v is None else _number(v)}"
        for label, v in zip(labels, values, strict=True)
    )
    return _frame(title, f"{title} ({unit}): {described or 'no runs yet'}", top, unit, body)


def stacked_bars(
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    unit: str,
) -> Markup:
    """One bar per label, stacked from *series* (name → one value per label), with a legend."""
    for name, values in series.items():
        if len(values) != len(labels):
            raise ValueError(
                f"stacked_bars: series {name!r} has {len(values)} values, not {len(labels)}"
            )
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    top = _nice_max(max(totals, default=0))
    plot_h = _HEIGHT - _TOP - _BOTTOM
    slot, width = _slot(len(labels))
    colour = {name: PALETTE[n % len(PALETTE)] for n, name in enumerate(series)}
    body: list[Markup] = []
    for i, label in enumerate(labels):
        centre = _LEFT + slot * (i + 0.5)
        base = float(_TOP + plot_h)
        for name, values in series.items():
            if not values[i]:
                continue
            height = plot_h * values[i] / top
            base -= height
            hover = f"{label}: {name}: {_number(values[i])} {unit}"
            body.append(_bar(hover, centre, width, base, height, colour[name]))
        body.append(_label(label, centre, len(labels)))
    chart = _frame(
        title,
        f"{title} ({unit}), by run: "
        + (
            "; ".join(
                f"{label} {_number(total)}" for label, total in zip(labels, totals, strict=True)
            )
            or "none"
        ),
        top,
        unit,
        body,
    )
    legend = tag(
        "ul",
        [tag("li", tag("span", "■", style=f"color:{colour[name]}"), " ", name) for name in series],
        class_="legend",
    )
    return Markup(chart + legend)
