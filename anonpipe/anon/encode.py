"""Encode a cleaned data set: still-encoded elements are copied as bytes, the rest by pydicom.

pydicom's ``write_dataset`` spends most of its time per element on bookkeeping (a buffer, the
character set, checks) even for elements it only copies, and most of a cleaned header is such
elements (see :func:`~anonpipe.anon.clean.unread_fate`). This writer copies those itself, walks
sequences itself, and hands every other element to pydicom's ``write_data_element``; whenever
pydicom would convert the data set first (another encoding or character set) the whole data set
goes to pydicom. The bytes are exactly pydicom's (``tests/anon/test_encode.py`` compares them).
"""

from __future__ import annotations

import struct

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.filewriter import write_dataset as pydicom_write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

Encodings = str | list[str]

_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_MAX = 0xFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: VRs whose str values pydicom writes as the text joined by backslashes, padded to even length
#: (UI with NUL, the others with a space); PN, DS and IS hold other types and go to pydicom.
_PLAIN_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
#: Character sets (as pydicom names the codecs) in which ASCII text is its own bytes.
_ASCII_COMPATIBLE = frozenset({"iso8859", "latin_1", "UTF8", "utf_8"})


class _Layout:
    """Element and item headers packed for one byte order and VR encoding."""

    def __init__(self, implicit: bool, little: bool) -> None:
        order = "<" if little else ">"
        self.implicit = implicit
        self.implicit_header = struct.Struct(order + "HHL").pack  # also items and delimiters
        self.short_header = struct.Struct(order + "HH2sH").pack
        self.long_header = struct.Struct(order + "HH2sHL").pack

    def header(self, tag: int, vr: str, length: int) -> bytes:
        if self.implicit:
            return self.implicit_header(tag >> 16, tag & 0xFFFF, length)
        if vr in _LONG_VRS:
            return self.long_header(tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
        return self.short_header(tag >> 16, tag & 0xFFFF, vr.encode(), length)

    def marker(self, tag: int, length: int) -> bytes:
        return self.implicit_header(tag >> 16, tag & 0xFFFF, length)


def write_dataset(fp: DicomBytesIO, dataset: Dataset, parent_encoding: Encodings) -> None:
    """Write `dataset` to `fp` (whose ``is_implicit_VR``/``is_little_endian`` are set) exactly as
    pydicom's ``write_dataset`` would."""
    layout = _Layout(fp.is_implicit_VR, fp.is_little_endian)
    _write(fp, dataset, parent_encoding, layout)


def _write(fp: DicomBytesIO, dataset: Dataset, parent_encoding: Encodings, layout: _Layout) -> None:
    encoding = (fp.is_implicit_VR, fp.is_little_endian)
    # pydicom's own test (filewriter.write_dataset): then it converts every element first
    if (
        dataset.original_encoding != encoding
        or dataset.original_character_set != dataset._character_set
    ):
        pydicom_write_dataset(fp, dataset, parent_encoding)
        return
    encodings: Encodings = dataset.get("SpecificCharacterSet", parent_encoding)
    codecs = convert_encodings(encodings or [default_encoding])
    ascii_text = set(codecs) <= _ASCII_COMPATIBLE
    for tag, item in sorted(dataset.items(), key=_first):  # as stored: still encoded or read
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are never written (PS3.5 7.2)
        if isinstance(item, RawDataElement) and item.value is None:
            item = dataset.get_item(tag)  # a deferred value: pydicom reads it
        if isinstance(item, RawDataElement):
            if not _copy_raw(fp, item, layout):
                write_data_element(fp, item, encodings)
        elif item.VR == "SQ" and not item.is_empty:
            _write_sequence(fp, item, codecs, layout)
        elif not (ascii_text and _write_text(fp, item, layout)):
            write_data_element(fp, item, encodings)


def _first(pair: tuple[BaseTag, object]) -> int:
    return pair[0]


def _copy_raw(fp: DicomBytesIO, item: RawDataElement, layout: _Layout) -> bool:
    """Copy a still-encoded element as pydicom would; False for the cases left to pydicom
    (undefined length, a VR that must change to UN, a missing VR in an explicit data set)."""
    value = item.value
    if value is None or item.length == _UNDEFINED:
        return False
    vr = item.VR
    explicit_ok = vr is not None and len(vr) == 2 and (vr in _LONG_VRS or len(value) <= _SHORT_MAX)
    if not layout.implicit and not explicit_ok:
        return False
    fp.write(layout.header(item.tag, vr or "", len(value)))
    fp.write(value)
    return True


def _write_text(fp: DicomBytesIO, element: DataElement, layout: _Layout) -> bool:
    """Write an empty element, or one of ASCII str values (what the cleaner writes: UIDs, dates,
    pseudonyms, dummies) as pydicom would; False for anything else."""
    vr, value = element.VR, element.value
    if value is None or value == "":  # emptied: the header alone, whatever the VR
        explicit_ok = len(vr) == 2 and vr != "SQ"
        if element.is_undefined_length or not (layout.implicit or explicit_ok):
            return False
        fp.write(layout.header(int(element.tag), vr, 0))
        return True
    if vr not in _PLAIN_TEXT_VRS:
        return False
    if isinstance(value, str):
        text = value
    elif isinstance(value, MultiValue | list) and all(isinstance(v, str) for v in value):
        text = "\\".join(value)
    else:
        return False
    if not text.isascii() or element.is_undefined_length:
        return False
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    if not layout.implicit and vr not in _LONG_VRS and len(data) > _SHORT_MAX:
        return False
    fp.write(layout.header(int(element.tag), vr, len(data)))
    fp.write(data)
    return True


def _write_sequence(
    fp: DicomBytesIO, element: DataElement, encodings: list[str], layout: _Layout
) -> None:
    """A sequence element: items of defined length (or undefined, as read), as pydicom writes."""
    body = DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = fp.is_implicit_VR, fp.is_little_endian
    for item in element.value:
        start = body.tell()
        body.write(layout.marker(_ITEM, _UNDEFINED))
        _write(body, item, encodings, layout)
        if getattr(item, "is_undefined_length_sequence_item", False):
            body.write(layout.marker(_ITEM_END, 0))
        else:
            end = body.tell()
            body.seek(start)
            body.write(layout.marker(_ITEM, end - start - 8))
            body.seek(end)
    data = body.getvalue()
    undefined = element.is_undefined_length
    fp.write(layout.header(int(element.tag), "SQ", _UNDEFINED if undefined else len(data)))
    fp.write(data)
    if undefined:
        fp.write(layout.marker(_SEQUENCE_END, 0))


#: Meta elements :func:`encode_meta` writes itself; pydicom's ``validate_file_meta`` requires
#: (and would add) these, so with all of them present the two agree.
_META_TEXT = frozenset({0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013})
_META_LAYOUT = _Layout(implicit=False, little=True)
#: (0002,0001) File Meta Information Version 00 01, as pydicom adds it.
_META_VERSION = _META_LAYOUT.header(0x00020001, "OB", 2) + b"\x00\x01"


def encode_meta(file_meta: Dataset) -> bytes | None:
    """The meta group as pydicom's ``write_file_meta_info(enforce_standard=True)`` writes it,
    group length first; None unless `file_meta` holds exactly the elements of :data:`_META_TEXT`,
    each ASCII text (then pydicom must write it)."""
    if set(file_meta.keys()) != _META_TEXT:
        return None
    body = DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = False, True
    body.write(_META_VERSION)
    for tag in sorted(file_meta.keys()):
        element = file_meta.get_item(tag)
        if isinstance(element, RawDataElement) or not element.value:
            return None  # pydicom reads it, or refuses an empty Type 1 element
        if not _write_text(body, element, _META_LAYOUT):
            return None
    data = body.getvalue()
    return _META_LAYOUT.header(0x00020000, "UL", 4) + struct.pack("<L", len(data)) + data
