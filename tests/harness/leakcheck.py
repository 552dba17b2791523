"""An independent definition of a leak: identifying values of an input found in an output's bytes.

This module is the tests' own judge of de-identified output. It shares nothing with the engine's
residual-PHI gate (``anonpipe.anon.residual``): it is written from the rules below, parses with
plain pydicom, and searches raw bytes, so a blind spot of the engine is not repeated here.

**Identifying values of an input** (:func:`identifying_values`), at every sequence depth:

- every value of every element whose VR is PN, whole, and each of its components (split on
  ``^``, ``=`` and whitespace);
- every value of Patient ID, Other Patient IDs, Issuer of Patient ID, Accession Number, Study ID,
  Requested Procedure ID, Admission ID, Patient's Birth Date, Patient's Address, Patient's
  Telephone Numbers, Patient's Telecom Information, Person's Address, Person's Telephone Numbers,
  Person's Telecom Information, Referring Physician's Address and Telephone Numbers, Medical
  Record Locator, Institution Name, Institution Address, Station Name and Device Serial Number
  (the last four name the site and its devices: the basic profile removes them). The items of
  Other Patient IDs Sequence are covered by the walk;
- every value of every element whose VR is UI that does not start with ``1.2.840.10008.`` (a UID
  the standard defines), and from the file meta only Media Storage SOP Instance UID.

Values are stripped of spaces and NULs; a value (or component) shorter than
:data:`MIN_LENGTH` characters is not searched: it would match by chance everywhere. Nor is a
de-identification placeholder (:data:`PLACEHOLDERS`, e.g. a Patient's Name already
``Anonymized``): de-identifiers write these words themselves, so finding one proves nothing.

**The bytes searched**: the whole output file, file meta included, with the value of the
top-level Pixel Data element (7FE0,0010), native or encapsulated, replaced by one NUL byte
(:func:`pixel_free_bytes`; pixel data is copied unchanged from the input and is not text). A
deflated data set is searched inflated; elements after the pixel data are searched. A NUL is
inserted at the start and the end of every element value, at every sequence depth, so the
binary tag and length bytes around a value (``2`` is the first byte of tag (0032,xxxx), a length
of 48 is ``0``) never decide a boundary.

**Product names are not searched.** An output value of Manufacturer (0008,0070) or Manufacturer's
Model Name (0008,1090), at any depth, that equals one of the input's values of these attributes
(:func:`product_names`) is blanked: PS3.15 keeps them, and a site named like its vendor
(Institution Name ``TOSHIBA``, Manufacturer ``TOSHIBA_MEC``) does not leak through them. Only
those element values are blanked: the same string in any other element is still found.

**A match** (:func:`find_leaks`) is case-insensitive (ASCII case folding), with the value encoded
as UTF-8, as Latin-1 and in the output's Specific Character Set, and must sit on a boundary:

- a value containing a letter must not have a letter or digit immediately before or after it
  (bytes >= 0x80 count as letters), so ``JOHN`` is not found in ``JOHNSON``;
- a value made only of digits and dots (numeric IDs, dates, UIDs) must not have a digit or a
  dot immediately before or after it, so a short numeric ID is not found inside a long new UID;
- any other value (digits with punctuation, such as a telephone number) must not have a letter or
  digit immediately before or after it.
"""

from __future__ import annotations

import contextlib
import re
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

__all__ = [
    "IDENTIFYING_KEYWORDS",
    "MIN_LENGTH",
    "PLACEHOLDERS",
    "find_leaks",
    "identifying_values",
    "iter_elements",
    "pixel_free_bytes",
    "product_names",
]

MIN_LENGTH = 4

#: Values that are placeholders, not identifiers (compared case-insensitively).
PLACEHOLDERS: frozenset[str] = frozenset(
    {"anon", "anonymized", "anonymised", "anonymous", "removed", "deleted", "unknown", "redacted"}
)

