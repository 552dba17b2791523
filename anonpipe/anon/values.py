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


def default_strings(value: bytes) -> list[str]:
    """The values of a still-encoded CS/DA/DT/TM element as :func:`values_of` gives them
    once pydicom has read it: decoded as ISO 8859-1 whatever the character set, trailing
    spaces and NULs dropped, split at backslashes."""
    text = value.decode("latin-1").rstrip(" \0")
    return text.split("\\") if text else []


def uid_strings(value: bytes) -> list[str]:
    """:func:`default_strings` of a UI element (pydicom's UID also strips each of whitespace)."""
    return [uid.strip() for uid in default_strings(value)]
