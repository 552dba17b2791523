"""Migration from the old pipeline: its identity.db is refused unchanged, then imported.

Old-format identity.db files are built the way dicom-anon built them
(:mod:`tests.harness.oldidentity`); the engine then de-identifies generated studies against the
imported store, as the daemon would when the old pipeline's studies are pulled again.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from anonpipe import cli
from anonpipe.anon.batch import EngineSpec, run_batch
from anonpipe.anon.identity import (
    IdentityError,
    IdentityStore,
    PatientIdentity,
    check_store,
    keyed_uid,
)
from anonpipe.anon.legacy import LegacyError, import_identity, inspect_old, usable
from tests.harness.oldidentity import OldIdentityDB, PublishedStudy
from tests.harness.studygen import Manifest, StudyRecord, generate

KEY = bytes(range(32))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file beside the old identity.db: name → (content digest, mode)."""
    return {
        p.name: (digest(p), p.stat().st_mode & 0o777)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@dataclass
class OldSite:
    """Two patients' studies; the old pipeline published A's first two and B's first."""

    manifest: Manifest
    old: OldIdentityDB
    a1: PublishedStudy
    a2: PublishedStudy
    b1: PublishedStudy
    new_a: StudyRecord
    new_b: StudyRecord

    @property
    def originals(self) -> set[str]:
        """Every identifying value of the data set (none may be printed)."""
        return set(self.manifest.planted | self.manifest.planted_uids)


@pytest.fixture
def old_site(tmp_path: Path) -> OldSite:
    manifest = generate(
        tmp_path / "studies",
        patients=2,
        studies_per_patient=3,
        series_per_study=2,
        instances_per_series=2,
        seed=11,
    )
    a, b = manifest.patients
    (tmp_path / "old").mkdir()
    old = OldIdentityDB(tmp_path / "old" / "identity.db")
    a1 = old.publish(a.studies[0], a.patient_name, studydate=a.studies[0].study_date)
    b1 = old.publish(b.studies[0], b.patient_name)
    # A's second study later: the old pipeline gave A a second pseudonym
    a2 = old.publish(a.studies[1], a.patient_name)
    old.add("institutionname", "PHI HOSPITAL", "Institution Name 1", a1.study_pk)  # not mapped
    return OldSite(manifest, old, a1, a2, b1, a.studies[2], b.studies[1])


def _with(site: OldSite, study: StudyRecord) -> PublishedStudy | None:
    for published in (site.a1, site.a2, site.b1):
        if study.study_instance_uid in published.uids:
            return published
    return None


def _outputs(root: Path) -> Iterator[Dataset]:
    for path in sorted(root.rglob("*.dcm")):
        yield dcmread(path, stop_before_pixels=True)


def _offset(original: str, shifted: str) -> int:
    def day(text: str) -> date:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))

    return (day(shifted) - day(original)).days


# -- a foreign identity.db is refused, unchanged -----------------------------------------------


def test_the_old_identity_db_is_refused_unchanged_by_every_open(old_site: OldSite) -> None:
    path = old_site.old.path
    path.chmod(0o644)  # a mode anonpipe would "repair" on a store of its own
    before = listing(path.parent)
    for readonly in (False, True):
        with pytest.raises(IdentityError) as caught:
            IdentityStore(path, KEY, readonly=readonly)
        message = str(caught.value)
        assert str(path) in message and f"anonpipe import-identity {path}" in message
    with pytest.raises(IdentityError, match="import-identity"):
        check_store(path)
    assert listing(path.parent) == before  # byte-identical, mode kept, no -wal/-shm/-journal


