"""Synthetic CT and MR studies with planted identifiers, for tests and benchmarks.

:func:`generate` writes patients -> studies -> series -> instances as DICOM files (one per
instance) and returns a :class:`Manifest`. Every identifying value is a distinctive token
("PHIFAM7Q3K2X^ALICE8K2Z1M", "PHIID4T9KQ2M8", ...) planted where real data hides identity:
standard elements, sequences one and two levels deep, a private block (including an element
whose VR on disk is UN), the file meta information and free text. The manifest lists every
planted string, original UID and original date, so a test can assert that none survives
de-identification by searching the output bytes (:meth:`Manifest.find_planted`), and records
the cross-object references (images, series, frames of reference) that must still resolve.

Generation needs only pydicom (no numpy): pixel data is a deterministic pattern built once per
image size and variant and reused for every instance, and RLE Lossless frames are encoded once
with pydicom's native encoder, so 1,000 instances of 512x512x16 bit take seconds.
"""

from __future__ import annotations

import array
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

from pydicom import dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders.base import RLELosslessEncoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)

__all__ = [
    "ALL_TRANSFER_SYNTAXES",
    "BENCH",
    "BENCH_SMALL",
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "PRIVATE_ITEM_NAME_TAG",
    "PRIVATE_LO_TAG",
    "PRIVATE_SQ_TAG",
    "PRIVATE_UN_TAG",
    "PROTOCOL_SERIES_DESCRIPTION",
    "SOP_CLASS_BY_MODALITY",
    "TINY",
    "TWO_DEEP_PATH",
    "ImageSize",
    "InstanceRecord",
    "Manifest",
    "PatientRecord",
    "SeriesRecord",
    "StudyRecord",
    "generate",
    "generate_multiframe",
    "pixel_bytes",
]


class ImageSize(NamedTuple):
    """Image matrix in pixels (16 bits allocated, 12 stored)."""

    rows: int
    columns: int


#: Unit tests: small files, fast everything.
TINY = ImageSize(16, 16)
#: Benchmarks: a typical CT slice, 512 KiB of pixel data per instance.
BENCH = ImageSize(512, 512)
#: Benchmarks of whole runs (bench/e2e.py, bench/scale.py): 128 KiB of pixel data per instance.
BENCH_SMALL = ImageSize(256, 256)

#: The transfer syntaxes the generator can write: two native, one encapsulated (compressed).
ALL_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

SOP_CLASS_BY_MODALITY: dict[str, UID] = {"CT": CTImageStorage, "MR": MRImageStorage}

#: Private creator of the planted private block, in group :data:`PRIVATE_GROUP`.
PRIVATE_CREATOR = "PHI_TEST_CREATOR"
PRIVATE_GROUP = 0x0011
#: (0011,1010) LO: a planted ID.
PRIVATE_LO_TAG = 0x00111010
#: (0011,1011) SQ: one item holding (0011,1001) PN, a planted name.
PRIVATE_SQ_TAG = 0x00111011
#: (0011,1001) PN inside the :data:`PRIVATE_SQ_TAG` item.
PRIVATE_ITEM_NAME_TAG = 0x00111001
#: (0011,1012) written with VR UN (explicit VR files really say "UN" on disk): a planted ID.
PRIVATE_UN_TAG = 0x00111012

#: Path to the planted value two sequence levels deep: OtherPatientIDsSequence[0] >
#: IssuerOfPatientIDQualifiersSequence[0] > UniversalEntityID.
TWO_DEEP_PATH: tuple[str, str, str] = (
    "OtherPatientIDsSequence",
    "IssuerOfPatientIDQualifiersSequence",
    "UniversalEntityID",
)

#: Series Description of the optional "Patient Protocol" series (a screen capture of the scan
#: protocol, which the anonymizer must quarantine).
PROTOCOL_SERIES_DESCRIPTION = "Patient Protocol"

_TOKEN_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_GIVEN_NAMES = ("ALICE", "BRUNO", "CARMEN", "DMITRI", "ELENA", "FARID", "GRETA", "HIRO")
_STUDY_PROTOCOLS = {"CT": ("CT HEAD WO", "CT CHEST W", "CT ABDOMEN"), "MR": ("MR BRAIN", "MR KNEE")}
_ORIGINAL = ["ORIGINAL", "PRIMARY", "AXIAL"]
_MPPS_CLASS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step SOP Class
_STUDY_REF_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (as found in the wild)


# ---------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class InstanceRecord:
    """One written file.

    Attributes
    ----------
    referenced_sop_instance_uids : tuple of str
        SOP Instance UIDs this instance references (Referenced Image Sequence and
        Referenced Series Sequence > Referenced Instance Sequence), all of instances in the same
        study; after de-identification they must still name instances that exist.
    """

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int
    series_instance_uid: str
    study_instance_uid: str
    referenced_sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class SeriesRecord:
    """One series; all its instances share modality, SOP class, transfer syntax and pixels."""

    series_instance_uid: str
    series_number: int
    modality: str
    sop_class_uid: str
    transfer_syntax_uid: str
    frame_of_reference_uid: str
    description: str
    size: ImageSize
    pixel_variant: int
    is_protocol: bool
    instances: tuple[InstanceRecord, ...]

    @property
    def sop_instance_uids(self) -> frozenset[str]:
        """SOP Instance UIDs of the series."""
        return frozenset(i.sop_instance_uid for i in self.instances)


