"""The residual-PHI gate: the last check before a file counts as clean.

Before de-identification we collect the identifying values of the input; after it, the output's
bytes (all but the pixel data, which passes through unchanged) are searched for each of them,
case-insensitively. A hit means some path of the rules let an identifier through (a copy in free
text, an element the rules did not expect): the file is quarantined with the element path where
the value sits and the kind of value it is, never the value itself.

Precision matters as much as recall: a gate that quarantines clean files teaches sites to turn
it off. So values come in two strengths (:class:`Strength`):

* **patient** values are the person's own: names and their components, IDs, accession and study
  numbers, birth date, addresses, telephone numbers, every non-standard UID. Found anywhere in the
  output, they are a leak, unless the only place they occur is a value we wrote ourselves (an
  input named "ANONYMIZED" is not leaked by our dummy "ANONYMIZED").
* **context** values may identify indirectly: private text, institution and device identity the
  profile removes, text of public elements the dictionary does not know. They are a leak unless
  every occurrence is in a standard element that the rules keep verbatim (a GE private model
  string equal to Manufacturer's Model Name) or in a value we wrote.

Names and IDs match on token boundaries only ("MARY" is not in "PRIMARY"); values made of digits
and dots must not touch another digit or dot (a short numeric ID is not "found" inside a new UID).
"""

from __future__ import annotations

import enum
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, MutableSequence
from dataclasses import dataclass, field
from functools import lru_cache

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from anonpipe.anon.rawitems import sequence_elements
from anonpipe.anon.values import default_strings, known_tag, uid_strings, values_of

#: Shorter values are not searched: two or three characters match by chance everywhere.
MIN_NEEDLE = 4
#: Values of digits and dots this long are found even where a digit touches them.
LONG_NUMBER = 8


class Strength(enum.IntEnum):
    """How sure we are that a value identifies someone (see the module docstring)."""

    CONTEXT = 1
    PATIENT = 2


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

#: Institution and device identity: context values unless an option keeps them (``kept``).
CONTEXT_KEYWORDS: frozenset[str] = frozenset(
    {
        "IssuerOfPatientID",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "InstitutionCodeSequence",
        "StationName",
        "DeviceSerialNumber",
        "DetectorID",
        "GantryID",
        "PlateID",
        "CassetteID",
        "GeneratorID",
        "DeviceID",
        "SourceSerialNumber",
        "RequestingService",
        "CurrentPatientLocation",
        "AssignedLocation",
        "SourceApplicationEntityTitle",
        "SendingApplicationEntityTitle",
        "ReceivingApplicationEntityTitle",
    }
)

_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "DA", "DT"})
_NAME_PARTS = re.compile(r"[\^=\s,]+")
_STANDARD_UID = "1.2.840.10008."


@dataclass
class Identifiers:
    """Identifying values of one input, each with its strength and where it came from.

    ``source`` names the kind of value for the audit trail (a keyword such as ``PatientID``,
    ``private text``, ``unknown element``), never the value.
    """

    found: dict[str, tuple[Strength, str]] = field(default_factory=dict)

    def add(self, value: str, strength: Strength, source: str) -> None:
        if len(value) < MIN_NEEDLE:
            return
        known = self.found.get(value)
        if known is None or known[0] < strength:
            self.found[value] = (strength, source)

    def update(self, other: Identifiers) -> None:
        for value, (strength, source) in other.found.items():
            self.add(value, strength, source)


def _source_name(element: DataElement) -> str:
    if element.tag.is_private:
        return "private text"
    return element.keyword or "unknown element"


def strength_of(element: DataElement) -> Strength | None:
    """How strongly this element's values identify someone, or None when they do not."""
    tag = element.tag
    if element.VR == "PN" or element.keyword in IDENTIFYING_KEYWORDS:
        return Strength.PATIENT
    if tag.is_private:
        return None if tag.is_private_creator else Strength.CONTEXT
    if element.keyword in CONTEXT_KEYWORDS or not known_tag(int(tag)):
        return Strength.CONTEXT
    return None


def may_identify(element: DataElement) -> bool:
    """Whether the gate collects this element's values (UIDs, names, identifying attributes,
    private and unknown values). The cleaner reports those it keeps on purpose, so they are not
    sought."""
    return element.VR == "UI" or strength_of(element) is not None


