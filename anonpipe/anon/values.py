"""Small helpers on DICOM element values shared by the engine's rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def values_of(value: Any) -> list[Any]:
    """The values of an element as a list: [] when empty, one item when single-valued."""
    if value is None or value == "":
        return []
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return [value]
