"""De-identify one file: read, check, clean, gate, write (or quarantine).

The order is the safety argument. Quarantine rules look at the identified input; the cleaned
header is encoded to bytes; the residual-PHI gate searches those bytes for every identifying value
of the input; only then is the file written, atomically, under the new UIDs. Anything that goes
wrong on the way (malformed input, a value pydicom cannot encode, any exception at all, a hit of
the gate) sends the original bytes to quarantine with a reason that names the exception type and
the element, never a value: one bad file never stops the others. Pixel data is never decoded: it
is copied as bytes.

All objects of one original study get the pseudonyms and date offset of the study's first object
(:meth:`IdentityStore.study_patient`), so a study never splits even when its objects disagree on
the patient's ID, issuer or name; the disagreement is reported in the outcome's ``notes``.
An output is never overwritten: an object whose output already exists with the same bytes is a
``duplicate`` (written once), one with other bytes is quarantined.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset as pydicom_write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import UID

from anonpipe import __version__
from anonpipe.anon.clean import Cleaner, ElementError, Recipe, tag_text
from anonpipe.anon.dicomfile import (
    DEFLATED_SYNTAXES,
    MalformedDicom,
    SourceFile,
    build_header,
    build_trailer,
    encode_dataset,
    read_source,
    same_content,
    write_file,
)
from anonpipe.anon.identity import IdentityError, IdentityStore, PatientIdentity
from anonpipe.anon.profile import Code
from anonpipe.anon.quarantine import QuarantineRule, quarantine_reason
from anonpipe.anon.residual import (
    OutputIndex,
    Place,
    collect_identifiers,
    prepare_needles,
    tolerated,
)

#: Our implementation class UID (2.25 form of a fixed UUID) and version name in the file meta.
IMPLEMENTATION_CLASS_UID = UID("2.25.171543157155476391217385312826063117617")
IMPLEMENTATION_VERSION_NAME = f"ANONPIPE_{__version__}"[:16]

_META_UIDS = frozenset({0x00020002, 0x00020003, 0x00020010, 0x00020012})

LONGITUDINAL = {"shift": "MODIFIED", "keep": "UNMODIFIED", "remove": "REMOVED"}

Status = Literal["clean", "quarantined", "duplicate", "error"]

#: Quarantine reasons of the engine itself (the rules' reasons come from their data file).
RESIDUAL_PHI = "residual PHI"
CANNOT_DEIDENTIFY = "cannot de-identify"
DUPLICATE_SOP = "duplicate SOP Instance UID"
#: Values of De-identification Method (0012,0063), LO: at most 64 characters each.
_LO_MAX = 64


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one input file.

    ``original_study_uid`` is identifying: it is for the audit trail and the review-DB
    write-back, never for a log (the log processors blank fields with that name).
    """

    source: Path
    status: Status
    output: Path | None = None
    reason: str | None = None
    detail: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    original_study_uid: str | None = None
    modality: str | None = None
    sop_class_uid: str | None = None
    #: Identifying attributes in which this object disagrees with its study's first object
    #: (names from :data:`~anonpipe.anon.identity.IDENTITY_ATTRIBUTES`; never values).
    disagrees: tuple[str, ...] = ()
    #: Transfer Syntax UID of the output file (clean and duplicate outcomes), so a sender can
    #: offer the right presentation context without reading the header again.
    transfer_syntax_uid: str | None = None
    #: Bytes of the output file as written (clean outcomes), for the counts of what is pushed.
    size: int | None = None


def deidentify_file(
    source: Path,
    clean_dir: Path,
    quarantine_dir: Path,
    recipe: Recipe,
    rules: tuple[QuarantineRule, ...],
    store: IdentityStore,
    durable: bool = True,
    *,
    residual_gate: bool = True,
) -> Outcome:
    """De-identify `source` into ``clean_dir/<study>/<series>/<instance>.dcm`` or quarantine it.

    Never raises for a bad input file: every exception becomes that file's quarantine, with the
    exception type and the element as reason. Only an unusable identity store raises
    (:class:`IdentityError`: no file is at fault, and its message holds no value). An I/O
    failure of our own (disk full, quarantine not writable) gives an
    ``error`` outcome and leaves the input where it was. ``durable=False`` skips the per-file
    fsync: the caller then syncs once before it reports the batch done. ``residual_gate=False``
    writes without the residual-PHI check: only for measuring the gate itself.
    """
    try:
        parsed = read_source(source)
    except MalformedDicom as exc:
        return quarantine(source, quarantine_dir, exc.reason, str(exc))
    except OSError as exc:
        return Outcome(source, "error", reason="unreadable", detail=exc.strerror)
    except Exception as exc:  # pydicom's reader on hostile input: any type at all
        return quarantine(source, quarantine_dir, CANNOT_DEIDENTIFY, _described(exc))
    original_study: str | None = None
    try:
        original_study = _text(parsed.dataset, "StudyInstanceUID") or None
        reason = quarantine_reason(parsed.dataset, rules)
        if reason is not None:
            return quarantine(source, quarantine_dir, reason, None, original_study)
        return _clean_and_write(
            parsed, clean_dir, quarantine_dir, recipe, store, original_study, durable, residual_gate
        )
    except IdentityError:
        raise
    except Exception as exc:
        return quarantine(
            source, quarantine_dir, CANNOT_DEIDENTIFY, _described(exc), original_study
        )


