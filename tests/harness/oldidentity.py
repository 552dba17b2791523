"""The old pipeline's identity.db, built the way its anonymizer (dicom-anon) built it.

dicom-anon created ``studyinstanceuid`` (id, original, cleaned) first, then one table per audited
attribute at first use, named after the attribute name lower-cased without punctuation, with a
``study`` column referencing ``studyinstanceuid.id``. Its mappings were per study: a patient got
a new pseudonym ("Patient ID 7") in every study; its UIDs were ``<org root>.<date and time>``.
The DDL below is dicom-anon's; the file stays in SQLite's default rollback-journal mode, as
Python 2's sqlite3 left it. ``readme_names`` uses the table names the old README documents
(``studyuid``, ``patient``, ``accession_no``) instead.
"""

from __future__ import annotations

import io
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.harness.studygen import StudyRecord

__all__ = ["OldIdentityDB", "PublishedStudy", "published_copy"]

CREATE_NON_LINKED = "CREATE TABLE %s (id INTEGER PRIMARY KEY AUTOINCREMENT, original, cleaned)"
CREATE_LINKED = (
    "CREATE TABLE %s (id INTEGER PRIMARY KEY AUTOINCREMENT, original, cleaned, study INTEGER, "
    "FOREIGN KEY(study) REFERENCES %s(id))"
)
ORG_ROOT = "5.555.5"


@dataclass
class PublishedStudy:
    """What the old pipeline published for one study: its cleaned values."""

    study_pk: int
    study_uid: str
    patient_id: str
    patient_name: str
    accession: str
    #: original UID → cleaned UID (study, series, instances)
    uids: dict[str, str] = field(default_factory=dict)


class OldIdentityDB:
    """An old-format identity.db at `path` (created with its study table)."""

    def __init__(self, path: Path, *, readme_names: bool = False) -> None:
        self.path = path
        self.study_table = "studyuid" if readme_names else "studyinstanceuid"
        self.patient_table = "patient" if readme_names else "patientid"
        self.accession_table = "accession_no" if readme_names else "accessionnumber"
        self._uids = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute(CREATE_NON_LINKED % self.study_table)

    def new_uid(self) -> str:
        """A UID of the old kind: org root, then date and time fields (here a counter)."""
        self._uids += 1
        return f"{ORG_ROOT}.2013.5.3.8.{self._uids}"

    def add(self, table: str, original: object, cleaned: object, study: int | None) -> int:
        """Insert a row (creating the linked table at first use, as dicom-anon did)."""
        with closing(sqlite3.connect(self.path)) as conn, conn:
            if (
                table != self.study_table
                and not conn.execute(
                    "SELECT name FROM sqlite_master WHERE name = ?", (table,)
                ).fetchall()
            ):
                conn.execute(CREATE_LINKED % (table, self.study_table))
            if table == self.study_table:
                cursor = conn.execute(
                    f"INSERT INTO {table} (original, cleaned) VALUES (?, ?)", (original, cleaned)
                )
            else:
                cursor = conn.execute(
                    f"INSERT INTO {table} (original, cleaned, study) VALUES (?, ?, ?)",
                    (original, cleaned, study),
                )
            return int(cursor.lastrowid or 0)

    def next_id(self, table: str) -> int:
        with closing(sqlite3.connect(self.path)) as conn:
            exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,))
            if not exists.fetchall():
                return 1
            return int(conn.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}").fetchone()[0])

    def publish(self, study: StudyRecord, patient_name: str, **extra: str) -> PublishedStudy:
        """Record `study` as the old pipeline did when it published it; `extra` adds rows of
        other attributes (``studydate="20130503"``: a table anonpipe does not import)."""
        study_uid = self.new_uid()
        pk = self.add(self.study_table, study.study_instance_uid, study_uid, None)
        published = PublishedStudy(
            pk,
            study_uid,
            f"Patient ID {self.next_id(self.patient_table)}",
            f"Patient's Name {self.next_id('patientsname')}",
            f"OLDACC{self.next_id(self.accession_table)}",
            {study.study_instance_uid: study_uid},
        )
        for series in study.series:
            cleaned = self.new_uid()
            published.uids[series.series_instance_uid] = cleaned
            self.add("seriesinstanceuid", series.series_instance_uid, cleaned, pk)
            for instance in series.instances:
                cleaned = self.new_uid()
                published.uids[instance.sop_instance_uid] = cleaned
                self.add("sopinstanceuid", instance.sop_instance_uid, cleaned, pk)
        self.add(self.patient_table, study.patient_id, published.patient_id, pk)
        self.add("patientsname", patient_name, published.patient_name, pk)
        self.add(self.accession_table, study.accession_number, published.accession, pk)
        for table, value in extra.items():
            self.add(table, value, "19010101", pk)
        return published


def published_copy(path: Path, published: PublishedStudy) -> bytes:
    """The object at `path` as the old pipeline left it in the research PACS: its UIDs, patient
    and accession replaced by `published`'s, nothing else identifying kept."""
    source = dcmread(path)
    ds = Dataset()
    for keyword in (
        "SOPClassUID",
        "Modality",
        "SeriesNumber",
        "InstanceNumber",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
    ):
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    ds.StudyInstanceUID = published.uids[source.StudyInstanceUID]
    ds.SeriesInstanceUID = published.uids[source.SeriesInstanceUID]
    ds.SOPInstanceUID = published.uids[source.SOPInstanceUID]
    ds.PatientID = published.patient_id
    ds.PatientName = published.patient_name
    ds.AccessionNumber = published.accession
    ds.StudyDate = "19010101"
    if source.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian:
        ds.PixelData = source.PixelData
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
