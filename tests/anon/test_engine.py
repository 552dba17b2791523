"""The de-identification engine end to end on generated studies: what must not survive, what must.

Every assertion is on output bytes, parsed output files, or rows of identity.db.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from anonpipe.anon.batch import Engine, EngineSpec, run_batch
from anonpipe.anon.deidentify import IMPLEMENTATION_CLASS_UID, Outcome
from anonpipe.anon.identity import keyed_uid, load_or_create_key
from anonpipe.cli import main
from tests.harness.studygen import Manifest, generate

SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)


@dataclass
class Run:
    """One batch over a generated set: inputs, outcomes, and where things went."""

    manifest: Manifest
    outcomes: list[Outcome]
    clean_dir: Path
    quarantine_dir: Path
    spec: EngineSpec

    @property
    def clean(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "clean"]

    def outputs(self) -> list[Path]:
        return sorted(self.clean_dir.rglob("*.dcm"))


def _spec(
    tmp: Path, dates: str = "shift", options: tuple[str, ...] = ("clean_descriptors",)
) -> EngineSpec:
    return EngineSpec(
        identity_db=tmp / "identity.db",
        key=load_or_create_key(tmp / "anon.key"),
        options=options,
        dates=dates,
        allowed_modalities=("CT", "MR"),
    )


def _outcomes(paths: Sequence[Path], out: Path, spec: EngineSpec, jobs: int = 1) -> list[Outcome]:
    """Run one batch into ``out/clean`` and ``out/quarantine``; the outcomes in input order."""
    outcomes: list[Outcome] = []
    run_batch(paths, out / "clean", out / "quarantine", spec, jobs, outcomes.append)
    return outcomes


def _run(manifest: Manifest, out: Path, spec: EngineSpec, jobs: int = 1) -> Run:
    outcomes = _outcomes(manifest.paths, out, spec, jobs)
    return Run(manifest, outcomes, out / "clean", out / "quarantine", spec)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate(
        tmp_path_factory.mktemp("in"),
        patients=2,
        studies_per_patient=2,
        series_per_study=3,
        instances_per_series=3,
        transfer_syntaxes=SYNTAXES,
        protocol_series=True,
        seed=20261124,
    )


@pytest.fixture(scope="module")
def shifted(generated: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("shift")
    return _run(generated, tmp, _spec(tmp), jobs=2)


def _walk(ds: Dataset) -> Iterator[pydicom.DataElement]:
    for element in ds:
        yield element
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


def test_every_file_is_clean_or_quarantined_for_protocol(shifted: Run) -> None:
    protocol = [i.path for s in shifted.manifest.series if s.is_protocol for i in s.instances]
    quarantined = {o.source: o.reason for o in shifted.outcomes if o.status == "quarantined"}
    assert quarantined == dict.fromkeys(protocol, "patient protocol series")
    assert len(shifted.clean) == len(shifted.manifest.paths) - len(protocol)
    assert len(shifted.outputs()) == len(shifted.clean)


def test_outcome_names_the_written_transfer_syntax(shifted: Run) -> None:
    """The daemon offers the push from the outcome: it must name the file's syntax exactly."""
    assert shifted.clean
    syntaxes = set()
    for outcome in shifted.clean:
        assert outcome.output is not None
        written = pydicom.dcmread(outcome.output, stop_before_pixels=True)
        assert outcome.transfer_syntax_uid == written.file_meta.TransferSyntaxUID
        syntaxes.add(outcome.transfer_syntax_uid)
    assert syntaxes == set(SYNTAXES)
    quarantined = [o for o in shifted.outcomes if o.status == "quarantined"]
    assert all(o.transfer_syntax_uid is None for o in quarantined)