def _described(exc: BaseException) -> str:
    """The exception type and, when known, the element: never the message (it may quote PHI)."""
    if isinstance(exc, ElementError):
        return f"{exc.kind} at {exc.path}"
    return type(exc).__name__


def _text(dataset: Dataset, keyword: str) -> str:
    """An element's value as stripped text; '' when absent or unreadable (it is judged later)."""
    try:
        return str(dataset.get(keyword, "") or "").strip()
    except Exception:
        return ""


def _clean_and_write(
    parsed: SourceFile,
    clean_dir: Path,
    quarantine_dir: Path,
    recipe: Recipe,
    store: IdentityStore,
    original_study: str | None,
    durable: bool,
    residual_gate: bool,
) -> Outcome:
    ds = parsed.dataset
    identity = PatientIdentity(
        patient_id=_text(ds, "PatientID"),
        issuer=_text(ds, "IssuerOfPatientID"),
        name=_text(ds, "PatientName"),
    )
    with store.transaction():
        patient, disagrees = store.study_patient(original_study or "", identity)
        cleaner = Cleaner(recipe, store, patient)
        cleaned = cleaner.dataset(ds)
        cleaner.keep_required(ds, cleaned)
        trailing = cleaner.dataset(parsed.trailing) if parsed.trailing is not None else None
    written = cleaner.written | _record_method(cleaned, recipe)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if keyword not in cleaned:
            return quarantine(
                parsed.path, quarantine_dir, f"missing {keyword}", None, original_study
            )
    meta = _file_meta(cleaned, parsed.transfer_syntax)
    header = _encoded(lambda: build_header(meta, cleaned, parsed), cleaned, parsed.transfer_syntax)
    trailer = _encoded(lambda: build_trailer(trailing, parsed), trailing, parsed.transfer_syntax)

    if residual_gate:
        # a deflated header is compressed: search the same data set uncompressed instead
        deflated = parsed.transfer_syntax in DEFLATED_SYNTAXES
        searched = encode_dataset(cleaned, parsed.transfer_syntax) if deflated else header
        leak = _residual(
            parsed, cleaner.kept.__contains__, (searched, trailer), cleaned, trailing, written
        )
        if leak is not None:
            return quarantine(parsed.path, quarantine_dir, RESIDUAL_PHI, leak, original_study)

    study, series, sop = (
        str(cleaned[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    dest = clean_dir / study / series / f"{sop}.dcm"
    status: Status = "clean"
    size: int | None = None
    try:
        size = write_file(dest, header, parsed, trailer, fsync=durable, replace=False).size
    except FileExistsError:
        if not same_content(dest, header, parsed, trailer):
            detail = "another object with this SOP Instance UID was written first"
            return quarantine(parsed.path, quarantine_dir, DUPLICATE_SOP, detail, original_study)
        status = "duplicate"
    except MalformedDicom as exc:  # the source changed under us
        return quarantine(parsed.path, quarantine_dir, exc.reason, str(exc), original_study)
    except OSError as exc:  # disk full, permissions: the input is untouched, report it
        return Outcome(parsed.path, "error", reason="cannot write output", detail=exc.strerror)
    return Outcome(
        parsed.path,
        status,
        output=dest,
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        original_study_uid=original_study,
        modality=str(cleaned.get("Modality", "")) or None,
        sop_class_uid=str(cleaned.SOPClassUID),
        disagrees=disagrees,
        transfer_syntax_uid=str(parsed.transfer_syntax),
        size=size,
    )


def _residual(
    parsed: SourceFile,
    is_kept: Callable[[BaseTag], bool],
    searched: tuple[bytes, ...],
    cleaned: Dataset,
    trailing: Dataset | None,
    written: set[str],
) -> str | None:
    """The residual-PHI gate: None, or what was found where (kind and path, never the value)."""
    inputs = [parsed.dataset] + ([parsed.trailing] if parsed.trailing is not None else [])
    identifiers = collect_identifiers(inputs, is_kept)
    # the meta's UIDs mirror the data set's (or name the sender's software): judged there
    identifiers.update(collect_identifiers([parsed.file_meta], lambda tag: tag in _META_UIDS))
    index: OutputIndex | None = None
    for value in prepare_needles(identifiers.found, ("utf-8", "latin-1")).hits(searched):
        if index is None:  # only files with a hit pay for placing it
            outputs = [cleaned] + ([trailing] if trailing is not None else [])
            index = OutputIndex(outputs, written)
        strength, source = identifiers.found[value]
        found = index.occurrences(value)
        if tolerated(strength, found):
            continue
        where = next((o.path for o in found if o.place is not Place.WRITTEN), None)
        return f"{source} value at {where or 'an element boundary'}"
    return None


def _encoded(encode: Callable[[], bytes], dataset: Dataset | None, syntax: UID) -> bytes:
    """Run `encode`; when it fails, name the element that cannot be encoded."""
    try:
        return encode()
    except ElementError:
        raise
    except Exception as exc:
        where = _unencodable(dataset, syntax) if dataset is not None else None
        if where is None:
            raise
        raise ElementError(type(exc).__name__, where) from exc


def _unencodable(dataset: Dataset, syntax: UID, prefix: str = "") -> str | None:
    """The path of the first element of `dataset` that pydicom cannot encode, or None."""
    for element in dataset:
        path = prefix + tag_text(int(element.tag))
        single = Dataset()
        implicit, little = dataset.original_encoding
        single.set_original_encoding(implicit, little, dataset.original_character_set)
        try:
            single.add(element)
            encode_dataset(single, syntax)
        except Exception:
            if element.VR == "SQ":
                for index, item in enumerate(element.value or ()):
                    inner = _unencodable(item, syntax, f"{path}[{index}]")
                    if inner is not None:
                        return inner
            return path
    return None


def method_values(recipe: Recipe) -> list[str]:
    """De-identification Method (LO, 1-n): one value per statement, none over 64 characters."""
    return _method_statements(recipe.profile.codes)


def _method_statements(codes: tuple[Code, ...]) -> list[str]:
    statements = [
        f"anonpipe {__version__} PS3.15 E.1-1",
        *(code.meaning for code in codes),
        "Unknown public elements removed",
    ]
    return [text[:_LO_MAX] for text in statements]


def _record_method(ds: Dataset, recipe: Recipe) -> set[str]:
    """Say what was done, as PS3.15 E.1.1 asks: identity removed, method, codes, dates.

    Returns the texts written (case-folded), which the residual gate never counts as a leak.
    """
    implicit, little = ds.original_encoding
    elements, texts = _method_elements(
        recipe.profile.codes, recipe.dates, implicit is True, little is not False
    )
    for element in elements:
        ds[element.tag] = element
    return set(texts)


@lru_cache(maxsize=32)
def _method_elements(
    codes: tuple[Code, ...], dates: str, implicit: bool, little: bool
) -> tuple[tuple[RawDataElement, ...], frozenset[str]]:
    """The method's elements, the same in every file of a recipe: encoded once per encoding and
    read back still encoded, so each file copies their bytes like an element it keeps (built
    per file, the code items alone were a tenth of the engine's CPU per header). Raw elements
    are immutable, so every data set may share them."""
    ds = Dataset()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = _method_statements(codes)
    items = DicomSequence()
    for code in codes:
        item = Dataset()
        item.CodeValue = code.value
        item.CodingSchemeDesignator = code.scheme
        item.CodeMeaning = code.meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    ds.LongitudinalTemporalInformationModified = LONGITUDINAL[dates]
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    pydicom_write_dataset(fp, ds)
    elements: list[RawDataElement] = []
    for element in data_element_generator(io.BytesIO(fp.getvalue()), implicit, little):
        if not isinstance(element, RawDataElement):  # pydicom reads undefined lengths at once
            raise TypeError(f"{element.tag} was written with an undefined length")
        elements.append(element)
    texts = {"YES", LONGITUDINAL[dates], *ds.DeidentificationMethod}
    for code in codes:
        texts.update((code.value, code.scheme, code.meaning))
    return tuple(elements), frozenset(text.casefold() for text in texts)


def _file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    """A new file meta: nothing is carried over from the sender's."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def quarantine(
    source: Path,
    quarantine_dir: Path,
    reason: str,
    detail: str | None,
    original_study_uid: str | None = None,
) -> Outcome:
    """Copy the original bytes to `quarantine_dir` with a JSON record of the reason beside them.

    The name is a digest of the source path, so nothing from the file's content (which may be
    identifying or hostile) becomes a path.
    """
    token = hashlib.sha256(os.fsencode(source.resolve())).hexdigest()[:24]
    target = quarantine_dir / f"{token}.dcm"
    try:
        quarantine_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        record = {"source": str(source), "reason": reason, "detail": detail}
        (quarantine_dir / f"{token}.json").write_text(json.dumps(record) + "\n")
    except OSError as exc:
        return Outcome(source, "error", reason=reason, detail=f"quarantine failed: {exc.strerror}")
    return Outcome(
        source,
        "quarantined",
        output=target,
        reason=reason,
        detail=detail,
        original_study_uid=original_study_uid,
    )
