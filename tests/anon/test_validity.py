"""Valid output: what the IOD requires stays present, multi-valued text splits on value
boundaries, and a file the rules cannot place gets a reason that says why. Judged by dciodvfy
(Debian dicom3tools) where it is installed, and by the parsed output."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from anonpipe.anon.batch import EngineSpec, run_batch
from anonpipe.anon.deidentify import Outcome
from anonpipe.anon.identity import load_or_create_key
from tests.harness import dciodvfy
from tests.harness.studygen import generate


def _run(paths: list[Path], tmp: Path) -> list[Outcome]:
    spec = EngineSpec(
        identity_db=tmp / "identity.db",
        key=load_or_create_key(tmp / "anon.key"),
        options=("clean_descriptors",),
        dates="shift",
        allowed_modalities=("*",),
    )
    outcomes: list[Outcome] = []
    run_batch(paths, tmp / "clean", tmp / "quarantine", spec, 1, outcomes.append)
    return outcomes


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest = generate(tmp_path_factory.mktemp("gen"), instances_per_series=1, seed=31)
    return manifest.instances[0].path


def test_non_human_patients_keep_their_type_2c_attributes(source: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(source)
    ds.PatientSpeciesDescription = "Canis lupus familiaris"
    ds.PatientBreedDescription = "Beagle"
    ds.ResponsiblePerson = "OWNER^PLANTEDNAME"
    ds.ResponsibleOrganization = "PLANTED KENNEL CLUB"
    animal = tmp_path / "animal.dcm"
    ds.save_as(animal)
    (outcome,) = _run([animal], tmp_path)
    assert outcome.status == "clean" and outcome.output is not None
    out = pydicom.dcmread(outcome.output)
    for keyword in ("ResponsiblePerson", "ResponsibleOrganization"):
        assert keyword in out and not out[keyword].value  # present, empty
    data = outcome.output.read_bytes().lower()
    assert b"plantedname" not in data and b"planted kennel" not in data
    if dciodvfy.available():
        assert len(dciodvfy.errors(outcome.output)) <= len(dciodvfy.errors(animal))


def test_a_human_patient_has_them_removed(source: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(source)
    ds.ResponsiblePerson = "GUARDIAN^PLANTEDNAME"
    human = tmp_path / "human.dcm"
    ds.save_as(human)
    (outcome,) = _run([human], tmp_path)
    assert outcome.output is not None
    assert "ResponsiblePerson" not in pydicom.dcmread(outcome.output)


def test_method_values_split_on_statements_within_lo(source: Path, tmp_path: Path) -> None:
    (outcome,) = _run([source], tmp_path)
    assert outcome.output is not None
    values = list(pydicom.dcmread(outcome.output).DeidentificationMethod)
    assert all(0 < len(v) <= 64 for v in values)
    assert "Basic Application Confidentiality Profile" in values  # whole, not cut mid-word
    assert "Unknown public elements removed" in values


def test_a_file_without_modality_says_so(source: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(source)
    del ds.Modality
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare)
    (outcome,) = _run([bare], tmp_path)
    assert outcome.status == "quarantined" and outcome.reason == "no Modality (0008,0060)"


def test_referenced_study_sequence_is_removed_not_emptied(source: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(source)
    assert ds.ReferencedStudySequence  # the generator plants one
    (outcome,) = _run([source], tmp_path)
    assert outcome.output is not None
    assert "ReferencedStudySequence" not in pydicom.dcmread(outcome.output)


def _as_un(path: Path, keyword: str, dest: Path) -> Path:
    """`path` with element `keyword` re-encoded as explicit VR UN, as a PACS that did not know
    the tag would store it."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(path)
    tag = tag_for_keyword(keyword)
    assert tag is not None
    value = ds[tag].value
    raw = value.encode() if isinstance(value, str) else bytes(value)
    del ds[tag]
    ds.add(DataElement(tag, "UN", raw + b" " * (len(raw) % 2)))
    ds.save_as(dest)
    return dest


def test_a_known_element_stored_as_un_is_kept_as_its_vr(source: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(source)
    ds.ConvolutionKernel = "STANDARD"  # (0018,1210), not in Table E.1-1: kept
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain)
    (outcome,) = _run([_as_un(plain, "ConvolutionKernel", tmp_path / "un.dcm")], tmp_path)
    assert outcome.status == "clean" and outcome.output is not None
    out = pydicom.dcmread(outcome.output)
    assert out["ConvolutionKernel"].VR == "SH" and out.ConvolutionKernel == "STANDARD"


def test_an_identifier_in_an_element_stored_as_un_is_still_caught(
    source: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(source)
    ds.ConvolutionKernel = str(ds.PatientID)
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain)
    (outcome,) = _run([_as_un(plain, "ConvolutionKernel", tmp_path / "un.dcm")], tmp_path)
    assert outcome.status == "quarantined" and outcome.reason == "residual PHI"
