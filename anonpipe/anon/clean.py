"""Apply the profile to a data set: every element, every sequence item, at every depth.

The rules are data (:mod:`anonpipe.anon.profile`); this module only says what each action does to
an element of a given VR. Decisions of ours, beyond Table E.1-1:

* Patient Name, Patient ID, Accession Number and Study ID get keyed pseudonyms from the identity
  store instead of being emptied, so a patient keeps one pseudonym across studies and runs and
  the identity store can link them back;
* a sequence is only removed when its action is X; otherwise it is kept and cleaned item by item;
* a UID not listed in the table is still replaced unless it is a DICOM standard UID
  (1.2.840.10008.*): a stray instance UID must not survive, and keyed replacement keeps references;
* every DA and the date part of every DT that survives the rules is shifted by the patient's
  offset (dates = shift), kept (keep) or emptied (remove), so no original date survives;
* Clean (C) without a cleaner for the value falls back to the basic action: descriptors on the
  limited vocabulary are kept verbatim, anything else is removed as the basic profile says;
* a public element the dictionary does not know (and any sequence of that kind, with everything
  nested in it), one whose explicit VR contradicts the dictionary, and a binary one whose value
  count contradicts the dictionary's multiplicity or that holds text are removed: we cannot judge
  what they hold (a tag corrupted in transit can carry a patient ID anywhere). A known element
  stored as UN (by a PACS that did not know it) is read with the dictionary's VR and judged as
  that; one still UN once read is removed.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag

from anonpipe.anon.identity import IdentityStore, PatientPseudonym
from anonpipe.anon.profile import Action, Profile, presence_rules
from anonpipe.anon.residual import CONTEXT_KEYWORDS, IDENTIFYING_KEYWORDS, may_identify
from anonpipe.anon.values import default_strings, known_tag, uid_strings, values_of
from anonpipe.anon.vocabulary import Vocabulary

STANDARD_UID_ROOT = "1.2.840.10008."

#: Identity-store table that records each replaced UID, by the attribute holding it.
UID_KINDS: dict[int, str] = {
    0x0020000D: "studyuid",
    0x0020000E: "seriesuid",
    0x00080018: "sopinstanceuid",
    0x00081155: "sopinstanceuid",  # Referenced SOP Instance UID
    0x00020003: "sopinstanceuid",  # Media Storage SOP Instance UID
    0x00200052: "frameofreferenceuid",
    0x30060024: "frameofreferenceuid",  # Referenced Frame of Reference UID
}

#: Dummy values (action D) per VR; UIDs are replaced, sequences cleaned, others emptied.
DUMMY_BY_VR: dict[str, Any] = {
    "AE": "ANONYMIZED",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UT": "ANONYMIZED",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
}

_DATE_OPTION = "retain_longitudinal_modified_dates"

#: Patient Name, Patient ID, Accession Number, Study ID: replaced by keyed pseudonyms.
PSEUDONYM_TAGS = frozenset({0x00100010, 0x00100020, 0x00080050, 0x00200010})

#: Text anonpipe writes whatever the input (case-folded): the residual gate does not count an
#: input value equal to one of these as leaked where the output holds our value.
DUMMY_TEXTS: frozenset[str] = frozenset(
    str(v).casefold() for v in DUMMY_BY_VR.values() if isinstance(v, str)
)


class _Needs(enum.Enum):
    """Returned by :meth:`Cleaner._unread` when the element must be read after all."""

    READ = "read"


_Decision = DataElement | RawDataElement | None | _Needs


class ElementError(Exception):
    """Cleaning failed at one element; ``path`` is its tag path, ``kind`` the exception type.

    Carries no value (values may be PHI), so it is safe for the audit trail and logs.
    """

    def __init__(self, kind: str, path: str) -> None:
        super().__init__(f"{kind} at {path}")
        self.kind = kind
        self.path = path


def tag_text(tag: int) -> str:
    """``(gggg,eeee)``: how the audit trail names an element."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides how a file is cleaned, apart from the identity store."""

    profile: Profile
    dates: str
    vocabulary: Vocabulary = field(default_factory=Vocabulary)
    safe_private: frozenset[str] = frozenset()


