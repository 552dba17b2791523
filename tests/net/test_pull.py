"""Pulling from a real staging Orthanc through our SCP: exact accounting and misroute detection."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from anonpipe import cli
from anonpipe.config import LocalSettings, Peer, ResearchSettings, StagingSettings
from anonpipe.scp import Arrival, LandingRegistry, StorageSCP
from anonpipe.scu import (
    MisrouteError,
    MisrouteGuard,
    PeerUnavailable,
    PullBlocked,
    PullResult,
    count_study,
    echo,
    pull_study,
    push_files,
)
from tests.harness.dcmtk import DcmtkError, StoreSCP, storescu
from tests.harness.orthanc import OrthancServer
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.studygen import ALL_TRANSFER_SYNTAXES, Manifest
from tests.net.conftest import OUR_AE, start_scp

pytestmark = pytest.mark.timeout(180)


def test_a_stopped_pull_keeps_what_landed_and_a_later_pull_completes(
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    staging_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """Stop is set when the 5th object lands: the move is aborted, not waited for."""
    manifest = study_factory(series_per_study=2, instances_per_series=100)
    staging_orthanc.upload(manifest.paths)
    (study_uid,) = manifest.study_uids
    stop = threading.Event()
    landed: list[Arrival] = []

    def on_arrival(arrival: Arrival) -> None:
        landed.append(arrival)
        if len(landed) == 5:
            stop.set()

    landing_dir = tmp_path / "from_staging"
    result = pull_study(
        local, staging, registry, study_uid, landing_dir, on_arrival=on_arrival, stop=stop
    )
    assert result.status == "stopped" and not result.complete
    assert 5 <= result.landed < 200 and result.expected == 200
    assert len(list(landing_dir.iterdir())) == result.landed  # each landed file whole, kept
    again = pull_study(local, staging, registry, study_uid, landing_dir)
    assert again.status == "complete", again.detail
    assert {p.name for p in landing_dir.iterdir()} == {
        f"{uid}.dcm" for uid in manifest.sop_instance_uids
    }


def test_echo_staging_and_a_peer_that_is_down(
    local: LocalSettings, staging: StagingSettings
) -> None:
    up = echo(local, staging)
    assert up.ok and up.status == 0 and up.peer == f"STAGING@127.0.0.1:{staging.port}"
    down = echo(local, replace(staging, port=free_port()))
    assert not down.ok and "no connection (refused" in down.error


def test_pull_counts_a_study_exactly(
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    staging_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    manifest = study_factory(
        series_per_study=3, instances_per_series=5, transfer_syntaxes=ALL_TRANSFER_SYNTAXES
    )
    noise = study_factory(series_per_study=1, instances_per_series=2)  # another study, not pulled
    staging_orthanc.upload(manifest.paths + noise.paths)
    study_uid = manifest.studies[0].study_instance_uid
    arrivals: list[Arrival] = []
    threads: set[str] = set()

    def on_arrival(arrival: Arrival) -> None:
        arrivals.append(arrival)
        threads.add(threading.current_thread().name)

    landing_dir = tmp_path / "run" / "from_staging"
    result = pull_study(local, staging, registry, study_uid, landing_dir, on_arrival=on_arrival)

    assert result.status == "complete", result.detail
    assert (result.expected, result.expected_series) == (15, 3)
    assert result.completed == result.landed == 15 and result.failed == 0
    assert {p.name for p in landing_dir.iterdir()} == {
        f"{uid}.dcm" for uid in manifest.sop_instance_uids
    }
    # Each file was reported as it landed, from the SCP's threads, not after the pull.
    assert {a.sop_instance_uid for a in arrivals} == set(manifest.sop_instance_uids)
    assert threading.current_thread().name not in threads
    assert all(a.move_originator_ae == OUR_AE for a in arrivals)
    assert len(registry) == 0  # the expectation ended with the pull


def test_our_own_refusal_is_not_blamed_on_the_staging_pacs(
    registry: LandingRegistry,
    local: LocalSettings,
    staging_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """Our SCP does not allow the staging PACS (its AE title missing from allowed_peers): the
    pull's reason says our SCP refused it, not "check the PACS's address"."""
    mine = replace(local, port=free_port())
    scp = start_scp(mine, registry, [Peer("SOMEONE-ELSE", LOOPBACK)])
    try:
        manifest = study_factory(series_per_study=1, instances_per_series=2)
        staging_orthanc.upload(manifest.paths)
        staging_orthanc.add_modality("anonpipe", OUR_AE, LOOPBACK, mine.port)
        staging = StagingSettings(
            ae_title=staging_orthanc.aet, host=LOOPBACK, port=staging_orthanc.dicom_port
        )
        study_uid = manifest.studies[0].study_instance_uid
        result = pull_study(mine, staging, registry, study_uid, tmp_path / "in", grace=0.5)
    finally:
        scp.stop(drain_timeout=1)
    assert result.status == "undeliverable" and result.landed == 0
    assert "our own SCP refused the staging PACS's connections" in result.detail
    assert "address for our AE title" not in result.detail