def collect_identifiers(
    datasets: Iterable[Dataset], is_kept: Callable[[BaseTag], bool]
) -> Identifiers:
    """The identifying values of the input datasets (file meta, header, trailer), recursively.

    Person names give their components too; other values are sought whole. Elements the profile
    keeps on purpose (``is_kept``, e.g. UIDs under Retain UIDs) are not collected.
    """
    found = Identifiers()
    for dataset in datasets:
        _collect(dataset, is_kept, found)
    return found


def _collect(dataset: Dataset, is_kept: Callable[[BaseTag], bool], found: Identifiers) -> None:
    """Collect from one data set and its items. Still-encoded text is decoded here when the
    character set is a plain one (:func:`_texts_of`): the same texts pydicom would give, without
    building its elements; anything else is read through pydicom."""
    codec = _plain_codec(dataset.original_character_set)
    explicit_little = dataset.original_encoding == (False, True)
    for tag, raw in list(dataset.items()):  # as stored: still encoded or read
        if isinstance(raw, RawDataElement):
            if not _may_identify(int(tag), raw.VR):
                continue  # copied unread by the cleaner (unread_fate): holds no identifier
            if codec is not None and raw.value is not None:
                if raw.VR == "SQ" and explicit_little:
                    if _collect_sequence(raw.value, codec, is_kept, found):
                        continue
                else:
                    texts = _texts_of(raw.VR, raw.value, codec)
                    if texts is not None:
                        if not is_kept(tag):
                            _add_texts(found, int(tag), raw.VR or "", texts)
                        continue
        try:
            element = dataset[tag]
        except Exception:  # a value pydicom cannot convert: its bytes, as text
            if not isinstance(raw, RawDataElement) or raw.value is None:
                continue
            element = DataElement(tag, "UN", bytes(raw.value))
        if element.VR == "SQ":
            for item in element.value or ():
                _collect(item, is_kept, found)
        elif not is_kept(element.tag):
            _add_element(found, element)


def _collect_sequence(
    value: bytes, codec: str, is_kept: Callable[[BaseTag], bool], found: Identifiers
) -> bool:
    """Collect from a still-encoded sequence (:func:`~anonpipe.anon.rawitems.sequence_elements`)
    as :func:`_collect` would from the items pydicom reads; False, collecting nothing, when
    pydicom must read it."""
    elements = sequence_elements(value)
    if elements is None:
        return False
    decoded = []
    for element in elements:
        if not _may_identify(element.tag, element.vr):
            continue
        texts = _texts_of(element.vr, element.value, codec)
        if texts is None:
            return False
        decoded.append((element, texts))
    for element, texts in decoded:
        if not is_kept(BaseTag(element.tag)):
            _add_texts(found, element.tag, element.vr, texts)
    return True


def _add_element(found: Identifiers, element: DataElement) -> None:
    if element.VR == "UI":
        for uid in values_of(element.value):
            text = str(uid).strip("\0 ")
            if not text.startswith(_STANDARD_UID):
                found.add(text, Strength.PATIENT, f"non-standard UID ({element.keyword})")
        return
    strength = strength_of(element)
    if strength is None or not (element.VR in _TEXT_VRS or element.VR == "UN"):
        return
    source = _source_name(element)
    for value in values_of(_as_text(element).value):
        text = str(value).strip("\0 ")
        if not text:
            continue
        found.add(text, strength, source)
        if isinstance(value, PersonName) or element.VR == "PN":
            for part in _NAME_PARTS.split(text):
                found.add(part, strength, source)


def _add_texts(found: Identifiers, tag: int, vr: str, texts: list[str]) -> None:
    """:func:`_add_element` for texts decoded by :func:`_texts_of`."""
    strength, source, keyword = _judged(tag, vr)
    if vr == "UI":
        for text in texts:
            if not text.startswith(_STANDARD_UID):
                found.add(text, Strength.PATIENT, f"non-standard UID ({keyword})")
        return
    if strength is None:
        return
    for text in texts:
        if not text:
            continue
        found.add(text, strength, source)
        if vr == "PN":
            for part in _NAME_PARTS.split(text):
                found.add(part, strength, source)


@lru_cache(maxsize=8192)
def _judged(tag: int, vr: str) -> tuple[Strength | None, str, str]:
    """Strength, source name and keyword of an element, judged as :func:`strength_of` does."""
    element = DataElement(tag, vr, None)
    return strength_of(element), _source_name(element), element.keyword