class Cleaner:
    """Clean the data sets of one file for one patient; remembers what it kept verbatim.

    ``kept`` (tags copied unchanged although identifying or private) tells the residual-PHI gate
    which input values it should not look for: the profile kept them on purpose. ``written``
    holds the (case-folded) replacement texts it wrote: pseudonyms and dummies.
    """

    def __init__(self, recipe: Recipe, store: IdentityStore, patient: PatientPseudonym) -> None:
        self.recipe = recipe
        self.store = store
        self.patient = patient
        self.kept: set[BaseTag] = set()
        self.written: set[str] = set(DUMMY_TEXTS)
        self._pseudonyms: dict[int, Callable[[str], str]] = {  # keys: PSEUDONYM_TAGS
            0x00100010: self._patient_name,
            0x00100020: lambda _original: patient.patient_id,
            0x00080050: store.accession,
            0x00200010: store.study_id,
        }

    def dataset(self, source: Dataset) -> Dataset:
        """A cleaned copy of `source`; `source` is not changed.

        Elements that pass unchanged whatever their value (see :func:`unread_fate`) are copied
        still encoded, so pydicom neither decodes nor re-encodes them: most of a header.
        """
        elements: dict[BaseTag, DataElement | RawDataElement] = {}
        sequences: list[DataElement] = []
        profile = self.recipe.profile
        # items() gives the elements as stored (still encoded or read), without get_item's cost
        for tag, item in list(source.items()):
            raw = item if isinstance(item, RawDataElement) and item.value is not None else None
            if raw is not None:
                fate = unread_fate(profile, int(tag), raw.VR)
                if fate == "copy":
                    if _plausible(int(tag), raw.VR, raw.value):
                        elements[tag] = raw
                    continue
                if fate == "drop":
                    continue
            try:
                if raw is not None:
                    decided = self._unread(int(tag), raw)
                    if decided is not _Needs.READ:
                        if decided is not None:
                            elements[tag] = decided
                        continue
                element = source[tag]
                cleaned = self.element(element, source)
            except ElementError as exc:
                raise ElementError(exc.kind, tag_text(tag) + exc.path) from exc
            except Exception as exc:  # pydicom cannot convert or the value is unusable
                raise ElementError(type(exc).__name__, tag_text(tag)) from exc
            if cleaned is None:
                continue
            if cleaned is element and raw is not None and _verbatim(raw, element):
                elements[tag] = raw  # kept as it was: its bytes as read, not re-encoded
            elif cleaned.VR == "SQ":
                sequences.append(cleaned)
            else:
                elements[cleaned.tag] = cleaned
        # items inherit the character set they were read with, so their raw values stay valid
        out = Dataset(elements, parent_encoding=source.original_character_set)
        implicit, little = source.original_encoding
        out.set_original_encoding(implicit, little, source.original_character_set)
        for sequence in sequences:  # through pydicom, which hands items the Pixel Representation
            out.add(sequence)
        return out

    def _unread(self, tag: int, raw: RawDataElement) -> _Decision:
        """What :meth:`element` would return for a listed element whose action needs no value
        (empty, dummy, keep, clean without a white list), decided on the still-encoded element;
        ``_Needs.READ`` when the value is needed or pydicom must judge (implicit VR, UN, SQ,
        pseudonyms, UIDs, dates, implausible bytes)."""
        vr = raw.VR
        if vr is None or vr in _READ_VRS or tag in PSEUDONYM_TAGS or tag & 1 << 16:
            return _Needs.READ
        rule = self.recipe.profile.rule(tag)
        if rule is None:
            return self._unread_unlisted(tag, raw, vr)
        if not _vr_agrees(tag, vr):
            return _Needs.READ
        action = rule.action
        if action is Action.CLEAN:
            if rule.option == _DATE_OPTION or vr in ("DA", "DT", "TM"):
                action = Action.KEEP  # as _clean_action: dates are then shifted, times kept
            elif self.recipe.vocabulary.allowed.get(tag):
                return _Needs.READ  # the white list judges the value
            else:
                action = rule.basic
        if action is Action.REMOVE:
            return None
        if action is Action.EMPTY:
            return _written(tag, vr, None)
        if action is Action.REPLACE_UID or (action is Action.DUMMY and vr == "UI"):
            return self._uids_of(tag, raw)
        if action is Action.DUMMY:
            return _written(tag, vr, DUMMY_BY_VR.get(vr))
        if vr in ("DA", "DT"):
            return self._date_of(tag, raw, vr)
        if action is Action.KEEP and _plausible(tag, vr, raw.value) and _verbatim_raw(raw):
            if _may_identify(tag, vr):
                self.kept.add(BaseTag(tag))
            return raw
        return _Needs.READ

    def _unread_unlisted(self, tag: int, raw: RawDataElement, vr: str) -> _Decision:
        """:meth:`_unlisted` on a still-encoded element: UIDs, dates and plausible text."""
        if vr == "UN" or not _judgeable(tag, vr):
            return None
        if vr == "UI":
            return self._uids_of(tag, raw)
        if vr in ("DA", "DT"):
            return self._date_of(tag, raw, vr)
        if vr in _UNLISTED_VERBATIM and _plausible(tag, vr, raw.value) and _verbatim_raw(raw):
            return raw
        return _Needs.READ

    def _uids_of(self, tag: int, raw: RawDataElement) -> DataElement | _Needs:
        """:meth:`_uids` of a still-encoded UI element."""
        if raw.value is None:
            return _Needs.READ
        return self._new_uids(tag, uid_strings(raw.value))

    def _date_of(
        self, tag: int, raw: RawDataElement, vr: str
    ) -> DataElement | RawDataElement | _Needs:
        """:meth:`_date` of a still-encoded DA or DT element."""
        if raw.value is None or (self.recipe.dates == "keep" and not _verbatim_raw(raw)):
            return _Needs.READ
        if self.recipe.dates == "keep":
            if _may_identify(tag, vr):
                self.kept.add(BaseTag(tag))
            return raw
        return self._new_date(tag, vr, default_strings(raw.value))

    def keep_required(self, source: Dataset, cleaned: Dataset) -> None:
        """Put back, empty, the attributes an IOD requires while a condition on `source` holds
        (``presence`` in ``supplement.json``), where the rules removed them."""
        for rule in presence_rules():
            if not any(tag in source for tag in rule.when):
                continue
            for tag in rule.tags:
                if tag in source and tag not in cleaned:
                    vr = dictionary_VR(tag)
                    cleaned.add(DataElement(tag, vr, DicomSequence() if vr == "SQ" else None))

    def element(self, element: DataElement, parent: Dataset) -> DataElement | None:
        """The cleaned element, or None when it must go."""
        tag = element.tag
        if tag.element == 0 or tag.group in NOT_IN_A_DATASET:
            return None  # group lengths (recomputed), stray command or file meta elements
        if tag.is_private:
            return self._private(element, parent)
        rule = self.recipe.profile.rule(tag)
        if rule is None:
            return self._unlisted(element)
        if rule.action is Action.REMOVE and int(tag) not in PSEUDONYM_TAGS:
            return None
        if not _vr_agrees(int(tag), element.VR):
            # A listed (possibly identifying) element whose VR contradicts the dictionary: its
            # bytes mean something else than the rule expects, so no rule can be applied safely.
            raise ElementError(f"VR {element.VR} where the dictionary has another", "")
        pseudonym = self._pseudonyms.get(int(tag))
        if pseudonym is not None and rule.action is not Action.KEEP:
            text = str(element.value or "").strip()
            if not text:
                return DataElement(tag, element.VR, None)
            new = pseudonym(text)
            self.written.add(new.casefold())
            return DataElement(tag, element.VR, new)
        action = rule.action
        if action is Action.CLEAN:
            action = self._clean_action(element, rule.option, rule.basic)
        return self._apply(element, action)

    def _apply(self, element: DataElement, action: Action) -> DataElement | None:
        tag, vr = element.tag, element.VR
        if action is Action.REMOVE:
            return None
        if action is Action.EMPTY:
            return DataElement(tag, vr, DicomSequence() if vr == "SQ" else None)
        if vr == "SQ":  # D, K, C, U: keep the sequence, clean its items
            return self._sequence(element)
        if action is Action.REPLACE_UID or (action is Action.DUMMY and vr == "UI"):
            return self._uids(element)
        if action is Action.DUMMY:
            return DataElement(tag, vr, DUMMY_BY_VR.get(vr))
        if vr in ("DA", "DT"):  # KEEP, or CLEAN that kept the value
            return self._date(element)
        if may_identify(element):
            self.kept.add(tag)
        return element

    def _clean_action(self, element: DataElement, option: str | None, basic: Action) -> Action:
        """Resolve C: shift dates, keep white-listed descriptors, else the basic action."""
        if option == _DATE_OPTION or element.VR in ("DA", "DT", "TM"):
            return Action.KEEP  # _apply shifts DA/DT; times are kept when dates shift
        if element.VR == "SQ":
            return Action.KEEP
        if self.recipe.vocabulary.allows(int(element.tag), element.value):
            self.kept.add(element.tag)
            return Action.KEEP
        return basic

    def _unlisted(self, element: DataElement) -> DataElement | None:
        vr = element.VR
        tag = int(element.tag)
        if vr == "UN" or not _judgeable(tag, vr):
            return None  # still UN once read: its dictionary VR did not fit its bytes
        size = _VALUE_SIZE.get(vr)
        multiplicity = dictionary_VM(tag) if size else ""
        if multiplicity.isdigit() and len(values_of(element.value)) != int(multiplicity):
            return None  # read already (a value of the file was converted): judged by count
        if vr == "SQ":
            return self._sequence(element)
        if vr == "UI":
            return self._uids(element)
        if vr in ("DA", "DT"):
            return self._date(element)
        return element

    def _sequence(self, element: DataElement) -> DataElement:
        items = DicomSequence()
        for index, item in enumerate(element.value or ()):
            try:
                items.append(self.dataset(item))
            except ElementError as exc:
                raise ElementError(exc.kind, f"[{index}]{exc.path}") from exc
        return DataElement(element.tag, "SQ", items)

    def _private(self, element: DataElement, parent: Dataset) -> DataElement | None:
        if "retain_safe_private" not in self.recipe.profile.options or not self.recipe.safe_private:
            return None
        tag = element.tag
        if tag.is_private_creator:
            creator = element.value
        else:
            creator_element = parent.get(BaseTag((tag.group << 16) | (tag.element >> 8)))
            creator = None if creator_element is None else creator_element.value
        if str(creator or "").strip().casefold() not in self.recipe.safe_private:
            return None
        self.kept.add(tag)
        return self._sequence(element) if element.VR == "SQ" else element

    def _uids(self, element: DataElement) -> DataElement:
        return self._new_uids(int(element.tag), [str(uid) for uid in values_of(element.value)])

    def _new_uids(self, tag: int, uids: list[str]) -> DataElement:
        kind = UID_KINDS.get(tag, "uid")
        new = [
            uid if uid.startswith(STANDARD_UID_ROOT) else self.store.uid(uid, kind) for uid in uids
        ]
        return _written(tag, "UI", _single_or_list(new))

    def _date(self, element: DataElement) -> DataElement:
        mode = self.recipe.dates
        if mode == "keep":
            if may_identify(element):
                self.kept.add(element.tag)
            return element
        if mode == "remove":
            return DataElement(element.tag, element.VR, None)
        return self._new_date(
            int(element.tag), element.VR, [str(v) for v in values_of(element.value)]
        )

    def _new_date(self, tag: int, vr: str, values: list[str]) -> DataElement:
        if self.recipe.dates == "remove":
            return _written(tag, vr, None)
        days = self.patient.date_offset_days
        shifted = [shift_date(value, days) for value in values]
        kept = [v for v in shifted if v]
        return _written(tag, vr, _single_or_list(kept) if kept else None)

    def _patient_name(self, original: str) -> str:
        self.store.patient_name(original, self.patient.patient_name)
        return self.patient.patient_name


