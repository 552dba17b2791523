"""The residual-PHI gate: the last check before a file counts as clean.

Before de-identification we collect every identifying value of the input (names and their
components, IDs, accession numbers, addresses, phone numbers, birth date, every non-standard UID,
private text); after it, the output's bytes (all but the pixel data, which passes through
unchanged) are searched for each of them, case-insensitively. A hit means some path of the rules
let an identifier through (a copy in free text, an unknown element): the file is quarantined with
the element path where the value sits, never the value itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from anonpipe.anon.values import values_of

#: Shorter values are not searched: two or three characters match by chance everywhere.
MIN_NEEDLE = 4

#: Attributes whose values identify the patient, the encounter or the staff, by keyword.
IDENTIFYING_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientName",
        "PatientID",
        "OtherPatientIDs",
        "OtherPatientNames",
        "OtherPatientIDsSequence",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientBirthDate",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "MedicalRecordLocator",
        "MilitaryRank",
        "AccessionNumber",
        "StudyID",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "PerformedProcedureStepID",
        "AdmissionID",
        "ReferringPhysicianName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "RequestingPhysician",
        "PhysiciansOfRecord",
        "OperatorsName",
        "InstitutionAddress",
        "ResponsiblePerson",
        "ResponsibleOrganization",
        "PersonName",
        "PersonAddress",
        "PersonTelephoneNumbers",
        "VerifyingObserverName",
        "ContentCreatorName",
        "ScheduledPerformingPhysicianName",
        "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest",
    }
)

_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "DA", "DT"})
_SPLIT = re.compile(r"[\^=\s,]+")
_STANDARD_UID = "1.2.840.10008."


def _needles_of(element: DataElement) -> Iterator[str]:
    for value in values_of(element.value):
        text = str(value).strip()
        if not text:
            continue
        yield text
        if isinstance(value, PersonName) or element.VR in ("PN", "LO", "SH", "ST", "LT", "UT"):
            yield from (part for part in _SPLIT.split(text) if part)


def collect_identifiers(
    datasets: Iterable[Dataset], is_kept: Callable[[BaseTag], bool]
) -> set[str]:
    """Every identifying value of the input datasets (file meta, header, trailer), recursively.

    Besides the :data:`IDENTIFYING_KEYWORDS`, this takes every non-standard UID and every text
    value of a private element (private blocks are where vendors hide names and IDs). Elements
    the profile keeps on purpose (``is_kept``, e.g. UIDs under Retain UIDs) are not collected.
    """
    found: set[str] = set()
    for dataset in datasets:
        for element in _walk(dataset):
            if is_kept(element.tag):
                continue
            if element.VR == "UI":
                found.update(
                    str(v) for v in values_of(element.value) if not str(v).startswith(_STANDARD_UID)
                )
            elif _identifying(element) and (element.VR in _TEXT_VRS or element.VR == "UN"):
                found.update(_needles_of(_as_text(element)))
    return {needle for needle in found if len(needle) >= MIN_NEEDLE}


@lru_cache(maxsize=4096)
def _may_identify(tag: int, vr: str | None) -> bool:
    """Cheap pre-check on a still-encoded element: can it be a needle source at all?"""
    if tag & 1 << 16:
        return True  # private
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return True
    return vr in ("SQ", "UI", "UN", "PN") or keyword_for_tag(tag) in IDENTIFYING_KEYWORDS


def may_identify(element: DataElement) -> bool:
    """Whether the gate collects this element's values: UIDs, names, identifying attributes and
    private values. The cleaner reports the ones it keeps on purpose, so they are not sought."""
    return element.VR == "UI" or _identifying(element)


def _identifying(element: DataElement) -> bool:
    if element.VR == "PN" or element.keyword in IDENTIFYING_KEYWORDS:
        return True
    return bool(element.tag.is_private and not element.tag.is_private_creator)


def _as_text(element: DataElement) -> DataElement:
    """A UN element's bytes as text, so a private ID in an unknown VR is still collected."""
    if element.VR == "UN" and isinstance(element.value, bytes):
        text = element.value.decode("latin-1").strip("\0 ")
        return DataElement(element.tag, "LO", text)
    return element


def _walk(dataset: Dataset) -> Iterator[DataElement]:
    """Every element that may hold an identifier, sequences flattened; elements the cleaner
    copied unread (:func:`~anonpipe.anon.clean.unread_fate`: no identifiers) stay unread."""
    for tag in dataset.keys():  # noqa: SIM118 - a Dataset iterates elements, not tags
        item = dataset.get_item(tag)
        if isinstance(item, RawDataElement) and not _may_identify(int(tag), item.VR):
            continue
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value or ():
                yield from _walk(item)
        else:
            yield element


@dataclass(frozen=True, slots=True)
class Needles:
    """Identifying values prepared for a case-insensitive byte search.

    A needle of digits and dots (an ID, a date, a UID) only matches when no digit or dot
    touches it, so a short numeric ID is not "found" inside a new 39-digit UID. Plain substring
    tests, not one big regular expression: compiling a pattern per file costs more than the search.
    """

    text: tuple[bytes, ...]
    numeric: tuple[bytes, ...]

    def find(self, blobs: Iterable[bytes]) -> str | None:
        """The first needle found in any blob (decoded as latin-1), or None."""
        for blob in blobs:
            lowered = blob.lower()
            for needle in self.text:
                if needle in lowered:
                    return needle.decode("latin-1")
            for needle in self.numeric:
                if _bounded(lowered, needle):
                    return needle.decode("latin-1")
        return None


def _bounded(haystack: bytes, needle: bytes) -> bool:
    at = haystack.find(needle)
    while at >= 0:
        before = haystack[at - 1 : at] if at else b""
        after = haystack[at + len(needle) : at + len(needle) + 1]
        if not (before.isdigit() or before == b".") and not (after.isdigit() or after == b"."):
            return True
        at = haystack.find(needle, at + 1)
    return False


def prepare_needles(needles: Iterable[str], encodings: Iterable[str] = ("utf-8",)) -> Needles:
    """Encode each needle in each encoding, lower-cased, longest first (better audit paths)."""
    text: set[bytes] = set()
    numeric: set[bytes] = set()
    for needle in needles:
        for encoding in encodings:
            try:
                raw = needle.lower().encode(encoding)
            except UnicodeEncodeError:
                continue
            (numeric if all(c.isdigit() or c == "." for c in needle) else text).add(raw)

    def order(items: set[bytes]) -> tuple[bytes, ...]:
        return tuple(sorted(items, key=lambda n: (-len(n), n)))

    return Needles(order(text), order(numeric))


def locate(dataset: Dataset, needle: str, prefix: str = "") -> str | None:
    """The tag path of the first element whose value contains `needle`, for the audit trail."""
    lowered = needle.lower()
    for element in dataset:
        path = f"{prefix}({element.tag.group:04X},{element.tag.element:04X})"
        if element.VR == "SQ":
            for index, item in enumerate(element.value or ()):
                found = locate(item, needle, f"{path}[{index}]")
                if found:
                    return found
        elif lowered in _plain(element.value).lower():
            return path
    return None


def _plain(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, MultiValue | list | DicomSequence):
        return "\\".join(str(v) for v in value)
    return str(value)