@dataclass(frozen=True)
class StudyRecord:
    """One study and the identifiers planted in it (its patient's included).

    Attributes
    ----------
    planted : frozenset of str
        Identifying strings found in this study's files (names, IDs, addresses, ...).
    planted_uids : frozenset of str
        Original UIDs written in this study's files (study, series, instances, frames of
        reference, referenced prior study and procedure step).
    planted_dates : frozenset of str
        Original dates (YYYYMMDD) written in this study's files.
    """

    study_instance_uid: str
    accession_number: str
    study_id: str
    study_date: str
    patient_id: str
    series: tuple[SeriesRecord, ...]
    planted: frozenset[str]
    planted_uids: frozenset[str]
    planted_dates: frozenset[str]

    @property
    def instances(self) -> tuple[InstanceRecord, ...]:
        """All instances of the study, series by series."""
        return tuple(i for s in self.series for i in s.instances)

    @property
    def sop_instance_uids(self) -> frozenset[str]:
        """SOP Instance UIDs of the study."""
        return frozenset(i.sop_instance_uid for i in self.instances)

    @property
    def paths(self) -> tuple[Path, ...]:
        """Files of the study."""
        return tuple(i.path for i in self.instances)

    @property
    def instance_count(self) -> int:
        """Number of instances (files) in the study."""
        return sum(len(s.instances) for s in self.series)


@dataclass(frozen=True)
class PatientRecord:
    """One patient: the same identity appears in all of its studies."""

    patient_id: str
    patient_name: str
    birth_date: str
    studies: tuple[StudyRecord, ...]
    planted: frozenset[str]


@dataclass(frozen=True)
class Manifest:
    """What :func:`generate` wrote, and every identifier planted in it.

    Attributes
    ----------
    root : Path
        The output folder.
    seed : int
        Seed that reproduces this data set (pass it to :func:`generate`).
    planted : frozenset of str
        Every planted identifying string (names and their components, IDs, accession numbers,
        addresses, phone numbers, institution and station names, private values, the file meta
        AE title, ...). UIDs and dates are kept apart in `planted_uids` and `planted_dates`
        because some de-identification options legitimately keep them.
    planted_uids : frozenset of str
        Every original UID written (Study, Series, SOP Instance, Frame of Reference and
        referenced UIDs); SOP Class and transfer syntax UIDs are not identifiers and not listed.
    planted_dates : frozenset of str
        Every original date (YYYYMMDD): birth dates and study dates (also used for series,
        acquisition and content dates, and inside Acquisition DateTime).
    """

    root: Path
    seed: int
    patients: tuple[PatientRecord, ...]
    planted: frozenset[str]
    planted_uids: frozenset[str]
    planted_dates: frozenset[str]
    _by_sop: dict[str, InstanceRecord] = field(default_factory=dict, repr=False, compare=False)
    _matchers: dict[tuple[bool, bool], _Matcher] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._by_sop.update((i.sop_instance_uid, i) for i in self.instances)

    @property
    def studies(self) -> tuple[StudyRecord, ...]:
        """All studies, patient by patient."""
        return tuple(s for p in self.patients for s in p.studies)

    @property
    def series(self) -> tuple[SeriesRecord, ...]:
        """All series, study by study."""
        return tuple(se for st in self.studies for se in st.series)

    @property
    def instances(self) -> tuple[InstanceRecord, ...]:
        """All instances, series by series."""
        return tuple(i for se in self.series for i in se.instances)

    @property
    def paths(self) -> tuple[Path, ...]:
        """All written files."""
        return tuple(i.path for i in self.instances)

    @property
    def study_uids(self) -> frozenset[str]:
        """Study Instance UIDs."""
        return frozenset(s.study_instance_uid for s in self.studies)

    @property
    def sop_instance_uids(self) -> frozenset[str]:
        """SOP Instance UIDs of all instances."""
        return frozenset(self._by_sop)

    @property
    def transfer_syntaxes(self) -> frozenset[str]:
        """Transfer syntaxes present in the written files."""
        return frozenset(i.transfer_syntax_uid for i in self.instances)

    def study(self, study_uid: str) -> StudyRecord:
        """The study with Study Instance UID `study_uid` (KeyError if not generated)."""
        for study in self.studies:
            if study.study_instance_uid == study_uid:
                return study
        raise KeyError(study_uid)

    def instance(self, sop_instance_uid: str) -> InstanceRecord:
        """The instance with SOP Instance UID `sop_instance_uid` (KeyError if not generated)."""
        return self._by_sop[sop_instance_uid]

    def identifiers(self, *, uids: bool = True, dates: bool = False) -> frozenset[str]:
        """Planted strings to look for: `planted`, plus UIDs and dates if asked."""
        result = set(self.planted)
        if uids:
            result |= self.planted_uids
        if dates:
            result |= self.planted_dates
        return frozenset(result)

    def planted_bytes(self, *, uids: bool = True, dates: bool = False) -> frozenset[bytes]:
        """:meth:`identifiers` as ASCII bytes, as they appear in the files."""
        return frozenset(s.encode("ascii") for s in self.identifiers(uids=uids, dates=dates))

    def find_planted(self, data: bytes, *, uids: bool = True, dates: bool = False) -> set[str]:
        """Return the planted strings that occur anywhere in `data` (raw file bytes).

        Parameters
        ----------
        data : bytes
            A whole file, a network capture, a log: anything that must not leak.
        uids : bool, optional
            Also look for original UIDs (38 or more digits, so no accidental matches).
        dates : bool, optional
            Also look for original dates. Off by default: an 8-digit date can occur by chance
            inside a new random UID or in pixel data; check parsed DA/DT values instead.

        Returns
        -------
        set of str
            The planted strings found; empty when nothing leaked.
        """
        matcher = self._matchers.get((uids, dates))
        if matcher is None:
            matcher = _Matcher(self.identifiers(uids=uids, dates=dates))
            self._matchers[(uids, dates)] = matcher
        return matcher.find(data)

    def find_planted_in_files(
        self, paths: Iterable[Path | str], *, uids: bool = True, dates: bool = False
    ) -> dict[Path, set[str]]:
        """:meth:`find_planted` for each file; only files with a finding are returned."""
        found: dict[Path, set[str]] = {}
        for path in paths:
            leaked = self.find_planted(Path(path).read_bytes(), uids=uids, dates=dates)
            if leaked:
                found[Path(path)] = leaked
        return found

    def expected_pixel_bytes(self, series: SeriesRecord) -> bytes:
        """The uncompressed little-endian pixel data every instance of `series` carries."""
        return pixel_bytes(series.size, series.modality, series.pixel_variant)