_UNDEFINED_LENGTH = 0xFFFFFFFF
#: VRs :meth:`Cleaner._unread` leaves to pydicom: their values decide (UIDs, dates, sequences)
#: or their VR is not yet known (UN).
_READ_VRS = frozenset({"SQ", "UN"})
#: Unlisted VRs whose still-encoded values :meth:`Cleaner._unread_unlisted` keeps as read
#: (binary VRs are judged by their value count once read).
_UNLISTED_VERBATIM = frozenset(
    {"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT", "IS", "DS"}
)
_NEVER_UNREAD = frozenset({"SQ", "UN", "UI", "DA", "DT", "PN"})
#: Groups that never belong in a data set: command (0000) and file meta (0002) elements there
#: are strays (a flipped bit can end the meta early); the writer builds the meta anew.
NOT_IN_A_DATASET = frozenset({0x0000, 0x0002})
#: Bytes per value of the binary VRs whose value count the dictionary's multiplicity fixes.
_VALUE_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "FD": 8, "SV": 8, "UV": 8}


#: Bytes a copied text value may hold, by VR: anything else means the bytes are not that VR's
#: (a wrong length swallowed the next elements, a corrupted tag in an implicit-VR file).
_CONTROL = bytes(range(0x20))
_TEXT_CONTROL = _CONTROL.translate(None, b"\t\n\r\f\x1b\x00")
_STRICT: dict[str, bytes] = {
    "IS": b"0123456789+- \\\x00",
    "DS": b"0123456789+-.eE \\\x00",
    "AS": b"0123456789DWMY \\\x00",
    "TM": b"0123456789.:- \\\x00",
    "CS": bytes(range(ord("A"), ord("Z") + 1))
    + bytes(range(ord("a"), ord("z") + 1))
    + b"0123456789_- \\\x00",
}


