"""The plots are well-formed SVG, escaped, and say what they show without a picture."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from anonpipe.web.svg import bars, stacked_bars

NS = "{http://www.w3.org/2000/svg}"


def test_bars_are_well_formed_and_scaled() -> None:
    chart = bars("Files per second", ["a", "b<", "c"], [10.0, None, 40.0], "files/s")
    root = ET.fromstring(chart)
    assert root.tag == f"{NS}svg" and root.get("role") == "img"
    rects = root.findall(f"{NS}rect")
    assert len(rects) == 3
    heights = [float(r.get("height", "0")) for r in rects]
    assert heights[1] == 0 and heights[2] == pytest.approx(4 * heights[0])
    titles = [r.find(f"{NS}title") for r in rects]
    assert [t.text for t in titles if t is not None] == [
        "a: 10 files/s",
        "b<: no data",
        "c: 40 files/s",
    ]
    desc = root.find(f"{NS}desc")
    assert desc is not None and "c 40" in (desc.text or "")


def test_stacked_bars_stack_each_series_and_have_a_legend() -> None:
    html = stacked_bars(
        "Quarantined", ["r1", "r2"], {"burned-in": [1, 0], "<odd> reason": [2, 3]}, "files"
    )
    chart, legend = html.split("</svg>")
    root = ET.fromstring(chart + "</svg>")
    rects = root.findall(f"{NS}rect")
    assert len(rects) == 3  # the empty value draws nothing
    assert "&lt;odd&gt; reason" in legend and "<odd>" not in html


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="same length"):
        bars("x", ["a"], [], "s")
    with pytest.raises(ValueError, match="has 1 values, not 2"):
        stacked_bars("x", ["a", "b"], {"r": [1]}, "files")


def test_an_empty_chart_is_still_a_chart() -> None:
    root = ET.fromstring(bars("Run duration", [], [], "min"))
    assert root.findall(f"{NS}rect") == []
