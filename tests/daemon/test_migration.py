"""Acceptance of the migration from the old pipeline, end to end with real Orthanc servers.

The old pipeline published one study of a patient; the research PACS holds it under the old
pipeline's UIDs and pseudonyms. Its identity.db is refused unchanged, then imported; both of the
patient's studies are approved and run once: the published one arrives again under its old UIDs
(no second copy), the new one under keyed UIDs with the same patient pseudonym.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from anonpipe import cli
from anonpipe.daemon.rundir import RunDir
from tests.harness.deployment import StudyPlan, build_site
from tests.harness.oldidentity import OldIdentityDB, published_copy
from tests.harness.orthanc import OrthancFactory

pytestmark = pytest.mark.timeout(300)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_republished_study_keeps_its_old_uids_and_a_new_one_the_patients_pseudonym(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    staging, research = orthanc_factory("STAGING"), orthanc_factory("RESEARCH")
    plan = StudyPlan(
        approved=1,
        approved_with_protocol=0,
        rejected_phi=0,
        conflicting=0,
        missing_from_staging=0,
        studies_per_patient=2,
    )
    site, _port = build_site(
        tmp_path / "site", staging, research, plan, socket_path=short_dir / "control.sock"
    )
    (manifest,) = site.manifests
    (patient,) = manifest.patients
    old_study, new_study = patient.studies

    # What the old pipeline left behind: its identity.db, and the study in the research PACS.
    old = OldIdentityDB(site.root / "old" / "identity.db")
    published = old.publish(old_study, patient.patient_name, studydate=old_study.study_date)
    for instance in old_study.instances:
        research.upload_bytes(published_copy(instance.path, published))
    assert research.study_instance_uids() == {published.study_uid}
    held = len(research.instances())

    # Pointed at the old file, anonpipe refuses to start and leaves it byte-identical.
    config = str(site.config_path)
    identity_db = site.root / "identity.db"
    shutil.copyfile(old.path, identity_db)
    before = _digest(identity_db)
    assert cli.main(["run-once", "-c", config]) == 2
    assert _digest(identity_db) == before
    assert sorted(p.name for p in site.root.glob("identity.db*")) == ["identity.db"]
    identity_db.unlink()

    old_before = _digest(old.path)
    assert cli.main(["import-identity", "-c", config, str(old.path), "--dry-run"]) == 0
    assert not identity_db.exists()
    assert cli.main(["import-identity", "-c", config, str(old.path)]) == 0
    assert _digest(old.path) == old_before

    assert cli.main(["run-once", "-c", config]) == 0

    # The published study arrived again under its old UIDs: no second copy of it.
    assert len(research.studies()) == 2
    new_uids = research.study_instance_uids() - {published.study_uid}
    (new_uid,) = new_uids
    assert new_uid.startswith("2.25.")
    old_sops = {published.uids[i.sop_instance_uid] for i in old_study.instances}
    assert research.sop_instance_uids(published.study_uid) == old_sops
    assert len(research.instances()) == held + len(new_study.instances)
    (run,) = RunDir.list(site.data_dir)
    pushed = "\n".join(run.read_lines("push_output.txt"))
    assert f"{published.study_uid}\t{held} of {held} files in the research PACS ({held} were" in (
        pushed
    )

    # The new study: new UIDs, the patient's (old) pseudonym.
    patients = set()
    for instance_id in research.instances():
        ds = dcmread(io.BytesIO(research.download(instance_id)), stop_before_pixels=True)
        patients.add((str(ds.PatientID), str(ds.PatientName)))
        if ds.StudyInstanceUID == new_uid:
            assert ds.SeriesInstanceUID.startswith("2.25.")
            assert ds.SOPInstanceUID.startswith("2.25.")
            assert ds.AccessionNumber != published.accession
        assert not manifest.find_planted(research.download(instance_id), uids=True)
    assert patients == {(published.patient_id, published.patient_name)}

    # The review DB learns the studies' cleaned UIDs: the old one for the re-published study.
    assert site.review.find_study(old_study.study_instance_uid).study_uid == published.study_uid
    assert site.review.find_study(new_study.study_instance_uid).study_uid == new_uid
