"""The elements inside a still-encoded sequence value, without pydicom building its items.

The residual-PHI gate reads the values of sequences the cleaner removed unread; pydicom would
build a data set per item for that. :func:`sequence_elements` walks the bytes of an Explicit VR
Little Endian sequence instead and returns its elements, nested sequences flattened, or None
whenever the bytes hold anything it does not judge exactly as pydicom would read it (an
undefined-length value that is not a sequence, a character set inside an item, a truncated or
unknown structure): the caller then lets pydicom read the sequence.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_HEADER = struct.Struct("<HH2sH")
_MARKER = struct.Struct("<HHL")
_LENGTH32 = struct.Struct("<L")
_LONG_VRS = frozenset(str(vr).encode() for vr in EXPLICIT_VR_LENGTH_32)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_CHARACTER_SET = 0x00080005
#: Nested sequences deeper than this are left to pydicom (the reader already refused deeper).
_MAX_DEPTH = 32


class RawElement(NamedTuple):
    """One element found inside a sequence: its tag, VR and still-encoded value."""

    tag: int
    vr: str
    value: bytes


class _Unjudged(Exception):
    """The bytes hold something left to pydicom."""


def sequence_elements(value: bytes) -> list[RawElement] | None:
    """Every non-sequence element in the items of sequence `value` (Explicit VR Little Endian,
    defined length), at any depth; None when pydicom must read it (see the module docstring)."""
    found: list[RawElement] = []
    try:
        end = _items(value, 0, len(value), found, 0)
    except (_Unjudged, struct.error, UnicodeDecodeError):
        return None
    return found if end == len(value) else None


def _items(data: bytes, pos: int, end: int | None, found: list[RawElement], depth: int) -> int:
    """Walk items from `pos` up to `end` (None: up to and past a sequence delimiter)."""
    if depth > _MAX_DEPTH:
        raise _Unjudged
    limit = len(data) if end is None else end
    while end is None or pos < end:
        if pos + 8 > limit:
            raise _Unjudged
        group, element, length = _MARKER.unpack_from(data, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END and end is None:
            return pos
        if tag != _ITEM:
            raise _Unjudged
        if length == _UNDEFINED:
            pos = _dataset(data, pos, None, found, depth)
        else:
            if pos + length > limit:
                raise _Unjudged
            _dataset(data, pos, pos + length, found, depth)
            pos += length
    return pos


def _dataset(data: bytes, pos: int, end: int | None, found: list[RawElement], depth: int) -> int:
    """Walk one item's elements from `pos` up to `end` (None: up to and past its delimiter)."""
    limit = len(data) if end is None else end
    while end is None or pos < end:
        if pos + 8 > limit:
            raise _Unjudged
        group, element, vr, length = _HEADER.unpack_from(data, pos)
        tag = group << 16 | element
        if tag == _ITEM_END and end is None:
            return pos + 8
        if group == 0xFFFE or tag == _CHARACTER_SET:
            raise _Unjudged
        if vr in _LONG_VRS:
            if pos + 12 > limit:
                raise _Unjudged
            (length,) = _LENGTH32.unpack_from(data, pos + 8)
            pos += 12
        else:
            pos += 8
        if vr == b"SQ":
            if length == _UNDEFINED:
                pos = _items(data, pos, None, found, depth + 1)
                continue
            if pos + length > limit:
                raise _Unjudged
            _items(data, pos, pos + length, found, depth + 1)
        elif length == _UNDEFINED or pos + length > limit:
            raise _Unjudged
        else:
            found.append(RawElement(tag, vr.decode("ascii"), data[pos : pos + length]))
        pos += length
    return pos