#: How pydicom decodes each VR: in the data set's character set, or always as ISO 8859-1
#: (:func:`~anonpipe.anon.values.default_strings`); split at backslashes but LT, ST and UT.
_CHARSET_VRS = frozenset({"LO", "SH", "UC", "PN", "LT", "ST", "UT"})
_DEFAULT_VRS = frozenset({"AE", "CS", "DA", "DT", "UI"})
_SINGLE_VALUED = frozenset({"LT", "ST", "UT"})
#: Character sets (pydicom's codec names) decoded by one codec, without escape sequences.
_PLAIN_CODECS = frozenset({"iso8859", "latin_1", "UTF8"})


def _plain_codec(charset: str | MutableSequence[str]) -> str | None:
    """The codec of a single plain character set, or None (ISO 2022 and others: pydicom)."""
    names = (charset,) if isinstance(charset, str) else tuple(charset)
    return _codec_of(names)


@lru_cache(maxsize=64)
def _codec_of(names: tuple[str, ...]) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            codecs = convert_encodings(list(names))
    except Exception:  # an unknown character set: pydicom decides
        return None
    return codecs[0] if len(codecs) == 1 and codecs[0] in _PLAIN_CODECS else None


def _texts_of(vr: str | None, value: bytes, codec: str) -> list[str] | None:
    """The stripped texts pydicom's conversion would give for a still-encoded value, or None
    when this VR or value is left to pydicom (implicit VR, UN, SQ, escape sequences)."""
    if b"\x1b" in value:
        return None
    if vr == "AE":  # pydicom strips each AE value of all whitespace
        return [part.strip().strip("\0 ") for part in value.decode("latin-1").split("\\")]
    if vr == "UI":
        return [uid.strip("\0 ") for uid in uid_strings(value)]
    if vr in _DEFAULT_VRS:
        return [part.strip("\0 ") for part in default_strings(value)]
    if vr not in _CHARSET_VRS:
        return None
    text = value.decode(codec, "replace")
    if vr in _SINGLE_VALUED:
        return [text.strip("\0 ")]
    return [part.strip("\0 ") for part in text.split("\\")]


@lru_cache(maxsize=4096)
def _may_identify(tag: int, vr: str | None) -> bool:
    """Cheap pre-check on a still-encoded element: can it be a needle source at all?"""
    if tag & 1 << 16:
        return True  # private
    if not known_tag(tag):
        return True
    if vr is None:
        vr = dictionary_VR(tag)
    keyword = keyword_for_tag(tag)
    return (
        vr in ("SQ", "UI", "UN", "PN")
        or keyword in IDENTIFYING_KEYWORDS
        or keyword in CONTEXT_KEYWORDS
    )


def _as_text(element: DataElement) -> DataElement:
    """A UN or binary element's bytes as text, so an ID in an unknown VR is still collected."""
    if isinstance(element.value, bytes):
        text = element.value.decode("latin-1").strip("\0 ")
        return DataElement(element.tag, "LO", text.split("\\"))
    return element


# -- the search -------------------------------------------------------------------------------


def _is_word_byte(byte: int) -> bool:
    return byte >= 0x80 or chr(byte).isalnum()


def _is_number_byte(byte: int) -> bool:
    return 0x30 <= byte <= 0x39 or byte == 0x2E


@dataclass(frozen=True, slots=True)
class _Needle:
    raw: bytes
    value: str
    numeric: bool
    bound_start: bool
    bound_end: bool

    def occurs_in(self, haystack: bytes) -> bool:
        """Whether the (lower-cased) needle occurs in `haystack` on token boundaries."""
        touches = _is_number_byte if self.numeric else _is_word_byte
        at = haystack.find(self.raw)
        while at >= 0:
            end = at + len(self.raw)
            ok_start = not self.bound_start or at == 0 or not touches(haystack[at - 1])
            ok_end = not self.bound_end or end >= len(haystack) or not touches(haystack[end])
            if ok_start and ok_end:
                return True
            at = haystack.find(self.raw, at + 1)
        return False


