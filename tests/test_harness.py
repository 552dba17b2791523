"""The harness itself, against real Orthanc servers and DCMTK: every later test relies on it.

If these fail, a failure elsewhere says nothing about anonpipe.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from tests.harness import dcmtk
from tests.harness.orthanc import (
    OrthancError,
    OrthancFactory,
    OrthancHTTPError,
    OrthancServer,
)
from tests.harness.ports import free_ports
from tests.harness.reviewdb import LEGACY_PREFIX, ReviewDB
from tests.harness.studygen import (
    ALL_TRANSFER_SYNTAXES,
    BENCH,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    PRIVATE_ITEM_NAME_TAG,
    PRIVATE_LO_TAG,
    PRIVATE_SQ_TAG,
    PRIVATE_UN_TAG,
    PROTOCOL_SERIES_DESCRIPTION,
    TWO_DEEP_PATH,
    Manifest,
    generate,
)

StudyFactory = Callable[..., Manifest]


def _read(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data))


# ---------------------------------------------------------------------------------- Orthanc


def test_study_found_by_findscu_and_moved_by_movescu(
    staging_orthanc: OrthancServer,
    research_orthanc: OrthancServer,
    study_factory: StudyFactory,
) -> None:
    manifest = study_factory(
        studies_per_patient=2,
        series_per_study=3,
        instances_per_series=3,
        transfer_syntaxes=ALL_TRANSFER_SYNTAXES,
    )
    moved, stayed = manifest.studies
    staging, research = staging_orthanc, research_orthanc
    # The destination is known only now, as for anonpipe's own SCP: register it over REST.
    staging.add_modality("research", research.aet, research.host, research.dicom_port)

    assert len(staging.upload(manifest.paths)) == len(manifest.instances)

    for study in manifest.studies:
        found = dcmtk.find_study(staging.dicom_port, study.study_instance_uid, called_aet="STAGING")
        assert found is not None, f"findscu did not find {study.study_instance_uid}"
        assert found.StudyInstanceUID == study.study_instance_uid
        assert int(found.NumberOfStudyRelatedInstances) == study.instance_count == 9
        assert int(found.NumberOfStudyRelatedSeries) == 3

    result = dcmtk.movescu(
        staging.dicom_port,
        "RESEARCH",
        {"StudyInstanceUID": moved.study_instance_uid},
        called_aet="STAGING",
    )
    assert result.status == "Success"

    # Exactly the moved study arrived, every instance of it, nothing else.
    assert research.study_instance_uids() == {moved.study_instance_uid}
    assert research.count_instances(moved.study_instance_uid) == moved.instance_count
    assert research.sop_instance_uids(moved.study_instance_uid) == moved.sop_instance_uids
    assert research.instance_counts() == {moved.study_instance_uid: moved.instance_count}
    assert research.count_instances(stayed.study_instance_uid) == 0
    assert dcmtk.find_study(research.dicom_port, stayed.study_instance_uid) is None
    found = dcmtk.find_study(research.dicom_port, moved.study_instance_uid)
    assert found is not None
    assert int(found.NumberOfStudyRelatedInstances) == moved.instance_count

    # What arrived parses and is the object that was sent, in its original transfer syntax.
    for instance_id in research.instance_ids(moved.study_instance_uid):
        ds = _read(research.download(instance_id))
        record = manifest.instance(ds.SOPInstanceUID)
        assert ds.file_meta.TransferSyntaxUID == record.transfer_syntax_uid
        assert ds.StudyInstanceUID == moved.study_instance_uid
        tags = research.tags(instance_id)
        assert tags["SOPInstanceUID"] == record.sop_instance_uid


def test_move_failures_are_reported(
    staging_orthanc: OrthancServer, study_factory: StudyFactory
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=1)
    staging_orthanc.upload(manifest.paths)
    uid = manifest.studies[0].study_instance_uid
    with pytest.raises(dcmtk.DcmtkError, match="status"):
        dcmtk.movescu(staging_orthanc.dicom_port, "NOBODY", {"StudyInstanceUID": uid})
    assert dcmtk.find_study(staging_orthanc.dicom_port, "2.25.1") is None


def test_storescu_echoscu_and_rest_helpers(
    research_orthanc: OrthancServer, study_factory: StudyFactory
) -> None:
    manifest = study_factory(series_per_study=3, transfer_syntaxes=ALL_TRANSFER_SYNTAXES)
    dcmtk.echoscu(research_orthanc.dicom_port, called_aet="RESEARCH")
    dcmtk.storescu(research_orthanc.dicom_port, [manifest.root], called_aet="RESEARCH")

    assert research_orthanc.sop_instance_uids() == manifest.sop_instance_uids
    assert len(research_orthanc.instances()) == len(manifest.instances)
    assert len(research_orthanc.series()) == len(manifest.series)
    assert len(research_orthanc.studies()) == 1
    assert research_orthanc.statistics()["CountInstances"] == len(manifest.instances)
    study = manifest.studies[0]
    assert research_orthanc.study_id(study.study_instance_uid) is not None
    assert research_orthanc.study_id("2.25.1") is None
    stored = {
        _read(research_orthanc.download(i)).SOPInstanceUID for i in research_orthanc.instances()
    }
    assert stored == manifest.sop_instance_uids

    research_orthanc.delete_all()
    assert research_orthanc.instances() == []


def test_orthanc_sends_to_dcmtk_storescp(
    staging_orthanc: OrthancServer, study_factory: StudyFactory, tmp_path: Path
) -> None:
    manifest = study_factory(series_per_study=2, instances_per_series=2)
    staging_orthanc.upload(manifest.paths)
    with dcmtk.StoreSCP(tmp_path / "received", aet="SINK") as sink:
        staging_orthanc.add_modality("sink", "SINK", "127.0.0.1", sink.port)
        staging_orthanc.echo("sink")
        summary = staging_orthanc.send_to("sink", staging_orthanc.studies())
        received = sink.received()
    assert summary.get("FailedInstancesCount", 0) == 0
    assert {dcmread(p).SOPInstanceUID for p in received} == manifest.sop_instance_uids


def test_orthanc_configuration_and_lifecycle(orthanc_factory: OrthancFactory) -> None:
    research = orthanc_factory("RESEARCH")
    staging = orthanc_factory("STAGING", modalities={"research": research})
    config = json.loads(staging.config_path.read_text())
    assert config["DicomAet"] == "STAGING"
    assert config["SynchronousCMove"] is True
    assert config["RemoteAccessAllowed"] is False
    assert config["Plugins"] == []
    assert config["StorageCompression"] is False
    assert config["DicomModalities"] == {
        "research": {"AET": "RESEARCH", "Host": "127.0.0.1", "Port": research.dicom_port}
    }
    assert staging.system()["DicomPort"] == staging.dicom_port
    assert set(staging.modalities()) == {"research"}
    staging.echo("research")
    environ = Path(f"/proc/{staging.pid}/environ").read_bytes().split(b"\0")
    assert b"TCP_NODELAY=1" in environ

    pid = staging.pid
    assert pid is not None
    staging.stop()
    assert not staging.is_running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    staging.stop()  # idempotent


def test_orthanc_start_failure_shows_log(tmp_path: Path) -> None:
    server = OrthancServer(
        "BROKEN", tmp_path / "broken", extra_config={"StorageDirectory": "/proc/nope"}
    )
    with pytest.raises(OrthancError, match="log") as excinfo:
        server.start()
    assert not server.is_running
    assert "exited" in str(excinfo.value) or "did not answer" in str(excinfo.value)
    assert len(str(excinfo.value).splitlines()) > 2  # the log tail is included


def test_orthanc_http_errors_are_raised(research_orthanc: OrthancServer) -> None:
    with pytest.raises(OrthancHTTPError) as excinfo:
        research_orthanc.get_json("/instances/no-such-id")
    assert excinfo.value.status == 404
    with pytest.raises(OrthancHTTPError):
        research_orthanc.upload_bytes(b"not a DICOM file")


def test_free_ports_are_distinct() -> None:
    ports = free_ports(5) + free_ports(5)
    assert len(set(ports)) == 10


# ---------------------------------------------------------------------------------- generator


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """Two patients, two studies each, every transfer syntax, a protocol series."""
    return generate(
        tmp_path_factory.mktemp("gen"),
        patients=2,
        studies_per_patient=2,
        series_per_study=3,
        instances_per_series=2,
        transfer_syntaxes=ALL_TRANSFER_SYNTAXES,
        protocol_series=True,
        seed=20240501,
    )


def test_planted_identifiers_are_in_the_written_bytes(manifest: Manifest) -> None:
    everything = b"".join(path.read_bytes() for path in manifest.paths)
    expected = manifest.identifiers(uids=True, dates=True)
    assert manifest.find_planted(everything, dates=True) == expected
    assert len(manifest.planted) > 100
    for study in manifest.studies:
        study_bytes = b"".join(path.read_bytes() for path in study.paths)
        assert {s for s in study.planted if s.encode() not in study_bytes} == set()
        assert {u for u in study.planted_uids if u.encode() not in study_bytes} == set()
        for path in study.paths:
            data = path.read_bytes()
            for value in (study.accession_number, study.patient_id, study.study_instance_uid):
                assert value.encode() in data
    # Identities are distinct between patients and between studies...
    first, second = manifest.patients
    assert not first.planted & second.planted
    assert not first.studies[0].planted_uids & first.studies[1].planted_uids
    # ...and one patient's identity is the same in all of that patient's studies.
    assert first.planted <= first.studies[0].planted & first.studies[1].planted
    assert manifest.find_planted(b"nothing to see here" * 100) == set()
    # Found wherever it is, also glued to other bytes.
    name = min(p for p in manifest.planted if "^" not in p)
    uid = min(manifest.planted_uids)
    junk = b"\x01PHI" + name.encode() + b"X2.25." + uid.encode() + b"7"
    assert manifest.find_planted(junk) == {name, uid}


def test_files_are_valid_and_meta_is_planted(manifest: Manifest) -> None:
    for record in manifest.instances:
        ds = dcmread(record.path)
        assert ds.preamble is not None
        meta = ds.file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == record.sop_instance_uid
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == record.sop_class_uid
        assert meta.SourceApplicationEntityTitle in manifest.planted
        assert meta.TransferSyntaxUID == record.transfer_syntax_uid
        assert ds.StudyInstanceUID == record.study_instance_uid
        assert ds.Modality in ("CT", "MR")
        assert ds.BitsAllocated == 16
        assert ds.FrameOfReferenceUID in manifest.planted_uids
        assert ds.PatientBirthDate in manifest.planted_dates
        assert ds.StudyDate in manifest.planted_dates
        assert ds.AcquisitionDateTime[:8] in manifest.planted_dates
        for keyword in ("ImageComments", "StudyDescription", "SeriesDescription"):
            text = str(ds.get(keyword, ""))
            if text != PROTOCOL_SERIES_DESCRIPTION:
                assert any(p in text for p in manifest.planted), keyword


def test_every_transfer_syntax_is_written(manifest: Manifest) -> None:
    assert manifest.transfer_syntaxes == set(ALL_TRANSFER_SYNTAXES)
    on_disk = {
        dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in manifest.paths
    }
    assert on_disk == set(ALL_TRANSFER_SYNTAXES)


def test_syntax_per_study(tmp_path: Path) -> None:
    m = generate(
        tmp_path,
        studies_per_patient=2,
        series_per_study=2,
        instances_per_series=1,
        transfer_syntaxes=(ImplicitVRLittleEndian, RLELossless),
        syntax_per="study",
        seed=1,
    )
    assert [{s.transfer_syntax_uid for s in st.series} for st in m.studies] == [
        {ImplicitVRLittleEndian},
        {RLELossless},
    ]


def test_un_element_is_vr_un_on_disk(manifest: Manifest) -> None:
    explicit = next(
        i for i in manifest.instances if i.transfer_syntax_uid == ExplicitVRLittleEndian
    )
    data = explicit.path.read_bytes()
    group, element = PRIVATE_UN_TAG >> 16, PRIVATE_UN_TAG & 0xFFFF
    header = struct.pack("<HH2s2x", group, element, b"UN")
    position = data.find(header)
    assert position > 0, "no (0011,1012) with VR UN in the explicit VR file"
    (length,) = struct.unpack_from("<I", data, position + len(header))
    value = data[position + len(header) + 4 : position + len(header) + 4 + length]
    assert value.rstrip(b"\0").decode() in manifest.planted
    for record in manifest.instances:  # implicit and encapsulated files carry it as well
        element_read = dcmread(record.path)[PRIVATE_UN_TAG]
        assert element_read.VR == "UN"
        assert bytes(element_read.value).rstrip(b"\0").decode() in manifest.planted


def test_private_block_and_nested_sequences(manifest: Manifest) -> None:
    ds = dcmread(manifest.instances[0].path)
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert block[PRIVATE_LO_TAG & 0xFF].value in manifest.planted
    item = block[PRIVATE_SQ_TAG & 0xFF].value[0]
    item_block = item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert str(item_block[PRIVATE_ITEM_NAME_TAG & 0xFF].value) in manifest.planted

    outer, inner, leaf = TWO_DEEP_PATH
    two_deep = getattr(getattr(ds, outer)[0], inner)[0]
    assert getattr(two_deep, leaf) in manifest.planted
    code = ds.ReferringPhysicianIdentificationSequence[0].PersonIdentificationCodeSequence[0]
    assert code.CodeValue in manifest.planted
    request = ds.RequestAttributesSequence[0]
    assert request.AccessionNumber in manifest.planted
    assert request.RequestedProcedureID in manifest.planted
    assert request.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID in manifest.planted
    assert request.ReferencedStudySequence[0].ReferencedSOPInstanceUID == ds.StudyInstanceUID
    assert ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID in manifest.planted_uids
    assert any(name in ds.ProcedureCodeSequence[0].CodeMeaning for name in manifest.planted)


def test_references_resolve(manifest: Manifest) -> None:
    for record in manifest.instances:
        assert record.referenced_sop_instance_uids
        assert (
            set(record.referenced_sop_instance_uids)
            <= manifest.study(record.study_instance_uid).sop_instance_uids
        )
        ds = dcmread(record.path, stop_before_pixels=True)
        written = {
            item.ReferencedSOPInstanceUID for item in ds.get("ReferencedImageSequence", [])
        } | {
            ref.ReferencedSOPInstanceUID
            for item in ds.ReferencedSeriesSequence
            for ref in item.ReferencedInstanceSequence
        }
        assert written == set(record.referenced_sop_instance_uids)
        for item in ds.ReferencedSeriesSequence:
            assert any(
                s.series_instance_uid == item.SeriesInstanceUID
                for s in manifest.study(record.study_instance_uid).series
            )
    # One Frame of Reference per modality and study, shared by its series.
    for study in manifest.studies:
        frames = {(s.modality, s.frame_of_reference_uid) for s in study.series}
        assert len(frames) == len({m for m, _ in frames})


def test_pixel_data_decodes(manifest: Manifest) -> None:
    pytest.importorskip("numpy")
    for series in manifest.series:
        ds = dcmread(series.instances[0].path)
        if series.transfer_syntax_uid == RLELossless:
            assert ds["PixelData"].is_undefined_length  # encapsulated
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        assert ds.pixel_array.tobytes() == manifest.expected_pixel_bytes(series)


def test_protocol_series(manifest: Manifest) -> None:
    for study in manifest.studies:
        protocol = [s for s in study.series if s.is_protocol]
        assert len(protocol) == 1
        ds = dcmread(protocol[0].instances[0].path, stop_before_pixels=True)
        assert ds.SeriesDescription == PROTOCOL_SERIES_DESCRIPTION
        assert ds.BurnedInAnnotation == "YES"


def test_bench_size_and_determinism(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", series_per_study=1, instances_per_series=2, size=BENCH, seed=7)
    again = generate(tmp_path / "b", series_per_study=1, instances_per_series=2, size=BENCH, seed=7)
    other = generate(tmp_path / "c", series_per_study=1, instances_per_series=2, size=BENCH, seed=8)
    ds = dcmread(first.paths[0])
    assert (ds.Rows, ds.Columns) == (512, 512)
    assert len(ds.PixelData) == 512 * 512 * 2
    assert first.sop_instance_uids == again.sop_instance_uids
    assert first.planted == again.planted
    assert not first.sop_instance_uids & other.sop_instance_uids
    assert not first.planted & other.planted


def test_generate_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="instances_per_series"):
        generate(tmp_path, instances_per_series=0)
    with pytest.raises(ValueError, match="modalities"):
        generate(tmp_path, modalities=("US",))
    with pytest.raises(ValueError, match="transfer_syntaxes"):
        generate(tmp_path, transfer_syntaxes=("1.2.840.10008.1.2.4.50",))


# ---------------------------------------------------------------------------------- review DB

# Written from reference/ORIGINALS.md, independently of reviewdb.py: (name, type, notnull, pk).
EXPECTED_STUDY_COLUMNS = [
    ("id", "integer", 1, 1),
    ("created", "datetime", 1, 0),
    ("modified", "datetime", 1, 0),
    ("original_study_uid", "varchar(64)", 0, 0),
    ("study_uid", "varchar(64)", 0, 0),
    ("accession_no", "varchar(20)", 1, 0),
    ("study_date", "datetime", 0, 0),
    ("modality", "varchar(5)", 0, 0),
    ("sop_class", "varchar(30)", 0, 0),
    ("number_of_series", "integer", 0, 0),
    ("total_images", "integer", 0, 0),
    ("requested", "bool", 1, 0),
    ("exclude", "bool", 1, 0),
    ("image_published", "bool", 1, 0),
    ("high_risk_flag", "bool", 1, 0),
    ("pub_date", "datetime", 0, 0),
    ("processing_error", "bool", 0, 0),
    ("processing_error_date", "datetime", 0, 0),
    ("processing_error_msg", "varchar(400)", 0, 0),
    ("high_risk_message", "varchar(500)", 0, 0),
    ("impression", "text", 0, 0),
    ("patient_id", "integer", 1, 0),
    ("encounter_id", "integer", 1, 0),
]
EXPECTED_REVIEW_COLUMNS = [
    ("id", "integer", 1, 1),
    ("created", "datetime", 1, 0),
    ("modified", "datetime", 1, 0),
    ("study_id", "integer", 1, 0),
    ("user_id", "integer", 1, 0),
    ("has_phi", "bool", 0, 0),
    ("has_reconstruction", "bool", 1, 0),
    ("has_protocol_series", "bool", 1, 0),
    ("relevant", "bool", 1, 0),
    ("exclude", "bool", 1, 0),
    ("comment", "text", 0, 0),
]


@pytest.mark.parametrize("prefix", ["dicom_staging_", LEGACY_PREFIX])
def test_review_db_schema(tmp_path: Path, prefix: str) -> None:
    db = ReviewDB.create(tmp_path / "review.db", prefix=prefix)
    with sqlite3.connect(db.path) as conn:
        tables = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        assert {f"{prefix}radiologystudy", f"{prefix}radiologystudyreview"} <= tables

        def columns(table: str) -> list[tuple[str, str, int, int]]:
            rows = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
            return [(r[1], r[2].lower(), r[3], r[5]) for r in rows]

        assert columns(f"{prefix}radiologystudy") == EXPECTED_STUDY_COLUMNS
        # Django's migration puts the foreign key last; the order is no part of the contract.
        assert sorted(columns(f"{prefix}radiologystudyreview")) == sorted(EXPECTED_REVIEW_COLUMNS)
        fks = conn.execute(f'PRAGMA foreign_key_list("{prefix}radiologystudyreview")').fetchall()
        assert [(fk[2], fk[3], fk[4]) for fk in fks] == [
            (f"{prefix}radiologystudy", "study_id", "id")
        ]
        autoincrement = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = ?", (f"{prefix}radiologystudy",)
        ).fetchone()[0]
        assert '"id" integer NOT NULL PRIMARY KEY AUTOINCREMENT' in autoincrement


#: What Django's PostgreSQL backend makes of the same fields: (name, data_type, nullable).
_PG_TYPES = {"datetime": "timestamp with time zone", "bool": "boolean"}


@pytest.mark.parametrize("prefix", ["dicom_staging_", LEGACY_PREFIX])
def test_review_db_schema_on_postgresql(
    review_db_factory: Callable[..., ReviewDB], prefix: str
) -> None:
    db: ReviewDB = review_db_factory("postgresql", prefix=prefix)
    with db.connect() as conn:

        def columns(table: str) -> list[tuple[str, str, int]]:
            rows = conn.execute(
                "SELECT column_name, data_type, is_nullable, character_maximum_length "
                "FROM information_schema.columns WHERE table_name = %s",
                (table,),
            ).fetchall()
            return sorted(
                (r[0], f"varchar({r[3]})" if r[3] else r[1], int(r[2] == "NO")) for r in rows
            )

        def expected(sqlite_columns: list[tuple[str, str, int, int]]) -> list[tuple[str, str, int]]:
            return sorted((n, _PG_TYPES.get(t, t), notnull) for n, t, notnull, _ in sqlite_columns)

        assert columns(f"{prefix}radiologystudy") == expected(EXPECTED_STUDY_COLUMNS)
        assert columns(f"{prefix}radiologystudyreview") == expected(EXPECTED_REVIEW_COLUMNS)
        fks = conn.execute(
            "SELECT ccu.table_name FROM information_schema.table_constraints tc "
            "JOIN information_schema.constraint_column_usage ccu USING (constraint_name) "
            "WHERE tc.table_name = %s AND tc.constraint_type = 'FOREIGN KEY'",
            (f"{prefix}radiologystudyreview",),
        ).fetchall()
        assert fks == [(f"{prefix}radiologystudy",)]


def test_review_db_rows_land(review_db: ReviewDB) -> None:
    approved = review_db.add_approved("2.25.11", "ACC11", comment="ok")
    rejected = review_db.add_rejected_phi("2.25.12", "ACC12")
    irrelevant = review_db.add_not_relevant("2.25.13")
    conflicting = review_db.add_conflicting("2.25.14")
    excluded = review_db.add_excluded("2.25.15")
    excluded_by_review = review_db.add_excluded("2.25.16", by="review")
    published = review_db.add_published("2.25.17")
    failed = review_db.add_processing_error("2.25.18")
    custom = review_db.add_study("2.25.19", "ACC19", requested=True, impression="text")
    review_db.add_review(custom, has_phi=None, has_protocol_series=True, user_id=7)

    assert len(review_db.studies()) == 9
    row = review_db.get_study(approved)
    assert (row.original_study_uid, row.accession_no) == ("2.25.11", "ACC11")
    assert (row.exclude, row.image_published, row.processing_error) == (False, False, None)
    assert [r.comment for r in review_db.reviews(approved)] == ["ok"]
    assert review_db.reviews(rejected)[0].has_phi is True
    assert review_db.reviews(irrelevant)[0].relevant is False
    assert sorted(r.has_phi is True for r in review_db.reviews(conflicting)) == [False, True]
    assert review_db.get_study(excluded).exclude is True
    assert review_db.reviews(excluded_by_review)[0].exclude is True
    assert review_db.get_study(excluded_by_review).exclude is False
    assert review_db.get_study(published).image_published is True
    assert review_db.get_study(published).pub_date is not None
    assert review_db.get_study(failed).processing_error is True
    custom_review = review_db.reviews(custom)[0]
    assert (custom_review.has_phi, custom_review.has_protocol_series) == (None, True)
    assert review_db.find_study("2.25.19").impression == "text"

    # Values are stored the way Django stores them: 0/1 and "YYYY-MM-DD HH:MM:SS".
    review_db.update_study(approved, image_published=True, study_uid="2.25.99")
    with sqlite3.connect(review_db.path) as conn:
        stored = conn.execute(
            "SELECT image_published, typeof(image_published), pub_date, created "
            f'FROM "{review_db.study_table}" WHERE id = ?',
            (approved,),
        ).fetchone()
    assert stored[:3] == (1, "integer", None)
    assert len(stored[3]) == 19 and stored[3][10] == " "
    with pytest.raises(ValueError, match="no column"):
        review_db.add_study("2.25.20", bogus=1)
