"""Small helpers on DICOM element values shared by the engine's rules."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from pydicom.datadict import get_entry


def values_of(value: Any) -> list[Any]:
    """The values of an element as a list: [] when empty, one item when single-valued."""
    if value is None or value == "":
        return []
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return [value]


@lru_cache(maxsize=8192)
def known_tag(tag: int) -> bool:
    """Whether the dictionary defines this public tag (repeating groups such as 60xx included)."""
    try:
        get_entry(tag)
    except KeyError:
        return False
    return True