@dataclass(frozen=True, slots=True)
class Needles:
    """Identifying values prepared for a case-insensitive, token-bounded byte search.

    Plain substring tests, not one big regular expression: compiling a pattern per file costs
    more than the search.
    """

    needles: tuple[_Needle, ...]

    def hits(self, blobs: Iterable[bytes]) -> Iterator[str]:
        """Each value found in any blob (lower-cased bytes compared), once, longest first."""
        lowered = [blob.lower() for blob in blobs]
        reported: set[str] = set()
        for needle in self.needles:
            if needle.value in reported:
                continue
            if any(needle.occurs_in(blob) for blob in lowered):
                reported.add(needle.value)
                yield needle.value


def prepare_needles(values: Iterable[str], encodings: Iterable[str] = ("utf-8",)) -> Needles:
    """Encode each value in each encoding, lower-cased, longest first (better audit paths)."""
    encodings = tuple(encodings)
    prepared: dict[bytes, _Needle] = {}
    for value in values:
        digits = value.replace(".", "")
        numeric = not digits or digits.isdigit()  # only digits and dots
        for encoding in encodings:
            try:
                raw = value.lower().encode(encoding)
            except UnicodeEncodeError:
                continue
            if numeric:
                # Short numbers only when no digit or dot touches them (not inside a new UID);
                # long ones (UIDs, long IDs) anywhere: a value's last byte may touch the next
                # element's tag bytes, which can be digits, and chance matches are negligible.
                start = end = len(raw) < LONG_NUMBER
            else:
                start, end = _is_word_byte(raw[0]), _is_word_byte(raw[-1])
            prepared.setdefault(raw, _Needle(raw, value, numeric, start, end))
    ordered = sorted(prepared.values(), key=lambda n: (-len(n.raw), n.raw))
    return Needles(tuple(ordered))


# -- where a value sits in the output, and whether it may sit there ----------------------------


class Place(enum.Enum):
    """What kind of output element holds a found value."""

    WRITTEN = "a value anonpipe wrote"
    STANDARD = "a standard element kept verbatim"
    OTHER = "another element"


@dataclass(frozen=True, slots=True)
class Occurrence:
    path: str
    place: Place


@dataclass(frozen=True, slots=True)
class _Field:
    path: str
    texts: tuple[str, ...]
    standard: bool


class OutputIndex:
    """The text of every element of a cleaned data set, flattened once, to place found values.

    `written` holds the (case-folded) values anonpipe wrote: pseudonyms, dummies, the method.
    """

    def __init__(self, datasets: Iterable[Dataset], written: Iterable[str]) -> None:
        self.written = frozenset(written)
        self._fields: list[_Field] = []
        for dataset in datasets:
            self._flatten(dataset, "")

    def _flatten(self, dataset: Dataset, prefix: str) -> None:
        for element in dataset:
            path = f"{prefix}({element.tag.group:04X},{element.tag.element:04X})"
            if element.VR == "SQ":
                for index, item in enumerate(element.value or ()):
                    self._flatten(item, f"{path}[{index}]")
                continue
            standard = (
                not element.tag.is_private
                and known_tag(int(element.tag))
                and element.VR != "PN"
                and element.keyword not in IDENTIFYING_KEYWORDS
                and element.keyword not in CONTEXT_KEYWORDS
            )
            texts = tuple(_plain(v) for v in values_of(element.value))
            self._fields.append(_Field(path, texts, standard))

    def occurrences(self, value: str) -> list[Occurrence]:
        """Every element whose value holds `value` on token boundaries, and what kind it is."""
        needles = prepare_needles([value], ("utf-8",)).needles
        if not needles:
            return []
        needle = needles[0]
        found = []
        for field_ in self._fields:
            matching = [
                text
                for text in field_.texts
                if needle.occurs_in(text.lower().encode("utf-8", "replace"))
            ]
            if not matching:
                continue
            if all(text.strip().casefold() in self.written for text in matching):
                place = Place.WRITTEN
            else:
                place = Place.STANDARD if field_.standard else Place.OTHER
            found.append(Occurrence(field_.path, place))
        return found


def tolerated(strength: Strength, found: list[Occurrence]) -> bool:
    """Whether a value of `strength` may sit in all these places (see the module docstring).

    A value found in the bytes but in no element (across an element boundary) never is.
    """
    if not found:
        return False
    allowed = {Place.WRITTEN} if strength is Strength.PATIENT else {Place.WRITTEN, Place.STANDARD}
    return all(o.place in allowed for o in found)


def _plain(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, MultiValue | list | DicomSequence):
        return "\\".join(str(v) for v in value)
    return str(value)