def _plausible(tag: int, vr: str | None, value: bytes | None) -> bool:
    """Whether a still-encoded value can be what its VR says (see :func:`_plausible_numbers`)."""
    vr = vr or dictionary_VR(tag)
    if value is None or vr in _VALUE_SIZE:
        return _plausible_numbers(tag, vr, value)
    allowed = _STRICT.get(vr)
    if allowed is not None:
        return not value.translate(None, allowed)
    if vr in ("LO", "SH", "ST", "LT", "UT", "UC", "AE", "UR"):
        return len(value.translate(None, _TEXT_CONTROL)) == len(value)
    return True


def _verbatim(raw: RawDataElement, element: DataElement) -> bool:
    """Whether `element`, kept unchanged, may be written as the bytes it was read from: same VR
    (not a UN that pydicom read as the dictionary's VR), a defined, even length."""
    return _verbatim_raw(raw) and (raw.VR is None or raw.VR == element.VR)


def _verbatim_raw(raw: RawDataElement) -> bool:
    value = raw.value
    return value is not None and raw.length != _UNDEFINED_LENGTH and len(value) % 2 == 0


@lru_cache(maxsize=8192)
def _may_identify(tag: int, vr: str) -> bool:
    """:func:`~anonpipe.anon.residual.may_identify` of an element, which depends on tag and VR."""
    return may_identify(DataElement(tag, vr, None))