class _Matcher:
    """Find which of many strings occur in a large buffer, exactly and fast.

    Testing thousands of identifiers with ``in`` against 512 KiB files one by one is slow.
    Instead, the few distinct 3-byte prefixes of the needles are located with ``bytes.find``
    (C speed); at each hit the longest run of bytes that needles are made of is taken, and a
    needle occurs there exactly when it is a prefix of that run.
    """

    def __init__(self, needles: Iterable[str]) -> None:
        self._needles = {n.encode("ascii"): n for n in needles}
        self._lengths = sorted({len(n) for n in self._needles})
        self._prefixes = sorted({n[:3] for n in self._needles})
        chars = b"".join(re.escape(bytes([c])) for c in sorted(set(b"".join(self._needles))))
        self._run = re.compile(b"[" + chars + b"]+") if chars else None

    def find(self, data: bytes) -> set[str]:
        if self._run is None:
            return set()
        if self._lengths[0] < 3:
            return {text for needle, text in self._needles.items() if needle in data}
        found: set[str] = set()
        for prefix in self._prefixes:
            position = data.find(prefix)
            while position >= 0:
                match = self._run.match(data, position)
                run = match.group() if match else b""
                for length in self._lengths:
                    if length > len(run):
                        break
                    text = self._needles.get(run[:length])
                    if text is not None:
                        found.add(text)
                position = data.find(prefix, position + 1)
        return found


# ---------------------------------------------------------------------------------- pixels


@lru_cache(maxsize=32)
def pixel_bytes(size: ImageSize, modality: str, variant: int) -> bytes:
    """Deterministic 12-bit pixel values (16 bits allocated, little endian) for one frame.

    A diagonal gradient plus a fixed pseudo-random texture, different per modality and
    variant, so compression has real work to do and decoding errors show.

    Parameters
    ----------
    size : ImageSize
        Matrix size.
    modality : str
        "CT" or "MR" (changes the pattern).
    variant : int
        Any integer; series use a few variants.
    """
    rows, columns = size
    rng = random.Random(f"{modality}-{variant}-{rows}x{columns}")
    noise = [rng.randrange(64) for _ in range(columns + 97)]
    slope = 3 + variant % 5
    base = 600 if modality == "CT" else 200
    values = array.array(
        "H",
        (
            (base + ((r * slope + c * 2) % 2048) + noise[(r * 7 + c) % len(noise)]) & 0x0FFF
            for r in range(rows)
            for c in range(columns)
        ),
    )
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


@lru_cache(maxsize=32)
def _rle_frame(size: ImageSize, modality: str, variant: int) -> bytes:
    """RLE Lossless encoding of :func:`pixel_bytes` (cached: the pure Python encoder is slow)."""
    return RLELosslessEncoder.encode(
        pixel_bytes(size, modality, variant),
        rows=size.rows,
        columns=size.columns,
        number_of_frames=1,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=12,
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
    )


@lru_cache(maxsize=32)
def _encapsulated(size: ImageSize, modality: str, variant: int) -> bytes:
    return encapsulate([_rle_frame(size, modality, variant)])


# ---------------------------------------------------------------------------------- identities