IDENTIFYING_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "AccessionNumber",
        "StudyID",
        "RequestedProcedureID",
        "AdmissionID",
        "PatientBirthDate",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "PersonAddress",
        "PersonTelephoneNumbers",
        "PersonTelecomInformation",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "MedicalRecordLocator",
        "InstitutionName",
        "InstitutionAddress",
        "StationName",
        "DeviceSerialNumber",
    }
)

STANDARD_UID_ROOT = "1.2.840.10008."
PIXEL_DATA = 0x7FE00010
_SPECIFIC_CHARACTER_SET = 0x00080005
_PRODUCT_TAGS = frozenset({0x00080070, 0x00081090})
_UNDEFINED = 0xFFFFFFFF
_COMPONENT_SPLIT = re.compile(r"[\^=\s]+")
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_LETTER = re.compile(r"[^\W\d_]")
_NUMERIC = re.compile(r"[0-9.]+")
_WORD_BYTES = rb"A-Za-z0-9\x80-\xff"


def _vr(ds: Dataset, tag: int) -> str | None:
    """The element's VR without converting its value: as encoded, else from the dictionary."""
    raw_vr = ds.get_item(tag).VR
    if raw_vr in (None, "UN"):
        try:
            return str(dictionary_VR(tag))
        except KeyError:
            return None if raw_vr is None else str(raw_vr)
    return str(raw_vr)


def iter_elements(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, DataElement]]:
    """``(path, element)`` for every element of `ds` at every depth, pixel data excluded.

    Only elements that can hold text or UIDs are converted (binary values are never read into
    Python objects); an element pydicom cannot convert is skipped. Paths look like
    ``OtherPatientIDsSequence[0].PatientID``.
    """
    for tag in list(ds.keys()):
        if tag == PIXEL_DATA:
            continue
        vr = _vr(ds, tag)
        if vr is None or vr in _BINARY_VRS:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                element = ds[tag]
        except Exception:  # a value pydicom cannot convert: nothing to learn from it here
            continue
        name = element.keyword or f"({tag.group:04X},{tag.element:04X})"
        path = f"{prefix}{name}"
        yield path, element
        if element.VR == "SQ" and element.value is not None:
            for index, item in enumerate(element.value):
                yield from iter_elements(item, f"{path}[{index}].")


def _strings(element: DataElement) -> Iterator[str]:
    value = element.value
    if value is None or isinstance(value, bytes | bytearray):
        return
    values = value if element.VM > 1 else [value]
    for v in values:
        text = str(v).strip(" \x00")
        if text:
            yield text


def _needles(element: DataElement) -> Iterator[str]:
    keyword = element.keyword or keyword_for_tag(element.tag)
    if element.VR == "PN":
        for text in _strings(element):
            yield text
            yield from _COMPONENT_SPLIT.split(text)
    elif element.VR == "UI":
        for text in _strings(element):
            if not text.startswith(STANDARD_UID_ROOT):
                yield text
    elif keyword in IDENTIFYING_KEYWORDS:
        yield from _strings(element)


def identifying_values(path: Path) -> dict[str, set[str]]:
    """The identifying values of the DICOM file at `path` -> the element paths they sit in.

    See the module docstring for what counts. Parsed with ``dcmread(force=True)``; large
    values (pixel data) are deferred and never read.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True, defer_size="256 KB")
    found: dict[str, set[str]] = {}

    def add(value: str, where: str) -> None:
        value = value.strip(" \x00")
        if len(value) >= MIN_LENGTH and value.casefold() not in PLACEHOLDERS:
            found.setdefault(value, set()).add(where)

    for where, element in iter_elements(ds):
        for value in _needles(element):
            add(value, where)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        uid = str(meta.MediaStorageSOPInstanceUID)
        if not uid.startswith(STANDARD_UID_ROOT):
            add(uid, "file meta MediaStorageSOPInstanceUID")
    return found


PRODUCT_KEYWORDS = frozenset({"Manufacturer", "ManufacturerModelName"})


def product_names(path: Path) -> set[str]:
    """The values of Manufacturer and Manufacturer's Model Name of `path`, at every depth."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True, defer_size="256 KB")
    return {
        text
        for _, element in iter_elements(ds)
        if element.keyword in PRODUCT_KEYWORDS
        for text in _strings(element)
    }