def _looks_like_text(value: bytes | None) -> bool:
    """Printable ASCII with a letter, four bytes or more: text, not the numbers of a binary VR
    (their bytes hold zeros or non-ASCII bytes but for freak values)."""
    if value is None or len(value) < 4:
        return False
    return all(0x20 <= b <= 0x7E for b in value) and any(chr(b).isalpha() for b in value)


@lru_cache(maxsize=8192)
def _vr_agrees(tag: int, vr: str | None) -> bool:
    """Whether `vr` is one the dictionary allows for `tag` (UN and unknown tags: yes)."""
    if vr is None or vr == "UN" or not known_tag(tag):
        return True
    return vr in dictionary_VR(tag).split(" or ")


@lru_cache(maxsize=8192)
def _judgeable(tag: int, vr: str | None) -> bool:
    """Whether an unlisted public element means what the dictionary says, so it may be kept.

    Not when the dictionary does not know the tag, or when the element's VR contradicts the
    dictionary's (see :func:`_plausible_numbers` for the value itself). UN is no contradiction:
    a PACS that did not know the tag stored it so; the element is read with the dictionary's VR
    (pydicom's ``replace_un_with_known_vr``) and judged as that.
    """
    if not known_tag(tag):
        return False
    return vr is None or vr == "UN" or vr in dictionary_VR(tag).split(" or ")