class _Tokens:
    """Distinctive random values from a seeded generator, remembering what was planted.

    Every identifier is a prefix plus a token never issued before, so it is unique in the data
    set and cannot occur by chance. :meth:`take` hands over what was planted since last time,
    which gives each patient and study its own set.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._seen: set[str] = set()
        self._planted: set[str] = set()

    def _token(self, length: int) -> str:
        while True:
            token = "".join(self.rng.choice(_TOKEN_ALPHABET) for _ in range(length))
            if token not in self._seen:
                self._seen.add(token)
                return token

    def ident(self, prefix: str, length: int = 8) -> str:
        """A planted identifier such as ``PHIID4T9KQ2M8``."""
        value = f"{prefix}{self._token(length)}"
        self._planted.add(value)
        return value

    def person(self, prefix: str) -> str:
        """A planted PN value; the whole name and each component count as planted."""
        family = self.ident(prefix, 6)
        given = self.ident(self.rng.choice(_GIVEN_NAMES), 6)
        name = f"{family}^{given}"
        self._planted.add(name)
        return name

    def take(self) -> set[str]:
        """The values planted since the previous call."""
        planted, self._planted = self._planted, set()
        return planted

    def uid(self) -> str:
        """A random 2.25 UID of 38-39 digits (original UIDs must never match by accident)."""
        return f"2.25.{self.rng.getrandbits(126) | (1 << 126)}"

    def date(self, first_year: int, last_year: int) -> str:
        year = self.rng.randint(first_year, last_year)
        return f"{year:04d}{self.rng.randint(1, 12):02d}{self.rng.randint(1, 28):02d}"

    def time(self) -> str:
        rng = self.rng
        return f"{rng.randint(7, 18):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"


@dataclass
class _Patient:
    name: str
    patient_id: str
    issuer: str
    other_ids: tuple[str, str]
    universal_entity_id: str
    birth_date: str
    sex: str
    address: str
    phone: str
    mother_name: str
    history: str
    comments: str
    planted: set[str] = field(default_factory=set)

    @property
    def family(self) -> str:
        return self.name.split("^")[0]


@dataclass
class _Study:
    uid: str
    date: str
    time: str
    accession: str
    study_id: str
    referring: str
    referring_code: str
    physician_of_record: str
    reading_physician: str
    institution: str
    institution_address: str
    department: str
    requested_procedure_id: str
    scheduled_step_id: str
    accession_issuer: str
    procedure_code: str
    source_aet: str
    prior_study_uid: str
    mpps_uid: str
    description: str
    private_id: str
    private_un_id: str
    private_name: str
    frame_of_reference: dict[str, str]
    planted: set[str] = field(default_factory=set)
    uids: set[str] = field(default_factory=set)


@dataclass
class _Series:
    uid: str
    number: int
    modality: str
    syntax: UID
    description: str
    performing: str
    operator: str
    station: str
    device_serial: str
    time: str
    variant: int
    is_protocol: bool
    instance_uids: list[str]


def _make_patient(tok: _Tokens) -> _Patient:
    rng = tok.rng
    name = tok.person("PHIFAM")
    patient_id = tok.ident("PHIID")
    phone = tok.ident("PHITEL")
    patient = _Patient(
        name=name,
        patient_id=patient_id,
        issuer=tok.ident("PHIISSUER", 6),
        other_ids=(tok.ident("PHIOID"), tok.ident("PHIOID")),
        universal_entity_id=tok.ident("PHIUEID"),
        birth_date=tok.date(1930, 2010),
        sex=rng.choice("FMO"),
        address=f"{rng.randint(1, 999)} {tok.ident('PHISTREET', 6)} ROAD, "
        f"{tok.ident('PHICITY', 6)}",
        phone=phone,
        mother_name=tok.person("PHIMOM"),
        history=f"Prior scan of {name.split('^')[0]}, MRN {patient_id}",
        comments=f"Contact {name.split('^')[1]} at {phone}",
    )
    patient.planted = tok.take()
    return patient


def _make_study(tok: _Tokens, patient: _Patient, modalities: Sequence[str]) -> _Study:
    """A study's identity; its series add their own planted values to ``planted`` later."""
    rng = tok.rng
    protocol = rng.choice(_STUDY_PROTOCOLS[modalities[0]])
    study = _Study(
        uid=tok.uid(),
        date=tok.date(2005, 2023),
        time=tok.time(),
        accession=tok.ident("PHIACC"),
        study_id=tok.ident("PHISTU"),
        referring=tok.person("PHIREF"),
        referring_code=tok.ident("PHIRCODE"),
        physician_of_record=tok.person("PHIREC"),
        reading_physician=tok.person("PHIREAD"),
        institution=f"{tok.ident('PHIINST', 6)} HOSPITAL",
        institution_address=f"{rng.randint(1, 99)} {tok.ident('PHIINSTREET', 6)}, "
        f"{tok.ident('PHITOWN', 6)}",
        department=f"{tok.ident('PHIDEPT', 6)} RADIOLOGY",
        requested_procedure_id=tok.ident("PHIRPID"),
        scheduled_step_id=tok.ident("PHISPS"),
        accession_issuer=tok.ident("PHIACCISS"),
        # a local procedure code names a procedure, not a patient: not planted
        procedure_code=f"PC{rng.randrange(10**6):06d}",
        source_aet=tok.ident("PHIAE", 6),
        prior_study_uid=tok.uid(),
        mpps_uid=tok.uid(),
        description=f"{protocol} {patient.family}",
        private_id=tok.ident("PHIPRIV"),
        private_un_id=tok.ident("PHIUN"),
        private_name=tok.person("PHIPRIVNAME"),
        frame_of_reference={m: tok.uid() for m in dict.fromkeys(modalities)},
    )
    study.planted = tok.take()
    study.uids = {study.uid, study.prior_study_uid, study.mpps_uid}
    study.uids.update(study.frame_of_reference.values())
    return study


# ---------------------------------------------------------------------------------- datasets


def _item(**elements: object) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    return _item(ReferencedSOPClassUID=sop_class, ReferencedSOPInstanceUID=sop_instance)