@pytest.mark.parametrize("command", ["check-config", "anonymize", "run-once", "daemon"])
def test_every_command_refuses_a_foreign_identity_db_with_exit_2(
    old_site: OldSite, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = old_site.old.path
    config = _config(tmp_path, identity_db=path)
    before = listing(path.parent)
    extra = [str(old_site.manifest.root), str(tmp_path / "out")] if command == "anonymize" else []
    assert cli.main([command, "-c", str(config), *extra]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "anonpipe import-identity" in err
    assert listing(path.parent) == before
    assert not (tmp_path / "out").exists()


def _config(directory: Path, identity_db: Path) -> Path:
    """A configuration around `identity_db`, whose key file holds :data:`KEY`."""
    key = directory / "anon.key"
    key.write_text(KEY.hex() + "\n")
    key.chmod(0o600)
    config = directory / "anonpipe.toml"
    config.write_text(
        f'[pipeline]\ndata_dir = "{directory / "data"}"\n'
        f'[review]\ndatabase = "{directory / "review.db"}"\n'
        f'[anon]\nidentity_db = "{identity_db}"\nkey_file = "{directory / "anon.key"}"\n'
        f'[control]\nsocket = "{directory / "control.sock"}"\n',
        encoding="utf-8",
    )
    return config


# -- import -------------------------------------------------------------------------------------


def test_imported_studies_keep_their_identifiers_and_patients_one_pseudonym(
    old_site: OldSite, tmp_path: Path
) -> None:
    db = tmp_path / "identity.db"
    report = import_identity(old_site.old.path, db, KEY)
    counts = report.tables
    a_uids = len(old_site.a1.uids) + len(old_site.a2.uids) + len(old_site.b1.uids)
    assert sum(counts[t].added for t in ("studyuid", "seriesuid", "sopinstanceuid")) == a_uids
    assert counts["patient"].added == 2 and counts["patient"].several == 1
    assert counts["accession_no"].added == 3 and report.studies.added == 3
    assert report.studies_other_pseudonym == 1  # A's second study keeps its own pseudonym
    assert set(report.ignored) == {"institutionname", "studydate"}

    spec = EngineSpec(db, KEY, ("clean_descriptors",), "shift", ("CT", "MR"))
    summary = run_batch(list(old_site.manifest.paths), tmp_path / "out", tmp_path / "q", spec, 1)
    assert summary.clean == len(old_site.manifest.paths)

    expected = {}
    for patient in old_site.manifest.patients:
        for study in patient.studies:
            published = _with(old_site, study)
            uid = published.study_uid if published else keyed_uid(KEY, study.study_instance_uid)
            expected[uid] = (patient, study, published)
    offsets: dict[str, set[int]] = {}
    for ds in _outputs(tmp_path / "out"):
        patient, study, published = expected[ds.StudyInstanceUID]
        if published is not None:  # pulled again: exactly what the old pipeline published
            assert ds.StudyInstanceUID == published.study_uid
            assert ds.SeriesInstanceUID in published.uids.values()
            assert ds.SOPInstanceUID in published.uids.values()
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.AccessionNumber == published.accession
            assert (ds.PatientID, ds.PatientName) == (published.patient_id, published.patient_name)
            for item in ds.get("ReferencedImageSequence", []):  # references resolve
                assert item.ReferencedSOPInstanceUID in published.uids.values()
        else:  # new: keyed UIDs, and the patient's one pseudonym (its first old study's)
            assert ds.SOPInstanceUID.startswith("2.25.")
            first = old_site.a1 if patient is old_site.manifest.patients[0] else old_site.b1
            assert (ds.PatientID, ds.PatientName) == (first.patient_id, first.patient_name)
            assert ds.AccessionNumber.startswith("AC")
        offsets.setdefault(patient.patient_id, set()).add(_offset(study.study_date, ds.StudyDate))
    assert all(len(days) == 1 for days in offsets.values())  # one date shift per patient

    # the README's linking queries answer for imported rows
    with closing(sqlite3.connect(db)) as conn:

        def one(sql: str, value: str) -> str:
            return str(conn.execute(sql, (value,)).fetchone()[0])

        a1_study = old_site.manifest.patients[0].studies[0]
        query = "select original from accession_no where cleaned = ?"
        assert one(query, old_site.a1.accession) == a1_study.accession_number
        assert one("select original from studyuid where cleaned = ?", old_site.a1.study_uid) == (
            a1_study.study_instance_uid
        )
        assert one("select original from patient where cleaned = ?", old_site.a1.patient_id) == (
            a1_study.patient_id
        )
        query = "select original_patient from imported_study where patient = ?"
        assert one(query, old_site.a2.patient_id) == a1_study.patient_id


def test_import_twice_adds_nothing_and_a_dry_run_writes_nothing(
    old_site: OldSite, tmp_path: Path
) -> None:
    db = tmp_path / "ident" / "identity.db"
    db.parent.mkdir()
    old_before = listing(old_site.old.path.parent)
    dry = import_identity(old_site.old.path, db, KEY, dry_run=True)
    assert list(db.parent.iterdir()) == []  # no identity.db, no left-over copy
    assert dry.dry_run and dry.target == db and "dry run" in dry.lines()[0]
    real = import_identity(old_site.old.path, db, KEY)
    assert (dry.tables, dry.studies) == (real.tables, real.studies)
    store_before = listing(db.parent)
    again = import_identity(old_site.old.path, db, KEY)
    assert again.added == 0
    assert again.tables["sopinstanceuid"].present == real.tables["sopinstanceuid"].added
    assert again.tables["patient"].present == 2 and again.studies.present == 3
    assert listing(db.parent) == store_before
    assert not import_identity(old_site.old.path, db, KEY, dry_run=True).added
    assert listing(old_site.old.path.parent) == old_before
    with IdentityStore(db, KEY) as store:  # date offsets were drawn once
        assert store.patient(old_site.manifest.patients[0].patient_id).patient_id == (
            old_site.a1.patient_id
        )


def test_the_old_readme_table_names_are_accepted(tmp_path: Path) -> None:
    old = OldIdentityDB(tmp_path / "old.db", readme_names=True)
    study = old.add("studyuid", "1.2.3", "5.555.5.1", None)
    old.add("patient", "PID-OLD", "Patient 1", study)
    old.add("accession_no", "ACC-OLD", "ANONACC1", study)
    report = import_identity(old.path, tmp_path / "identity.db", KEY)
    assert [report.tables[t].added for t in ("studyuid", "patient", "accession_no")] == [1, 1, 1]
    with IdentityStore(tmp_path / "identity.db", KEY) as store:
        assert store.uid("1.2.3", "studyuid") == "5.555.5.1"
        assert store.accession("ACC-OLD") == "ANONACC1"
        pseudonym, _ = store.study_patient("1.2.3", PatientIdentity("PID-OLD", "", "X"))
        assert pseudonym.patient_id == "Patient 1"
        assert store.patient("PID-OLD").patient_name.startswith("ANON^")  # no name was recorded
    with IdentityStore(tmp_path / "identity.db", KEY, readonly=True) as hook:  # a hook's view
        assert hook.uid("1.2.3", "uid") == "5.555.5.1"
        assert hook.study_patient("1.2.3", PatientIdentity("PID-OLD", "", "X"))[0].patient_id == (
            "Patient 1"
        )


def test_conflicts_are_reported_as_counts_never_as_values(
    old_site: OldSite, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = old_site.old
    new_a, new_b = old_site.new_a, old_site.new_b
    db = tmp_path / "identity.db"
    with IdentityStore(db, KEY) as store:  # anonpipe already de-identified B's first study
        b_study = old_site.manifest.patients[1].studies[0]
        store.uid(b_study.study_instance_uid, "studyuid")
        store.study_patient(b_study.study_instance_uid, PatientIdentity(b_study.patient_id, "", ""))
    # an original with two cleaned values, an invalid accession (dicom-anon's own format is
    # longer than SH allows), a pseudonym given to two patients, a number where text belongs
    study = old.add(old.study_table, new_a.study_instance_uid, old.new_uid(), None)
    series = new_a.series[0].series_instance_uid
    old.add("seriesinstanceuid", series, old.new_uid(), study)
    old.add("seriesinstanceuid", series, old.new_uid(), study)
    old.add("accessionnumber", new_a.accession_number, "Accession Number 4", study)
    study_b = old.add(old.study_table, new_b.study_instance_uid, old.new_uid(), None)
    old.add("patientid", "PHIOTHERPATIENT1", "Patient ID 9", study)
    old.add("patientid", "PHIOTHERPATIENT2", "Patient ID 9", study_b)
    old.add("patientsname", "PHI^OTHER", 0, study_b)
    config = _config(tmp_path, db)

    assert cli.main(["import-identity", "-c", str(config), str(old.path), "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert cli.main(["import-identity", "-c", str(config), str(old.path)]) == 0
    out, err = capsys.readouterr()
    assert dry.out.replace("dry run, nothing written: ", "").replace("would add", "added") == out
    assert err == ""
    text = out + dry.out + dry.err
    for value in (*old_site.originals, "PHIOTHERPATIENT1", "PHIOTHERPATIENT2", "PHI^OTHER"):
        assert value not in text
    notes = out.split("conflicts:", 1)[1]
    assert "patient: 1 patients had several pseudonyms" in notes
    assert "3 old studies keep their own" in notes  # A2, and the two of the shared one
    assert "patient: 1 pseudonyms were given to several patients" in notes
    assert "seriesuid: 1 originals had several cleaned values" in notes
    assert re.search(r"accession_no: 1 rows .* not valid DICOM", notes)
    assert re.search(r"patient_name: 1 rows", notes)
    assert "studyuid: 1 originals already in identity.db with another value" in notes
    assert f"sopinstanceuid: {len(b_study.instances)} originals already" in notes
    assert "imported_study: 1 old studies anonpipe has already de-identified" in notes
    with IdentityStore(db, KEY) as store:
        assert store.uid(b_study.study_instance_uid, "studyuid") == keyed_uid(
            KEY, b_study.study_instance_uid
        )  # anonpipe's mapping stands
        b_sop = b_study.instances[0].sop_instance_uid  # B's study is anonpipe's: keyed throughout
        assert store.uid(b_sop, "sopinstanceuid") == keyed_uid(KEY, b_sop)
        assert store.patient("PHIOTHERPATIENT1").patient_id.startswith("AP")  # shared: not kept
        assert store.accession(new_a.accession_number).startswith("AC")  # invalid: not kept


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not sqlite", "not an SQLite database"),
        ("no study table", "no studyinstanceuid or studyuid table"),
        ("both study tables", "both studyinstanceuid and studyuid"),
        ("missing column", "table patientid lacks the column(s) cleaned"),
        ("anonpipe's own", "it is an anonpipe identity.db"),
        ("the identity_db itself", "is the configured identity_db itself"),
        ("absent", "cannot read"),
    ],
)
def test_a_file_that_is_not_the_old_schema_is_refused_unchanged(
    tmp_path: Path, case: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old" / "identity.db"
    path.parent.mkdir()
    db = tmp_path / "identity.db"
    if case == "not sqlite":
        path.write_bytes(b"identity\n" * 100)
    elif case == "anonpipe's own":
        IdentityStore(path, KEY).close()
    elif case == "the identity_db itself":
        OldIdentityDB(path)
        db = path
    elif case != "absent":
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("CREATE TABLE other (id INTEGER PRIMARY KEY, original, cleaned)")
            if case != "no study table":
                conn.execute(
                    "CREATE TABLE studyinstanceuid (id INTEGER PRIMARY KEY, original, cleaned)"
                )
                conn.execute("CREATE TABLE patientid (id INTEGER PRIMARY KEY, original, study)")
            if case == "both study tables":
                conn.execute("CREATE TABLE studyuid (id INTEGER PRIMARY KEY, original, cleaned)")
    before = listing(path.parent)
    config = _config(tmp_path, db)
    assert cli.main(["import-identity", "-c", str(config), str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert listing(path.parent) == before
    assert case == "the identity_db itself" or not db.exists()


def test_cleaned_values_are_checked_against_their_vr() -> None:
    assert usable("UI", "5.555.5.2013.5.3.8.1") == "5.555.5.2013.5.3.8.1"
    assert usable("UI", " 1.2.3\0") == "1.2.3"
    for bad in ("1.02.3", "1..2", "1.2.", "abc", "1", "1." * 40 + "1", 0, None, b"\xff"):
        assert usable("UI", bad) is None
    assert usable("SH", "OLDACC1") == "OLDACC1" and usable("SH", "Accession Number 12") is None
    assert usable("LO", "Patient ID 12") == "Patient ID 12" and usable("LO", "A\\B") is None
    assert usable("PN", "Patient's Name 1") == "Patient's Name 1"
    assert usable("PN", "=".join(["X" * 64] * 3)) and not usable("PN", "=".join(["X"] * 4))
    assert usable("LO", b"Patient ID 3") == "Patient ID 3" and usable("LO", False) is None


def test_inspect_reads_the_old_file_without_touching_it(old_site: OldSite) -> None:
    before = listing(old_site.old.path.parent)
    schema = inspect_old(old_site.old.path)
    assert schema.tables == (
        "studyinstanceuid",
        "seriesinstanceuid",
        "sopinstanceuid",
        "patientid",
        "patientsname",
        "accessionnumber",
    )
    assert "studyinstanceuid" not in schema.linked and "patientid" in schema.linked
    assert "immutable=1" in schema.uri
    (old_site.old.path.parent / "identity.db-journal").write_bytes(b"")
    assert "mode=ro" in schema.uri  # a journal beside it: read with locking
    os.remove(old_site.old.path.parent / "identity.db-journal")
    assert listing(old_site.old.path.parent) == before
    with pytest.raises(LegacyError):
        inspect_old(old_site.old.path.parent)


def test_published_copy_is_importable_by_pydicom(old_site: OldSite) -> None:
    """The harness's picture of what the old pipeline left in research is valid DICOM."""
    from tests.harness.oldidentity import published_copy

    study = old_site.manifest.patients[0].studies[0]
    data = published_copy(study.instances[0].path, old_site.a1)
    ds = dcmread(io.BytesIO(data))
    assert ds.StudyInstanceUID == old_site.a1.study_uid and ds.PatientID == "Patient ID 1"