def _plausible_numbers(tag: int, vr: str | None, value: bytes | None) -> bool:
    """Whether a binary element's bytes can be the numbers the dictionary says it holds.

    Not when their size contradicts the dictionary's value multiplicity, or when they are
    printable text (text written into a US element, an implicit-VR file whose tag was corrupted:
    the bytes would pass through as they are).
    """
    size = _VALUE_SIZE.get(vr or dictionary_VR(tag))
    if size is None or value is None:
        return True
    if len(value) % size or _looks_like_text(value):
        return False
    multiplicity = dictionary_VM(tag)
    return not multiplicity.isdigit() or len(value) == int(multiplicity) * size


@lru_cache(maxsize=8192)
def unread_fate(profile: Profile, tag: int, vr: str | None) -> str:
    """What happens to a still-encoded element whatever its value: copy, drop, or read it.

    ``copy`` for public elements the profile does not list, whose VR is known and not one that
    unlisted elements get treated for (sequences, UIDs, dates, names), and that do not identify
    anyone; ``drop`` for group lengths, private elements (unless safe private ones may be kept),
    listed elements whose action is X (except those we pseudonymise) and unlisted elements the
    dictionary cannot vouch for (:func:`_judgeable`); ``read`` otherwise. Deciding before
    decoding spares pydicom most of a header's conversions.
    """
    if tag & 0xFFFF == 0 or tag >> 16 in NOT_IN_A_DATASET:
        return "drop"
    if tag & 1 << 16:
        return "read" if "retain_safe_private" in profile.options else "drop"
    rule = profile.rule(tag)
    if rule is not None:
        removed = rule.action is Action.REMOVE and tag not in PSEUDONYM_TAGS
        return "drop" if removed else "read"
    if not _judgeable(tag, vr):
        return "drop"
    if vr == "UN":
        return "read"  # converted to the dictionary's VR on reading, then judged
    keyword = keyword_for_tag(tag)
    if (
        (vr or dictionary_VR(tag)) in _NEVER_UNREAD
        or keyword in IDENTIFYING_KEYWORDS
        or keyword in CONTEXT_KEYWORDS
    ):
        return "read"
    return "copy"


def _written(tag: int, vr: str, value: Any) -> DataElement:
    """A new element with a value we computed: pydicom's value check is skipped (its warning
    would quote the value, and a UID copied from the input may be one)."""
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _single_or_list(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values


def shift_date(value: str, days: int) -> str | None:
    """Shift a DA, or the date part of a DT, by `days`; None when it is not a full date.

    Partial dates (a year alone) and invalid values cannot be shifted and are dropped rather
    than kept: an unshifted original date must not survive.
    """
    text = value.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        date = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        moved = date + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return moved.strftime("%Y%m%d") + text[8:]