def _pad_even(value: bytes) -> bytes:
    return value + b"\x00" if len(value) % 2 else value


def _build_dataset(
    patient: _Patient,
    study: _Study,
    series: _Series,
    index: int,
    size: ImageSize,
    references: tuple[tuple[str, str], tuple[str, str, str] | None],
) -> Dataset:
    """Build one instance. `references`: (image ref (class, uid)), (series uid, class, uid)."""
    modality = series.modality
    sop_class = SOP_CLASS_BY_MODALITY[modality]
    sop_uid = series.instance_uids[index]
    acq_time = f"{series.time[:4]}{(int(series.time[4:]) + index) % 60:02d}"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = series.syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ANONPIPE_TEST"
    meta.SourceApplicationEntityTitle = study.source_aet

    ds = Dataset()
    ds.file_meta = meta
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"] if series.is_protocol else _ORIGINAL
    ds.InstanceCreationDate = study.date
    ds.InstanceCreationTime = acq_time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study.date
    ds.SeriesDate = study.date
    ds.AcquisitionDate = study.date
    ds.ContentDate = study.date
    ds.AcquisitionDateTime = f"{study.date}{acq_time}.000000"
    ds.StudyTime = study.time
    ds.SeriesTime = series.time
    ds.AcquisitionTime = acq_time
    ds.ContentTime = acq_time
    ds.AccessionNumber = study.accession
    ds.IssuerOfAccessionNumberSequence = DicomSequence(
        [_item(LocalNamespaceEntityID=study.accession_issuer)]
    )
    ds.Modality = modality
    ds.Manufacturer = "ANONPIPE SYNTHETIC"
    ds.InstitutionName = study.institution
    ds.InstitutionAddress = study.institution_address
    ds.ReferringPhysicianName = study.referring
    # Two levels deep: a person identification code and the physician's institution.
    ds.ReferringPhysicianIdentificationSequence = DicomSequence(
        [
            _item(
                PersonIdentificationCodeSequence=DicomSequence(
                    [
                        _item(
                            CodeValue=study.referring_code,
                            CodingSchemeDesignator="L",
                            CodeMeaning=study.referring,
                        )
                    ]
                ),
                InstitutionName=study.institution,
            )
        ]
    )
    ds.StationName = series.station
    ds.StudyDescription = study.description
    ds.ProcedureCodeSequence = DicomSequence(
        [
            _item(
                CodeValue=study.procedure_code,
                CodingSchemeDesignator="L",
                CodeMeaning=study.description,
            )
        ]
    )
    ds.SeriesDescription = series.description
    ds.InstitutionalDepartmentName = study.department
    ds.PhysiciansOfRecord = study.physician_of_record
    ds.PerformingPhysicianName = series.performing
    ds.NameOfPhysiciansReadingStudy = study.reading_physician
    ds.OperatorsName = series.operator
    ds.ManufacturerModelName = f"SYNTH {modality}"
    ds.ReferencedStudySequence = DicomSequence([_ref(_STUDY_REF_CLASS, study.prior_study_uid)])
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([_ref(_MPPS_CLASS, study.mpps_uid)])
    image_ref, series_ref = references
    if image_ref[1] != sop_uid:
        ds.ReferencedImageSequence = DicomSequence([_ref(*image_ref)])
    if series_ref is not None:
        ref_series_uid, ref_class, ref_uid = series_ref
        ds.ReferencedSeriesSequence = DicomSequence(
            [
                _item(
                    SeriesInstanceUID=ref_series_uid,
                    ReferencedInstanceSequence=DicomSequence([_ref(ref_class, ref_uid)]),
                )
            ]
        )
    # Patient
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.OtherPatientIDs = list(patient.other_ids)
    # Two levels deep: an identifier inside a sequence item inside a sequence item.
    ds.OtherPatientIDsSequence = DicomSequence(
        [
            _item(
                PatientID=patient.other_ids[0],
                IssuerOfPatientID=patient.issuer,
                TypeOfPatientID="TEXT",
                IssuerOfPatientIDQualifiersSequence=DicomSequence(
                    [_item(UniversalEntityID=patient.universal_entity_id)]
                ),
            )
        ]
    )
    ds.PatientMotherBirthName = patient.mother_name
    ds.PatientAge = f"{max(0, int(study.date[:4]) - int(patient.birth_date[:4])):03d}Y"
    ds.PatientAddress = patient.address
    ds.PatientTelephoneNumbers = patient.phone
    ds.AdditionalPatientHistory = patient.history
    ds.PatientComments = patient.comments
    # Equipment and acquisition
    ds.DeviceSerialNumber = series.device_serial
    ds.SoftwareVersions = "1.0"
    ds.ProtocolName = f"{series.description} ({series.operator.split('^')[0]})"
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    if modality == "CT":
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagedNucleus = "1H"
    ds.SliceThickness = "1.25" if modality == "CT" else "3.0"
    # Study / series / instance identification
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    # Image plane
    spacing = "0.703125" if modality == "CT" else "0.9375"
    z = f"{-index * (1.25 if modality == 'CT' else 3.0):.2f}"
    ds.ImagePositionPatient = ["-180.0", "-180.0", z]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = study.frame_of_reference[modality]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = z
    ds.ImageComments = f"Patient {patient.name} ID {patient.patient_id} for {study.referring}"
    # Request attributes: procedure IDs, the accession again and a study reference inside.
    ds.RequestAttributesSequence = DicomSequence(
        [
            _item(
                AccessionNumber=study.accession,
                IssuerOfAccessionNumberSequence=DicomSequence(
                    [_item(LocalNamespaceEntityID=study.accession_issuer)]
                ),
                ReferencedStudySequence=DicomSequence([_ref(_STUDY_REF_CLASS, study.uid)]),
                StudyInstanceUID=study.uid,
                RequestedProcedureID=study.requested_procedure_id,
                RequestedProcedureDescription=study.description,
                ScheduledProcedureStepID=study.scheduled_step_id,
            )
        ]
    )
    # Image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size.rows
    ds.Columns = size.columns
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "YES" if series.is_protocol else "NO"
    if modality == "CT":
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    # Private block: an LO ID, an SQ whose item holds a name, and an element stored as UN.
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_LO_TAG & 0xFF, "LO", study.private_id)
    item = Dataset()
    item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(
        PRIVATE_ITEM_NAME_TAG & 0xFF, "PN", study.private_name
    )
    block.add_new(PRIVATE_SQ_TAG & 0xFF, "SQ", DicomSequence([item]))
    ds.add(DataElement(PRIVATE_UN_TAG, "UN", _pad_even(study.private_un_id.encode("ascii"))))
    # Pixel data
    if series.syntax == RLELossless:
        ds.PixelData = _encapsulated(size, modality, series.variant)
        pixel = ds["PixelData"]
        pixel.VR = "OB"
        pixel.is_undefined_length = True
    else:
        ds.PixelData = pixel_bytes(size, modality, series.variant)
        ds["PixelData"].VR = "OW"
    return ds