@pytest.mark.parametrize("durable", [False, True])
def test_durable_false_never_fsyncs_a_file(
    durable: bool, generated: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon passes durable=False and syncs once per study: no flush per file."""
    synced: list[int] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    engine = Engine(_spec(tmp_path))
    monkeypatch.setattr(os, "fsync", counting)
    try:
        paths = generated.paths[:4]
        for path in paths:
            outcome = engine.run(path, tmp_path / "clean", tmp_path / "q", durable=durable)
            assert outcome.status in ("clean", "quarantined")
    finally:
        engine.close()
    clean = sum(1 for _ in (tmp_path / "clean").rglob("*.dcm"))
    assert len(synced) == (clean if durable else 0)


def test_no_planted_identifier_or_uid_survives_in_output_bytes(shifted: Run) -> None:
    leaks = shifted.manifest.find_planted_in_files(shifted.outputs(), uids=True)
    assert not leaks, f"{len(leaks)} files leak, e.g. {next(iter(leaks.values()))}"


@pytest.mark.parametrize("dates", ["shift", "remove"])
def test_no_original_date_survives(
    generated: Manifest, tmp_path: Path, shifted: Run, dates: str
) -> None:
    run = shifted if dates == "shift" else _run(generated, tmp_path, _spec(tmp_path, dates))
    assert run.outputs()
    for path in run.outputs():
        for element in _walk(pydicom.dcmread(path)):
            if element.VR in ("DA", "DT") and element.value:
                values = element.value if element.VM > 1 else [element.value]
                for value in values:
                    assert str(value)[:8] not in generated.planted_dates, element.keyword


def test_references_resolve_and_geometry_is_kept(shifted: Run) -> None:
    by_source = {o.source: o for o in shifted.clean}
    outputs = {o.sop_instance_uid for o in shifted.clean}
    for record in shifted.manifest.instances:
        outcome = by_source.get(record.path)
        if outcome is None:
            continue
        assert outcome.output is not None
        out = pydicom.dcmread(outcome.output)
        src = pydicom.dcmread(record.path)
        refs = {e.value for e in _walk(out) if e.keyword == "ReferencedSOPInstanceUID"}
        expected = {
            keyed_uid(shifted.spec.key, u)
            for u in record.referenced_sop_instance_uids
            if shifted.manifest.instance(u).path in by_source  # not a quarantined instance
        }
        assert expected <= refs, "a reference was lost or remapped inconsistently"
        assert expected <= outputs, "a reference does not resolve to an output instance"
        for keyword in (
            "Rows",
            "Columns",
            "PixelSpacing",
            "SliceThickness",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "Modality",
            "SOPClassUID",
            "BitsAllocated",
        ):
            assert out.get(keyword) == src.get(keyword), keyword
        assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert out.PixelData == src.PixelData
        assert out.FrameOfReferenceUID != src.FrameOfReferenceUID


def test_frames_of_reference_stay_shared(shifted: Run) -> None:
    pairs: dict[str, set[str]] = {}
    for outcome in shifted.clean:
        assert outcome.output is not None
        src = pydicom.dcmread(outcome.source, stop_before_pixels=True)
        out = pydicom.dcmread(outcome.output, stop_before_pixels=True)
        pairs.setdefault(src.FrameOfReferenceUID, set()).add(out.FrameOfReferenceUID)
    assert all(len(new) == 1 for new in pairs.values())


def test_what_was_done_is_recorded(shifted: Run) -> None:
    out = pydicom.dcmread(shifted.outputs()[0])
    assert out.PatientIdentityRemoved == "YES"
    assert "anonpipe" in "".join(out.DeidentificationMethod)
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113105", "113107"}
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    meta = out.file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in meta
    assert not [e for e in _walk(out) if e.tag.is_private]


def test_two_runs_share_pseudonyms_uids_and_date_intervals(
    generated: Manifest, tmp_path: Path, shifted: Run
) -> None:
    again = _run(generated, tmp_path, shifted.spec)  # same identity.db and key, new output
    first = {o.source: o for o in shifted.clean}
    for outcome in again.clean:
        before = first[outcome.source]
        assert (outcome.study_uid, outcome.sop_instance_uid) == (
            before.study_uid,
            before.sop_instance_uid,
        )
        assert outcome.output is not None and before.output is not None
        a, b = pydicom.dcmread(outcome.output), pydicom.dcmread(before.output)
        assert (a.PatientID, a.PatientName, a.AccessionNumber, a.StudyDate) == (
            b.PatientID,
            b.PatientName,
            b.AccessionNumber,
            b.StudyDate,
        )
    # intervals between one patient's studies are preserved, and pseudonyms are per patient
    for patient in generated.patients:
        studies = [
            pydicom.dcmread(next(o.output for o in shifted.clean if o.source == s.paths[0]))  # type: ignore[arg-type]
            for s in patient.studies
        ]
        assert len({(s.PatientID, str(s.PatientName)) for s in studies}) == 1
        original = [s.study_date for s in patient.studies]
        new = [str(s.StudyDate) for s in studies]
        assert _days(original[0], original[1]) == _days(new[0], new[1])
        assert new[0] != original[0]


def _days(a: str, b: str) -> int:
    import datetime as dt

    def parse(s: str) -> dt.date:
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))

    return (parse(b) - parse(a)).days


def test_documented_identity_query_answers(shifted: Run) -> None:
    outcome = shifted.clean[0]
    assert outcome.output is not None
    cleaned = pydicom.dcmread(outcome.output).AccessionNumber
    study = next(s for s in shifted.manifest.studies if outcome.source in s.paths)
    with sqlite3.connect(shifted.spec.identity_db) as db:
        rows = db.execute("select original from accession_no where cleaned = ?", (cleaned,))
        assert [r[0] for r in rows] == [study.accession_number]
    assert (shifted.spec.identity_db.stat().st_mode & 0o777) == 0o600


def _malformed(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir()
    data = good.read_bytes()
    ds = pydicom.dcmread(good)
    cases = {
        "empty": b"",
        "not_dicom": b"hello, this is not DICOM\n" * 10,
        "truncated_header": data[:400],
        "truncated_pixels": data[:-10],
    }
    bad_vr = bytearray(data)
    at = bad_vr.find(b"\x08\x00\x60\x00CS")  # (0008,0060) Modality, explicit VR
    bad_vr[at + 4 : at + 6] = b"ZZ"
    cases["bad_vr"] = bytes(bad_vr)
    paths = {}
    for name, content in cases.items():
        paths[name] = folder / f"{name}.dcm"
        paths[name].write_bytes(content)
    paths["no_meta"] = folder / "no_meta.dcm"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)  # a bare data set: no preamble, no DICM, no file meta
    paths["no_meta"].write_bytes(fp.getvalue())
    return paths


def test_malformed_inputs_are_quarantined_and_the_run_goes_on(
    generated: Manifest, tmp_path: Path
) -> None:
    explicit = next(
        i for i in generated.instances if i.transfer_syntax_uid == ExplicitVRLittleEndian
    )
    bad = _malformed(tmp_path / "bad", explicit.path)
    good = [i.path for i in generated.instances[:3]]
    outcomes = _outcomes([*bad.values(), *good], tmp_path, _spec(tmp_path))
    by_source = {o.source: o for o in outcomes}
    for name, path in bad.items():
        outcome = by_source[path]
        assert outcome.status == "quarantined", name
        assert outcome.output is not None and outcome.output.read_bytes() == path.read_bytes()
        record = json.loads(outcome.output.with_suffix(".json").read_text())
        assert record["reason"] == outcome.reason and record["reason"], name
    assert [by_source[p].status for p in good].count("clean") >= 1


def test_residual_phi_gate_catches_a_copy_in_an_unlisted_element(
    generated: Manifest, tmp_path: Path
) -> None:
    record = next(i for i in generated.instances if i.transfer_syntax_uid == ExplicitVRLittleEndian)
    ds = pydicom.dcmread(record.path)
    ds.ConvolutionKernel = str(ds.PatientID)  # (0018,1210) is not in Table E.1-1
    planted = tmp_path / "planted.dcm"
    ds.save_as(planted)
    outcomes = _outcomes([planted], tmp_path, _spec(tmp_path))
    assert outcomes[0].status == "quarantined" and outcomes[0].reason == "residual PHI"
    assert outcomes[0].detail == "PatientID value at (0018,1210)"  # the kind, never the value
    assert not list((tmp_path / "clean").rglob("*.dcm"))


def test_retain_uids_and_full_dates_options(generated: Manifest, tmp_path: Path) -> None:
    spec = _spec(tmp_path, "keep", ("retain_uids",))
    record = generated.instances[0]
    outcomes = _outcomes([record.path], tmp_path, spec)
    assert outcomes[0].status == "clean" and outcomes[0].output is not None
    out = pydicom.dcmread(outcomes[0].output)
    src = pydicom.dcmread(record.path)
    assert out.SOPInstanceUID == src.SOPInstanceUID and out.StudyDate == src.StudyDate
    assert {i.CodeValue for i in out.DeidentificationMethodCodeSequence} == {
        "113100",
        "113106",
        "113110",
    }


def test_anonymize_command(
    generated: Manifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "anonpipe.toml"
    config.write_text(
        f'[pipeline]\ndata_dir = "{tmp_path}/data"\n'
        f'[anon]\nidentity_db = "{tmp_path}/id.db"\nkey_file = "{tmp_path}/anon.key"\n'
    )
    code = main(
        ["anonymize", "-c", str(config), str(generated.root), str(tmp_path / "out"), "--jobs", "2"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    protocol = sum(len(s.instances) for s in generated.series if s.is_protocol)
    assert f"{protocol} quarantined, 0 errors" in out
    assert "quarantined: patient protocol series" in out
    assert len(list((tmp_path / "quarantine").glob("*.dcm"))) == protocol
    assert main(["anonymize", "-c", str(config), str(tmp_path / "nope"), str(tmp_path / "o")]) == 2


_NO_NETWORKING = """
import sys
from anonpipe.cli import main
code = main(sys.argv[1:])
assert "pynetdicom" not in sys.modules, "anonymize imported pynetdicom"
raise SystemExit(code)
"""


def test_anonymize_never_imports_the_networking_library(
    generated: Manifest, tmp_path: Path
) -> None:
    """``anonymize`` leaves pynetdicom's identifier-logging switches alone (start-up time):
    safe only while nothing in the command imports pynetdicom."""
    config = tmp_path / "anonpipe.toml"
    config.write_text(
        f'[pipeline]\ndata_dir = "{tmp_path}/data"\n'
        f'[anon]\nidentity_db = "{tmp_path}/id.db"\nkey_file = "{tmp_path}/anon.key"\n'
    )
    argv = ["anonymize", "-c", str(config), str(generated.root), str(tmp_path / "out")]
    for jobs in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", _NO_NETWORKING, *argv, "--jobs", jobs],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]


def test_deflated_input_is_cleaned_and_stays_deflated(generated: Manifest, tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    record = next(i for i in generated.instances if i.transfer_syntax_uid == ExplicitVRLittleEndian)
    ds = pydicom.dcmread(record.path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    ds.save_as(deflated)
    outcomes = _outcomes([deflated], tmp_path, _spec(tmp_path))
    assert outcomes[0].status == "clean" and outcomes[0].output is not None
    out = pydicom.dcmread(outcomes[0].output)
    assert out.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert out.PixelData == ds.PixelData
    plain = DicomBytesIO()
    plain.is_little_endian, plain.is_implicit_VR = True, False
    write_dataset(plain, out)  # the inflated content, searched for plants
    assert not generated.find_planted(plain.getvalue(), uids=True)


def test_varying_issuers_give_one_patient_and_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issuer of Patient ID absent, reformatted or with text: one pseudonym and one date offset
    per patient across all its studies; the command's summary says which attribute differed."""
    manifest = generate(
        tmp_path / "in", patients=2, studies_per_patient=2, issuer_variants=True, seed=77
    )
    config = tmp_path / "anonpipe.toml"
    config.write_text(
        f'[pipeline]\ndata_dir = "{tmp_path}/data"\n'
        f'[anon]\nidentity_db = "{tmp_path}/id.db"\nkey_file = "{tmp_path}/anon.key"\n'
    )
    out = tmp_path / "out"
    assert main(["anonymize", "-c", str(config), str(manifest.root), str(out), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "differ from their study's first object in Issuer of Patient ID" in printed
    assert not manifest.find_planted(printed.encode(), uids=True)
    outputs = [pydicom.dcmread(p, stop_before_pixels=True) for p in out.rglob("*.dcm")]
    assert len(outputs) == len(manifest.instances)
    patients: dict[str, set[str]] = {}
    for ds in outputs:
        patients.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.PatientID))
    assert len(patients) == 4 and all(len(p) == 1 for p in patients.values())
    assert len({p for ps in patients.values() for p in ps}) == 2
    for patient in manifest.patients:
        offsets = set()
        for study in patient.studies:
            source = pydicom.dcmread(study.instances[0].path, stop_before_pixels=True)
            shifted = {
                str(ds.StudyDate)
                for ds in outputs
                if str(ds.StudyInstanceUID)
                == keyed_uid(load_or_create_key(tmp_path / "anon.key"), study.study_instance_uid)
            }
            (date,) = shifted
            offsets.add(_days(str(source.StudyDate), date))
        assert len(offsets) == 1
