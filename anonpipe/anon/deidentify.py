"""De-identify one file: read, check, clean, gate, write (or quarantine).

The order is the safety argument. Quarantine rules look at the identified input; the cleaned
header is encoded to bytes; the residual-PHI gate searches those bytes for every identifying value
of the input; only then is the file written, atomically, under the new UIDs. Anything that goes
wrong on the way (malformed input, a value pydicom cannot encode, a hit of the gate) sends the
original bytes to quarantine with a reason. Pixel data is never decoded: it is copied as bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from anonpipe import __version__
from anonpipe.anon.clean import Cleaner, Recipe
from anonpipe.anon.dicomfile import (
    DEFLATED_SYNTAXES,
    MalformedDicom,
    SourceFile,
    build_header,
    build_trailer,
    encode_dataset,
    read_source,
    write_file,
)
from anonpipe.anon.identity import IdentityStore
from anonpipe.anon.quarantine import QuarantineRule, quarantine_reason
from anonpipe.anon.residual import collect_identifiers, locate, prepare_needles

#: Our implementation class UID (2.25 form of a fixed UUID) and version name in the file meta.
IMPLEMENTATION_CLASS_UID = UID("2.25.171543157155476391217385312826063117617")
IMPLEMENTATION_VERSION_NAME = f"ANONPIPE_{__version__}"[:16]

_META_UIDS = frozenset({0x00020002, 0x00020003, 0x00020010, 0x00020012})

LONGITUDINAL = {"shift": "MODIFIED", "keep": "UNMODIFIED", "remove": "REMOVED"}

Status = Literal["clean", "quarantined", "error"]


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


def deidentify_file(
    source: Path,
    clean_dir: Path,
    quarantine_dir: Path,
    recipe: Recipe,
    rules: tuple[QuarantineRule, ...],
    store: IdentityStore,
    durable: bool = True,
) -> Outcome:
    """De-identify `source` into ``clean_dir/<study>/<series>/<instance>.dcm`` or quarantine it.

    Never raises for a bad input file; an I/O failure (disk full, quarantine not writable) gives
    an ``error`` outcome and leaves the input where it was. ``durable=False`` skips the per-file
    fsync: the caller then syncs once before it reports the batch done.
    """
    try:
        parsed = read_source(source)
    except MalformedDicom as exc:
        return quarantine(source, quarantine_dir, exc.reason, str(exc))
    except OSError as exc:
        return Outcome(source, "error", reason="unreadable", detail=exc.strerror)
    original_study = str(parsed.dataset.get("StudyInstanceUID", "")) or None
    reason = quarantine_reason(parsed.dataset, rules)
    if reason is not None:
        return quarantine(source, quarantine_dir, reason, None, original_study)
    try:
        return _clean_and_write(
            parsed, clean_dir, quarantine_dir, recipe, store, original_study, durable
        )
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        # pydicom raises these for values it cannot convert or encode; the type says enough
        return quarantine(
            source, quarantine_dir, "cannot encode", type(exc).__name__, original_study
        )


def _clean_and_write(
    parsed: SourceFile,
    clean_dir: Path,
    quarantine_dir: Path,
    recipe: Recipe,
    store: IdentityStore,
    original_study: str | None,
    durable: bool,
) -> Outcome:
    ds = parsed.dataset
    patient_key = str(ds.get("PatientID", "") or "").strip()
    if not patient_key:  # without an ID, the name is what ties a patient's studies together
        patient_key = "name:" + str(ds.get("PatientName", "") or "").strip()
    with store.transaction():
        patient = store.patient(patient_key, str(ds.get("IssuerOfPatientID", "") or "").strip())
        cleaner = Cleaner(recipe, store, patient)
        cleaned = cleaner.dataset(ds)
        trailing = cleaner.dataset(parsed.trailing) if parsed.trailing is not None else None
    _record_method(cleaned, recipe)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if keyword not in cleaned:
            return quarantine(
                parsed.path, quarantine_dir, f"missing {keyword}", None, original_study
            )
    meta = _file_meta(cleaned, parsed.transfer_syntax)
    header = build_header(meta, cleaned, parsed)
    trailer = build_trailer(trailing, parsed)

    inputs = [ds] + ([parsed.trailing] if parsed.trailing is not None else [])
    needles = collect_identifiers(inputs, cleaner.kept.__contains__)
    # the meta's UIDs mirror the data set's (or name the sender's software): judged there
    needles |= collect_identifiers([parsed.file_meta], lambda tag: tag in _META_UIDS)
    # a deflated header is compressed: search the same data set uncompressed instead
    deflated = parsed.transfer_syntax in DEFLATED_SYNTAXES
    searched = encode_dataset(cleaned, parsed.transfer_syntax) if deflated else header
    hit = prepare_needles(needles, ("utf-8", "latin-1")).find((searched, trailer))
    if hit is not None:
        where = locate(cleaned, hit) or (locate(trailing, hit) if trailing else None)
        detail = f"at {where or 'an element boundary'}"
        return quarantine(parsed.path, quarantine_dir, "residual PHI", detail, original_study)

    study, series, sop = (
        str(cleaned[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    dest = clean_dir / study / series / f"{sop}.dcm"
    try:
        write_file(dest, header, parsed, trailer, fsync=durable)
    except MalformedDicom as exc:  # the source changed under us
        return quarantine(parsed.path, quarantine_dir, exc.reason, str(exc), original_study)
    except OSError as exc:  # disk full, permissions: the input is untouched, report it
        return Outcome(parsed.path, "error", reason="cannot write output", detail=exc.strerror)
    return Outcome(
        parsed.path,
        "clean",
        output=dest,
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        original_study_uid=original_study,
        modality=str(cleaned.get("Modality", "")) or None,
        sop_class_uid=str(cleaned.SOPClassUID),
    )


def _record_method(ds: Dataset, recipe: Recipe) -> None:
    """Say what was done, as PS3.15 E.1.1 asks: identity removed, method, codes, dates."""
    ds.PatientIdentityRemoved = "YES"
    text = f"anonpipe {__version__}: {recipe.profile.description}"
    ds.DeidentificationMethod = [text[i : i + 64] for i in range(0, len(text), 64)]
    codes = DicomSequence()
    for code in recipe.profile.codes:
        item = Dataset()
        item.CodeValue = code.value
        item.CodingSchemeDesignator = code.scheme
        item.CodeMeaning = code.meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    ds.LongitudinalTemporalInformationModified = LONGITUDINAL[recipe.dates]


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