# ---------------------------------------------------------------------------------- generate

SyntaxScope = Literal["series", "study"]


def generate(
    out_dir: Path | str,
    *,
    patients: int = 1,
    studies_per_patient: int = 1,
    series_per_study: int = 2,
    instances_per_series: int = 3,
    size: ImageSize | tuple[int, int] = TINY,
    modalities: Sequence[str] = ("CT", "MR"),
    transfer_syntaxes: Sequence[str] = (ExplicitVRLittleEndian,),
    syntax_per: SyntaxScope = "series",
    protocol_series: bool = False,
    seed: int | None = None,
    issuer_variants: bool = False,
) -> Manifest:
    """Write synthetic studies to `out_dir` and return their :class:`Manifest`.

    Files are laid out as ``p000/s00/se000/i0000.dcm`` (patient/study/series/instance
    indices): paths never contain identifiers.

    Parameters
    ----------
    out_dir : Path or str
        Output folder; created if needed. Existing files with the same names are overwritten.
    patients, studies_per_patient, series_per_study, instances_per_series : int
        Shape of the data set (each at least 1). A patient's identity (name, ID, birth date,
        address, ...) is the same in all of its studies.
    size : ImageSize or (rows, columns), optional
        :data:`TINY` (16x16, default) for unit tests, :data:`BENCH` (512x512) for benchmarks.
    modalities : sequence of {"CT", "MR"}, optional
        Cycled over the series of each study, so a study with two series has one of each.
    transfer_syntaxes : sequence of str, optional
        Cycled over all series (or all studies, see `syntax_per`); any of
        :data:`ALL_TRANSFER_SYNTAXES`. RLE Lossless is encapsulated (compressed) pixel data.
    syntax_per : {"series", "study"}, optional
        Whether the transfer syntax changes from series to series or from study to study.
    protocol_series : bool, optional
        Add to each study one extra single-instance series described "Patient Protocol" with
        Burned In Annotation YES (data the anonymizer must quarantine).
    issuer_variants : bool, optional
        Vary Issuer of Patient ID from object to object as modalities of one site do: as
        generated, absent, lower-cased with spaces around it, or followed by free text.
    seed : int or None, optional
        Seed for every random choice (tokens, UIDs, dates). None draws a fresh seed, recorded in
        the manifest. The same seed gives the same UIDs: use different seeds for data sets that
        will be stored in the same PACS.

    Returns
    -------
    Manifest
        Paths, UIDs and every planted identifier.

    Raises
    ------
    ValueError
        For a count below 1, an unknown modality or an unsupported transfer syntax.
    """
    for name, count in (
        ("patients", patients),
        ("studies_per_patient", studies_per_patient),
        ("series_per_study", series_per_study),
        ("instances_per_series", instances_per_series),
    ):
        if count < 1:
            raise ValueError(f"{name} must be at least 1, got {count}")
    if not modalities or any(m not in SOP_CLASS_BY_MODALITY for m in modalities):
        raise ValueError(f"modalities must be a non-empty selection of CT, MR; got {modalities}")
    syntaxes = [UID(s) for s in transfer_syntaxes]
    if not syntaxes or any(s not in ALL_TRANSFER_SYNTAXES for s in syntaxes):
        raise ValueError(
            f"transfer_syntaxes must be a non-empty selection of {list(ALL_TRANSFER_SYNTAXES)}, "
            f"got {list(transfer_syntaxes)}"
        )
    if syntax_per not in ("series", "study"):
        raise ValueError(f"syntax_per must be 'series' or 'study', got {syntax_per!r}")
    image_size = ImageSize(*size)
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    rng = random.Random(seed)
    tok = _Tokens(rng)
    root = Path(out_dir)

    patient_records: list[PatientRecord] = []
    all_planted: set[str] = set()
    all_uids: set[str] = set()
    all_dates: set[str] = set()
    series_counter = 0
    study_counter = 0
    for p_index in range(patients):
        patient = _make_patient(tok)
        study_records: list[StudyRecord] = []
        for s_index in range(studies_per_patient):
            study = _make_study(tok, patient, modalities)
            series_list: list[_Series] = []
            for se_index in range(series_per_study + (1 if protocol_series else 0)):
                is_protocol = se_index == series_per_study
                modality = modalities[0 if is_protocol else se_index % len(modalities)]
                scope_index = study_counter if syntax_per == "study" else series_counter
                series = _Series(
                    uid=tok.uid(),
                    number=se_index + 1,
                    modality=modality,
                    syntax=syntaxes[scope_index % len(syntaxes)],
                    description=(
                        PROTOCOL_SERIES_DESCRIPTION
                        if is_protocol
                        else f"{modality} SERIES {se_index + 1} {patient.family}"
                    ),
                    performing=tok.person("PHIPERF"),
                    operator=tok.person("PHIOP"),
                    station=tok.ident("PHISTA", 6),
                    device_serial=tok.ident("PHISN"),
                    time=tok.time(),
                    variant=series_counter % 4,
                    is_protocol=is_protocol,
                    instance_uids=[
                        tok.uid() for _ in range(1 if is_protocol else instances_per_series)
                    ],
                )
                study.planted |= tok.take()
                study.uids |= {series.uid, *series.instance_uids}
                series_list.append(series)
                series_counter += 1
            study_counter += 1
            study_dir = root / f"p{p_index:03d}" / f"s{s_index:02d}"
            series_records = [
                _write_series(
                    patient, study, series_list, i, image_size, study_dir, issuer_variants
                )
                for i in range(len(series_list))
            ]
            planted = frozenset(study.planted | patient.planted)
            dates = frozenset({study.date, patient.birth_date})
            study_records.append(
                StudyRecord(
                    study_instance_uid=study.uid,
                    accession_number=study.accession,
                    study_id=study.study_id,
                    study_date=study.date,
                    patient_id=patient.patient_id,
                    series=tuple(series_records),
                    planted=planted,
                    planted_uids=frozenset(study.uids),
                    planted_dates=dates,
                )
            )
            all_planted |= planted
            all_uids |= study.uids
            all_dates |= dates
        patient_records.append(
            PatientRecord(
                patient_id=patient.patient_id,
                patient_name=patient.name,
                birth_date=patient.birth_date,
                studies=tuple(study_records),
                planted=frozenset(patient.planted),
            )
        )
    return Manifest(
        root=root,
        seed=seed,
        patients=tuple(patient_records),
        planted=frozenset(all_planted),
        planted_uids=frozenset(all_uids),
        planted_dates=frozenset(all_dates),
    )


