"""Escaping is structural: text is escaped unless it is Markup this package made."""

from __future__ import annotations

from anonpipe.web.markup import Markup, esc, join, tag


def test_text_children_and_attributes_are_escaped() -> None:
    hostile = "<script>alert(1)</script> & \"quoted\" 'single'"
    html = tag("td", hostile, title=hostile)
    assert "<script>" not in html
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quoted&quot; &#x27;single&#x27;"
    assert html == f'<td title="{escaped}">{escaped}</td>'


def test_markup_is_kept_and_nested_lists_are_joined() -> None:
    inner = tag("b", "x<y")
    assert tag("p", ["a", inner, None, 3]) == "<p>a<b>x&lt;y</b>3</p>"
    assert esc(inner) is inner
    assert join(["<", Markup("<br>")]) == "&lt;<br>"


def test_attribute_names_and_flags() -> None:
    assert tag("a", "x", class_="c", aria_current=None, data_run="r") == (
        '<a class="c" data-run="r">x</a>'
    )
    assert tag("input", disabled=True, hidden=False) == "<input disabled>"
    assert tag("meta", name="viewport") == '<meta name="viewport">'