def test_a_study_filed_under_two_patients_is_counted_whole(
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    staging_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """Objects of one study that disagree on Patient ID: Orthanc files the study under each
    patient and answers the study C-FIND once per patient; the C-MOVE sends them all."""
    manifest = study_factory(series_per_study=2, instances_per_series=3)
    variant = tmp_path / "variant.dcm"
    ds = pydicom.dcmread(manifest.paths[0])
    ds.PatientID = f"{ds.PatientID}-OTHER"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(variant)
    staging_orthanc.upload([*manifest.paths, variant])
    study_uid = manifest.studies[0].study_instance_uid
    assert len(staging_orthanc.studies()) == 2  # one study UID, two Orthanc studies

    result = pull_study(local, staging, registry, study_uid, tmp_path / "from_staging")
    assert result.status == "complete", result.detail
    assert result.expected == result.completed == result.landed == 7


def test_pull_of_an_unknown_study_and_of_a_down_staging(
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    tmp_path: Path,
) -> None:
    result = pull_study(local, staging, registry, "1.2.3.4.5", tmp_path / "from_staging")
    assert result.status == "not found" and result.landed == 0
    assert count_study(local, staging, "1.2.3.4.5") is None
    with pytest.raises(PeerUnavailable, match="no connection"):
        pull_study(local, replace(staging, port=free_port()), registry, "1.2.3", tmp_path / "x")


def test_misrouted_move_is_detected_and_blocks_further_pulls(
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    staging_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    manifest = study_factory(series_per_study=2, instances_per_series=3)
    staging_orthanc.upload(manifest.paths)
    study_uid = manifest.studies[0].study_instance_uid
    guard = MisrouteGuard(tmp_path / "misroute.json")
    elsewhere = tmp_path / "elsewhere"
    # Another machine answers to our AE title; staging maps ANONPIPE to it.
    with StoreSCP(elsewhere, aet=OUR_AE) as wrong_host:
        staging_orthanc.add_modality("anonpipe", OUR_AE, LOOPBACK, wrong_host.port)
        with pytest.raises(MisrouteError, match="maps AE title ANONPIPE to another host or port"):
            pull_study(
                local,
                staging,
                registry,
                study_uid,
                tmp_path / "from_staging",
                guard=guard,
                grace=0.5,
            )
        assert len(wrong_host.received()) == 6  # where the images went instead
    assert not list((tmp_path / "from_staging").iterdir())
    assert guard.tripped is not None

    # Refused until an operator acts, also after a restart (the latch is on disk).
    staging_orthanc.add_modality("anonpipe", OUR_AE, LOOPBACK, local.port)
    with pytest.raises(PullBlocked, match="pulls are stopped"):
        pull_study(local, staging, registry, study_uid, tmp_path / "again", guard=guard)
    restarted = MisrouteGuard(tmp_path / "misroute.json")
    with pytest.raises(PullBlocked):
        restarted.check()
    assert study_uid not in (tmp_path / "misroute.json").read_text()

    assert restarted.clear() is True
    result = pull_study(local, staging, registry, study_uid, tmp_path / "again", guard=restarted)
    assert result.status == "complete" and result.landed == 6


def test_staging_that_cannot_reach_us_is_undeliverable_not_misrouted(
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    staging_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=2)
    staging_orthanc.upload(manifest.paths)
    staging_orthanc.add_modality("anonpipe", OUR_AE, LOOPBACK, free_port())  # nobody listens
    guard = MisrouteGuard()
    result = pull_study(
        local,
        staging,
        registry,
        manifest.studies[0].study_instance_uid,
        tmp_path / "in",
        guard=guard,
        grace=0.5,
    )
    assert result.status == "undeliverable" and result.landed == 0
    assert "address for our AE title" in result.detail
    assert guard.tripped is None


def test_refused_objects_make_a_pull_incomplete(
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    staging_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """A free-space floor refuses every object: the PACS counts failures, nothing is lost."""
    manifest = study_factory(series_per_study=1, instances_per_series=3)
    staging_orthanc.upload(manifest.paths)
    scp.lander.min_free_bytes = 2**62
    result = pull_study(
        local,
        staging,
        registry,
        manifest.studies[0].study_instance_uid,
        tmp_path / "in",
        grace=0.5,
    )
    # Orthanc gives up the whole move at the first refused sub-operation (final 0xC000).
    assert result.status == "incomplete" and result.move_status is not None
    assert result.refused >= 1 and result.landed == 0 and result.completed == 0
    assert "refused" in result.detail
    assert staging_orthanc.count_instances(manifest.studies[0].study_instance_uid) == 3


def test_pull_push_and_refusals_log_no_identifiers(
    log_output: io.StringIO,
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    staging_orthanc: OrthancServer,
    research: ResearchSettings,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """At debug level, a pull, a push, an unsolicited store and a misroute leave no PHI."""
    manifest = study_factory(series_per_study=2, instances_per_series=2)
    unsolicited = study_factory(series_per_study=1, instances_per_series=1)
    staging_orthanc.upload(manifest.paths + unsolicited.paths)
    study_uid = manifest.studies[0].study_instance_uid
    landing_dir = tmp_path / "from_staging"
    assert pull_study(local, staging, registry, study_uid, landing_dir).complete
    with pytest.raises(DcmtkError):
        storescu(scp.port, unsolicited.paths, called_aet=OUR_AE)
    assert not push_files(local, research, sorted(landing_dir.iterdir())).failed
    with StoreSCP(tmp_path / "elsewhere", aet=OUR_AE) as wrong_host:
        staging_orthanc.add_modality("anonpipe", OUR_AE, LOOPBACK, wrong_host.port)
        with pytest.raises(MisrouteError):
            pull_study(local, staging, registry, study_uid, tmp_path / "again", grace=0.2)

    output = log_output.getvalue()
    for event in ("pull finished", "object refused", "push finished", "misroute detected"):
        assert event in output, f"{event!r} was not logged, so the test proves nothing"
    leaked = manifest.find_planted(output.encode(), uids=True) | unsolicited.find_planted(
        output.encode(), uids=True
    )
    assert not leaked, f"{len(leaked)} planted identifiers or UIDs reached the log"


def test_echo_command_reports_each_peer(
    local: LocalSettings,
    staging: StagingSettings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "anonpipe.toml"
    config.write_text(
        f'[local]\nae_title = "{local.ae_title}"\n'
        f'[staging]\nhost = "127.0.0.1"\nport = {staging.port}\n'
        f'[research]\nhost = "127.0.0.1"\nport = {free_port()}\nconnect_timeout = 2\n'
        f'[pipeline]\ndata_dir = "{tmp_path / "data"}"\n'
    )
    assert cli.main(["echo", "-c", str(config), "staging"]) == 0
    assert "staging: STAGING@127.0.0.1" in capsys.readouterr().out
    assert cli.main(["echo", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert "staging: STAGING@127.0.0.1" in out and ": ok (" in out
    assert "research: RESEARCH@127.0.0.1" in out and "FAILED: no connection" in out


#: Siemens' CSA Non-Image Storage: a private SOP class real studies carry.
PRIVATE_SOP_CLASS = "1.3.12.2.1107.5.9.1"
#: Not a DICOM SOP class at all, not even a vendor's: the SCP must still take it.
UNKNOWN_SOP_CLASS = "1.2.826.0.1.3680043.9.7433.99.1"


def test_private_and_unknown_sop_classes_are_pulled_too(
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    staging_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """Vendors' private classes are common in clinical studies; refusing them would make the
    whole study's pull incomplete."""
    manifest = study_factory(series_per_study=1, instances_per_series=4)
    changed = zip(manifest.paths[:2], (PRIVATE_SOP_CLASS, UNKNOWN_SOP_CLASS), strict=True)
    for path, sop_class in changed:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
        ds.save_as(path, enforce_file_format=True)
    staging_orthanc.upload(manifest.paths)
    (study_uid,) = manifest.study_uids
    landing_dir = tmp_path / "from_staging"
    result = pull_study(local, staging, registry, study_uid, landing_dir)
    assert result.status == "complete", result.detail
    assert result.landed == 4
    classes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in landing_dir.iterdir()
    }
    assert {PRIVATE_SOP_CLASS, UNKNOWN_SOP_CLASS} < classes


def test_concurrent_pulls_land_each_study_in_its_own_folder(
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    staging_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """The daemon runs up to ``[staging] max_parallel_moves`` pulls at once, one thread each,
    into the one SCP: each study's objects land in its own folder and are counted there only."""
    studies = [study_factory(series_per_study=2, instances_per_series=n) for n in (12, 9, 15)]
    staging_orthanc.upload([p for m in studies for p in m.paths])
    arrived: dict[str, set[str]] = {}
    lock = threading.Lock()

    def pull(manifest: Manifest, folder: Path) -> object:
        (study_uid,) = manifest.study_uids

        def on_arrival(arrival: Arrival) -> None:
            with lock:
                arrived.setdefault(study_uid, set()).add(arrival.study_uid)

        return pull_study(local, staging, registry, study_uid, folder, on_arrival=on_arrival)

    folders = [tmp_path / "from_staging" / str(n) for n in range(len(studies))]
    with ThreadPoolExecutor(len(studies)) as pool:
        results = list(pool.map(pull, studies, folders))

    for manifest, folder, result in zip(studies, folders, results, strict=True):
        (study_uid,) = manifest.study_uids
        assert isinstance(result, PullResult)
        assert result.status == "complete", result.detail
        assert result.landed == result.expected == len(manifest.paths)
        assert {p.name for p in folder.iterdir()} == {
            f"{uid}.dcm" for uid in manifest.sop_instance_uids
        }
        assert arrived[study_uid] == {study_uid}  # each pull was told of its own objects only
    assert len(registry) == 0
    assert scp.status().landed == sum(len(m.paths) for m in studies)