def _vary_issuer(ds: Dataset, issuer: str, variant: int) -> None:
    """Issuer of Patient ID as another modality of the same site might write it."""
    choice = variant % 4
    if choice == 1:
        del ds.IssuerOfPatientID
    elif choice == 2:
        ds.IssuerOfPatientID = f" {issuer.lower()} "
    elif choice == 3:
        ds.IssuerOfPatientID = f"{issuer} MRN"


def _write_series(
    patient: _Patient,
    study: _Study,
    series_list: list[_Series],
    position: int,
    size: ImageSize,
    study_dir: Path,
    issuer_variants: bool = False,
) -> SeriesRecord:
    series = series_list[position]
    sop_class = SOP_CLASS_BY_MODALITY[series.modality]
    # The next series of the study (cyclic) is referenced from every instance of this one.
    other = series_list[(position + 1) % len(series_list)]
    series_ref = (other.uid, SOP_CLASS_BY_MODALITY[other.modality], other.instance_uids[0])
    series_dir = study_dir / f"se{position:03d}"
    series_dir.mkdir(parents=True, exist_ok=True)
    uids = series.instance_uids
    records: list[InstanceRecord] = []
    for index, sop_uid in enumerate(uids):
        # Each instance references its predecessor (the first one its successor).
        neighbour = uids[index - 1] if index else uids[min(1, len(uids) - 1)]
        ds = _build_dataset(
            patient, study, series, index, size, ((sop_class, neighbour), series_ref)
        )
        if issuer_variants:
            _vary_issuer(ds, patient.issuer, position + index)
        path = series_dir / f"i{index:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        image_refs = [neighbour] if neighbour != sop_uid else []
        referenced = tuple(dict.fromkeys([*image_refs, series_ref[2]]))
        records.append(
            InstanceRecord(
                path=path,
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                transfer_syntax_uid=series.syntax,
                instance_number=index + 1,
                series_instance_uid=series.uid,
                study_instance_uid=study.uid,
                referenced_sop_instance_uids=referenced,
            )
        )
    return SeriesRecord(
        series_instance_uid=series.uid,
        series_number=series.number,
        modality=series.modality,
        sop_class_uid=sop_class,
        transfer_syntax_uid=series.syntax,
        frame_of_reference_uid=study.frame_of_reference[series.modality],
        description=series.description,
        size=size,
        pixel_variant=series.variant,
        is_protocol=series.is_protocol,
        instances=tuple(records),
    )