def _file_meta(data: bytes) -> tuple[int, str]:
    """Offset of the data set after preamble and file meta, and the transfer syntax.

    Without a preamble and meta: offset 0 and Implicit VR Little Endian (the default).
    """
    if data[128:132] != b"DICM":
        return 0, ImplicitVRLittleEndian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp = BytesIO(data)
        fp.seek(132)
        meta = _read_file_meta_info(fp)
    return fp.tell(), str(meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))


def _is_sequence(raw: RawDataElement) -> bool:
    if raw.VR == "SQ":
        return True
    if raw.VR in (None, "UN"):
        try:
            return bool(dictionary_VR(raw.tag) == "SQ")
        except KeyError:
            return False
    return False


@dataclass
class _Walk:
    """Value boundaries and product-name values found while walking an encoded data set."""

    fp: BytesIO
    little: bool
    marks: set[int] = field(default_factory=set)
    products: list[tuple[int, int]] = field(default_factory=list)

    def elements(self, elements: Iterable[RawDataElement | DataElement], implicit: bool) -> None:
        for element in elements:
            if isinstance(element, DataElement):  # an undefined-length sequence, already read
                if element.VR == "SQ" and element.value is not None:
                    for item in element.value:
                        self.elements(_raw_items(item), implicit)
                continue
            start = element.value_tell or 0
            self.marks.add(start)
            if element.length == _UNDEFINED:
                continue
            self.marks.add(start + element.length)
            if element.tag in _PRODUCT_TAGS:
                self.products.append((start, start + element.length))
            if element.length and _is_sequence(element):
                # a sequence encoded as UN is Implicit VR Little Endian inside (PS3.5 6.2.2)
                nested = implicit or element.VR == "UN"
                self.fp.seek(start)
                try:
                    items = read_sequence(
                        self.fp, nested, self.little or nested, element.length, "iso8859"
                    )
                except Exception:  # not parseable as items: its bytes are searched as they are
                    continue
                for item in items:
                    self.elements(_raw_items(item), nested)


def _raw_items(ds: Dataset) -> list[RawDataElement | DataElement]:
    """The elements of `ds` as read (raw, not converted)."""
    return [ds.get_item(tag) for tag in list(ds.keys())]


@dataclass
class _Scanned:
    pixel_free: bytes  # the file, pixel data value cut out (replaced by one NUL)
    searched: bytes  # the same with a NUL at every value boundary and product names blanked
    charset: list[str]


def _joined(data: bytes, marks: Iterable[int], cut: tuple[int, int] | None) -> bytes:
    """`data` with a NUL inserted at every mark and ``data[cut[0]:cut[1]]`` replaced by one."""
    points = set(marks)
    if cut is not None:
        points.add(cut[0])
    out = bytearray()
    prev = 0
    for mark in sorted(points):
        if mark <= prev or mark >= len(data) or (cut and cut[0] < mark < cut[1]):
            continue
        out += data[prev:mark] + b"\x00"
        prev = cut[1] if cut and mark == cut[0] else mark
    out += data[prev:]
    return bytes(out)


