"""HTML built so that escaping cannot be forgotten: every value is text unless this module made it.

:class:`Markup` is a ``str`` that is already HTML. :func:`tag` escapes every child that is not
Markup (``html.escape``, quotes too) and every attribute value, so a reason, a run name or a
hook's overview line is shown as the text it is, whatever characters it holds. The pages and the
SVG plots are made only of :func:`tag`, :func:`join` and :func:`esc`; nothing else turns text
into markup.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

__all__ = ["Markup", "esc", "join", "tag"]

#: Elements written without a closing tag.
_VOID = frozenset({"br", "hr", "meta", "link", "img", "input"})


class Markup(str):
    """Text that is already HTML (or SVG): made here, from escaped parts."""

    __slots__ = ()


def esc(value: object) -> Markup:
    """``value`` as HTML text: Markup stays as it is, anything else is escaped."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def join(children: Iterable[object]) -> Markup:
    """The children side by side (each escaped unless it is Markup; None is left out)."""
    return Markup("".join(_render(child) for child in children))


def _render(child: object) -> str:
    if child is None:
        return ""
    if isinstance(child, str | int | float):
        return esc(child)
    if isinstance(child, Iterable):
        return join(child)
    return esc(child)


def tag(element: str, /, *children: object, **attrs: object) -> Markup:
    """``<element attrs>children</element>``; attribute ``class_`` is written ``class``,
    ``data_x`` as ``data-x``; an attribute that is None or False is left out, True is bare."""
    parts = [element]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        attr = key.rstrip("_").replace("_", "-")
        parts.append(attr if value is True else f'{attr}="{esc(value)}"')
    opening = f"<{' '.join(parts)}>"
    if element in _VOID:
        return Markup(opening)
    return Markup(f"{opening}{join(children)}</{element}>")