# ---------------------------------------------------------------------------------- multi-frame


def generate_multiframe(
    out_dir: Path | str,
    *,
    frames: int,
    size: ImageSize | tuple[int, int] = BENCH,
    seed: int | None = None,
    chunk_frames: int = 64,
) -> Manifest:
    """Write one patient, one study, one series of one uncompressed Enhanced CT object.

    The object has `frames` frames of `size` (16 bits allocated, explicit VR little endian),
    functional groups (shared: pixel measures, plane orientation; per frame: plane position and
    frame content) and the same planted identifiers as :func:`generate` (standard elements,
    sequences two deep, the private block with its UN element, the file meta, free text). The
    header is written by pydicom; the Pixel Data element is then appended by hand and its
    frames are streamed `chunk_frames` at a time, so a 2 GiB object never sits in memory.
    4096 frames of 512x512 make 2 GiB of pixel data (the 32-bit length allows up to 4 GiB - 2).

    The file is ``p000/s00/se000/i0000.dcm`` under `out_dir`; the manifest describes it as
    :func:`generate` would (one instance, no references).

    Raises
    ------
    ValueError
        For fewer than 1 frame or pixel data of 4 GiB or more.
    """
    image_size = ImageSize(*size)
    frame_bytes = pixel_bytes(image_size, "CT", 0)
    total = len(frame_bytes) * frames
    if frames < 1 or total >= 0xFFFFFFFF:
        raise ValueError(f"frames must make 1 frame to < 4 GiB of pixel data, got {frames}")
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    tok = _Tokens(random.Random(seed))
    patient = _make_patient(tok)
    study = _make_study(tok, patient, ("CT",))
    series = _Series(
        uid=tok.uid(),
        number=1,
        modality="CT",
        syntax=ExplicitVRLittleEndian,
        description=f"CT ENHANCED {patient.family}",
        performing=tok.person("PHIPERF"),
        operator=tok.person("PHIOP"),
        station=tok.ident("PHISTA", 6),
        device_serial=tok.ident("PHISN"),
        time=tok.time(),
        variant=0,
        is_protocol=False,
        instance_uids=[tok.uid()],
    )
    study.planted |= tok.take()
    study.uids |= {series.uid, *series.instance_uids}
    sop_uid = series.instance_uids[0]
    ds = _build_dataset(patient, study, series, 0, image_size, ((CTImageStorage, sop_uid), None))
    del ds.PixelData
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation"):
        delattr(ds, keyword)
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = frames
    ds.ContentQualification = "PRODUCT"
    spacing = ds.PixelSpacing
    ds.SharedFunctionalGroupsSequence = DicomSequence(
        [
            _item(
                PixelMeasuresSequence=DicomSequence(
                    [_item(PixelSpacing=spacing, SliceThickness="1.25")]
                ),
                PlaneOrientationSequence=DicomSequence(
                    [_item(ImageOrientationPatient=["1", "0", "0", "0", "1", "0"])]
                ),
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [
            _item(
                FrameContentSequence=DicomSequence([_item(InStackPositionNumber=n + 1)]),
                PlanePositionSequence=DicomSequence(
                    [_item(ImagePositionPatient=["-180.0", "-180.0", f"{-n * 1.25:.2f}"])]
                ),
            )
            for n in range(frames)
        ]
    )
    root = Path(out_dir)
    series_dir = root / "p000" / "s00" / "se000"
    series_dir.mkdir(parents=True, exist_ok=True)
    path = series_dir / "i0000.dcm"
    with path.open("wb") as out:
        dcmwrite(out, ds, enforce_file_format=True)
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 32-bit length.
        out.write(b"\xe0\x7f\x10\x00OW\x00\x00" + total.to_bytes(4, "little"))
        chunk = frame_bytes * min(chunk_frames, frames)
        written = 0
        while written < total:
            part = chunk[: total - written]
            out.write(part)
            written += len(part)
    instance = InstanceRecord(
        path=path,
        sop_instance_uid=sop_uid,
        sop_class_uid=EnhancedCTImageStorage,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        instance_number=1,
        series_instance_uid=series.uid,
        study_instance_uid=study.uid,
        referenced_sop_instance_uids=(),
    )
    series_record = SeriesRecord(
        series_instance_uid=series.uid,
        series_number=1,
        modality="CT",
        sop_class_uid=EnhancedCTImageStorage,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        frame_of_reference_uid=study.frame_of_reference["CT"],
        description=series.description,
        size=image_size,
        pixel_variant=0,
        is_protocol=False,
        instances=(instance,),
    )
    planted = frozenset(study.planted | patient.planted)
    dates = frozenset({study.date, patient.birth_date})
    study_record = StudyRecord(
        study_instance_uid=study.uid,
        accession_number=study.accession,
        study_id=study.study_id,
        study_date=study.date,
        patient_id=patient.patient_id,
        series=(series_record,),
        planted=planted,
        planted_uids=frozenset(study.uids),
        planted_dates=dates,
    )
    return Manifest(
        root=root,
        seed=seed,
        patients=(
            PatientRecord(
                patient_id=patient.patient_id,
                patient_name=patient.name,
                birth_date=patient.birth_date,
                studies=(study_record,),
                planted=frozenset(patient.planted),
            ),
        ),
        planted=planted,
        planted_uids=frozenset(study.uids),
        planted_dates=dates,
    )