def _scan(path: Path, products: Iterable[str] = ()) -> _Scanned:
    data = path.read_bytes()
    start, syntax = _file_meta(data)
    head, body = data[:start], data[start:]
    if syntax == DeflatedExplicitVRLittleEndian:
        body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
    implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    charset: list[str] = ["iso8859"]
    cut: tuple[int, int] | None = None
    top: list[RawDataElement | DataElement] = []
    head_walk = _Walk(BytesIO(head), True)
    walk = _Walk(BytesIO(body), little)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if start:
            fp = BytesIO(head)
            fp.seek(132)
            head_walk.elements(data_element_generator(fp, False, True), False)
        fp = BytesIO(body)
        for raw in data_element_generator(fp, implicit, little, defer_size=1024):
            if raw.tag == PIXEL_DATA:
                # the generator stands just past the value (and the delimiter, if encapsulated)
                cut = (getattr(raw, "value_tell", 0) or 0, fp.tell())
                continue
            if raw.tag == _SPECIFIC_CHARACTER_SET and isinstance(raw.value, bytes):
                text = raw.value.decode("ascii", "replace").strip(" \x00")
                charset = convert_encodings([p.strip() for p in text.split("\\")])
            top.append(raw)
        walk.elements(top, implicit)
    wanted = {e.strip(b" \x00").lower() for p in products for e in _encodings(p, charset)}
    blanked = bytearray(body)
    for begin, end in walk.products:
        if bytes(blanked[begin:end]).strip(b" \x00").lower() in wanted:
            blanked[begin:end] = bytes(end - begin)
    return _Scanned(
        pixel_free=head + _joined(body, (), cut),
        searched=_joined(head, head_walk.marks, None) + _joined(bytes(blanked), walk.marks, cut),
        charset=charset,
    )


def pixel_free_bytes(path: Path) -> bytes:
    """The bytes of the DICOM file `path` without the value of its top-level Pixel Data.

    The value (native, or the items and delimiter of encapsulated data) is replaced by a single
    NUL, so no match can form across the cut; a deflated data set is returned inflated.
    """
    return _scan(path).pixel_free


def _encodings(value: str, charset: list[str]) -> set[bytes]:
    encoded: set[bytes] = set()
    for codec in ("utf-8", "latin-1"):
        with contextlib.suppress(UnicodeEncodeError):
            encoded.add(value.encode(codec))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoded.add(encode_string(value, charset))
    except Exception:  # a charset pydicom cannot encode this value in
        pass
    return {e for e in encoded if len(e) >= MIN_LENGTH}


def _pattern(value: str, needle: bytes) -> re.Pattern[bytes]:
    body = re.escape(needle)
    if _LETTER.search(value) is None and _NUMERIC.fullmatch(value):
        return re.compile(rb"(?<![0-9.])" + body + rb"(?![0-9.])", re.IGNORECASE)
    word = _WORD_BYTES
    return re.compile(rb"(?<![" + word + rb"])" + body + rb"(?![" + word + rb"])", re.IGNORECASE)


def find_leaks(values: Iterable[str], output_path: Path, products: Iterable[str] = ()) -> set[str]:
    """The `values` found in the bytes of `output_path` (rules: module docstring).

    `products` are the input's :func:`product_names`: an output Manufacturer or Manufacturer's
    Model Name value equal to one of them is not searched.
    """
    scanned = _scan(output_path, products)
    haystack = scanned.searched
    lowered = haystack.lower()
    leaks: set[str] = set()
    for value in values:
        if len(value) < MIN_LENGTH:
            continue
        for needle in _encodings(value, scanned.charset):
            if needle.lower() in lowered and _pattern(value, needle).search(haystack):
                leaks.add(value)
                break
    return leaks


def _every_element(ds: Dataset, path: str = "") -> Iterator[tuple[str, DataElement]]:
    """Every element at every depth, binary ones included, with a ``tag[i] > tag`` path."""
    for element in ds:
        where = f"{path}{element.tag}"
        yield where, element
        if element.VR == "SQ":
            for index, item in enumerate(element.value or ()):
                yield from _every_element(item, f"{where}[{index}] > ")


def describe_holders(path: Path, needles: Iterable[str]) -> str:
    """Which elements of the file `path` (meta included) hold the `needles`, with tag, VR and
    keyword: for a failure message (it tells a tag that a bit flip renamed from a rule's gap)."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        return f"(unreadable: {type(exc).__name__})"
    meta = getattr(ds, "file_meta", None)
    elements = [*(_every_element(meta) if meta is not None else ()), *_every_element(ds)]
    found = []
    for where, element in elements:
        try:
            value = element.value
            raw = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
        except Exception:
            continue
        for needle in sorted(needles):
            if needle.encode() in raw:
                found.append(f"{where} {element.VR} {element.keyword or '(unknown)'}: {needle}")
    return "; ".join(found) or "(outside any element pydicom reads)"
