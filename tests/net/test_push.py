"""Pushing to a real research Orthanc: every file lands, C-FIND agrees, a down peer is retried."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from pynetdicom import AE, evt

from anonpipe.config import LocalSettings, Peer, ResearchSettings
from anonpipe.scp import LandingRegistry, StorageSCP
from anonpipe.scu import (
    FileResult,
    PushItem,
    end_open_associations,
    push_files,
    push_items,
    push_tree,
    read_item,
    store,
    verify_studies,
)
from anonpipe.scu.store import NOT_SENT_STOPPED, _batches
from tests.harness.orthanc import OrthancFactory, OrthancServer
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.studygen import ALL_TRANSFER_SYNTAXES, SOP_CLASS_BY_MODALITY, Manifest
from tests.net.conftest import down_peer

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("associations", [1, 3])
def test_push_lands_every_file_and_cfind_agrees(
    local: LocalSettings,
    research: ResearchSettings,
    research_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    associations: int,
) -> None:
    manifest = study_factory(
        patients=2,
        series_per_study=2,
        instances_per_series=4,
        transfer_syntaxes=ALL_TRANSFER_SYNTAXES,
    )
    seen: list[FileResult] = []
    report = push_tree(
        local, research, manifest.root, associations=associations, on_result=seen.append
    )
    assert len(report.results) == 16 and not report.failed
    assert [r.path for r in report.results] == sorted(manifest.paths)
    assert all(r.outcome == "stored" and r.status == 0 and r.attempts == 1 for r in seen)
    assert research_orthanc.sop_instance_uids() == set(manifest.sop_instance_uids)
    checks = verify_studies(local, research, report.expected_per_study())
    assert {c.study_uid for c in checks} == set(manifest.study_uids)
    assert all(c.ok and c.found == 8 for c in checks)


def test_verification_reports_a_missing_instance(
    local: LocalSettings,
    research: ResearchSettings,
    research_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=3)
    report = push_files(local, research, manifest.paths)
    (study_uid,) = manifest.study_uids
    research_orthanc.delete(f"/instances/{research_orthanc.instance_ids(study_uid)[0]}")
    (check,) = verify_studies(local, research, report.expected_per_study())
    assert (check.ok, check.expected, check.found) == (False, 3, 2)


def test_research_down_is_retried_with_backoff_and_reported(
    local: LocalSettings,
    research: ResearchSettings,
    study_factory: Callable[..., Manifest],
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=3)
    waits: list[float] = []
    down = down_peer(research)
    report = push_files(
        local, down, manifest.paths, retries=3, retry_backoff=0.5, sleep=waits.append
    )
    assert waits == [0.5, 1.0, 2.0]
    assert len(report.failed) == 3 and not report.stored
    assert all(r.attempts == 4 and r.status is None for r in report.results)
    assert all("no connection" in r.error for r in report.results)
    (check,) = verify_studies(local, down, {next(iter(manifest.study_uids)): 3})
    assert not check.ok and check.found is None and "no connection" in check.error


def _our_scp_as_research(
    local: LocalSettings,
) -> tuple[ResearchSettings, LandingRegistry, StorageSCP]:
    """A research PACS the test can watch: our own SCP (not started) taking pushes from us."""
    receiver_settings = replace(local, ae_title="RESEARCH", port=free_port())
    target = ResearchSettings(ae_title="RESEARCH", host=LOOPBACK, port=receiver_settings.port)
    registry = LandingRegistry()
    receiver = StorageSCP(receiver_settings, [Peer(local.ae_title, LOOPBACK)], registry)
    return target, registry, receiver


def test_research_coming_back_during_retries_gets_everything(
    local: LocalSettings,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """The peer is down at first and starts during the backoff; the retry round delivers."""
    manifest = study_factory(series_per_study=1, instances_per_series=3)
    target, registry, receiver = _our_scp_as_research(local)
    waits: list[float] = []

    def start_receiver(seconds: float) -> None:
        waits.append(seconds)
        receiver.start()

    try:
        with registry.expect(next(iter(manifest.study_uids)), tmp_path / "received") as landing:
            report = push_files(
                local, target, manifest.paths, retry_backoff=0.1, sleep=start_receiver
            )
            assert landing.landed == 3
    finally:
        receiver.stop()
    assert waits == [0.1]
    assert not report.failed and all(r.attempts == 2 for r in report.results)


def test_a_stopped_push_sends_no_further_file_and_says_so(
    local: LocalSettings,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """Stop is set when the second object lands: exactly two arrive, the rest are not sent."""
    manifest = study_factory(series_per_study=1, instances_per_series=6)
    target, registry, receiver = _our_scp_as_research(local)
    stop = threading.Event()
    arrived: list[object] = []

    def on_arrival(arrival: object) -> None:
        arrived.append(arrival)
        if len(arrived) == 2:
            stop.set()

    receiver.start()
    try:
        study = next(iter(manifest.study_uids))
        with registry.expect(study, tmp_path / "received", on_arrival) as landing:
            report = push_files(local, target, sorted(manifest.paths), stop=stop, associations=1)
            assert landing.landed == 2
    finally:
        receiver.stop()
    assert report.stopped
    assert [r.outcome for r in report.results] == ["stored"] * 2 + ["failed"] * 4
    assert all(r.error == NOT_SENT_STOPPED and r.attempts == 0 for r in report.failed)


def test_stop_ends_a_retry_wait(
    local: LocalSettings,
    research: ResearchSettings,
    study_factory: Callable[..., Manifest],
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=2)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    report = push_files(
        local, down_peer(research), manifest.paths, retries=3, retry_backoff=60, stop=stop
    )
    assert time.monotonic() - started < 10
    assert report.stopped and len(report.failed) == 2
    assert all(r.attempts == 1 and "no connection" in r.error for r in report.results)


def test_unreadable_file_fails_alone(
    local: LocalSettings,
    research: ResearchSettings,
    research_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=2)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    report = push_files(local, research, [*manifest.paths, junk])
    assert [r.outcome for r in report.results] == ["stored", "stored", "failed"]
    assert (
        report.results[2].attempts == 0 and "not a readable DICOM file" in report.results[2].error
    )
    assert len(research_orthanc.instances()) == 2


def test_contexts_are_split_at_128_per_association() -> None:
    items = [
        PushItem(
            Path(f"{n}.dcm"),
            sop_class_uid=f"1.2.840.10008.5.1.4.1.1.{n % 200}",
            sop_instance_uid=f"1.2.3.{n}",
            transfer_syntax="1.2.840.10008.1.2.1",
            study_uid="1.2.3",
        )
        for n in range(300)
    ]
    batches = _batches(items)
    # 200 SOP classes in one syntax: two associations, each item in the one proposing its class.
    assert [len(contexts) for _, contexts in batches] == [128, 72]
    for batch, contexts in batches:
        assert {i.sop_class_uid for i in batch} == {c.abstract_syntax for c in contexts}
    assert sorted(item.path for batch, _ in batches for item in batch) == sorted(
        i.path for i in items
    )


def test_a_research_pacs_that_aborts_is_an_answer_not_a_timeout(
    orthanc_factory: OrthancFactory,
    local: LocalSettings,
    study_factory: Callable[..., Manifest],
) -> None:
    """Our AE title not allowed to store there: Orthanc aborts the association at the C-STORE.
    Each attempt ends at once with the reason; the retries follow; no DIMSE timeout is waited."""
    refusing = orthanc_factory("RESEARCH", extra_config={"DicomAlwaysAllowStore": False})
    research = ResearchSettings(
        ae_title="RESEARCH", host=LOOPBACK, port=refusing.dicom_port, retries=2, retry_backoff=0.1
    )
    manifest = study_factory(series_per_study=1, instances_per_series=3)
    started = time.monotonic()
    report = push_files(replace(local, dimse_timeout=120), research, manifest.paths)
    assert time.monotonic() - started < 15
    assert len(report.failed) == 3 and not report.stored
    for result in report.failed:
        assert result.error.startswith("aborted by the peer"), result.error
        assert result.attempts == 3
    assert not refusing.instances()


def test_stopping_ends_a_wait_on_a_silent_peer(
    local: LocalSettings, study_factory: Callable[..., Manifest]
) -> None:
    """A peer that takes the C-STORE and never answers: end_open_associations (what SIGTERM
    does) ends the wait at once with its reason, instead of the DIMSE timeout."""
    release = threading.Event()

    def never_answer(_event: object) -> int:
        release.wait(60)
        return 0x0000

    silent = AE(ae_title="SILENT")
    for sop_class in SOP_CLASS_BY_MODALITY.values():
        silent.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = silent.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, never_answer)]
    )
    try:
        peer = ResearchSettings(ae_title="SILENT", host=LOOPBACK, port=port, retries=0)
        manifest = study_factory(series_per_study=1, instances_per_series=2)
        stop = threading.Event()

        def sigterm() -> None:
            time.sleep(1.0)
            stop.set()
            assert end_open_associations("the service is stopping") == 1

        threading.Thread(target=sigterm, daemon=True).start()
        started = time.monotonic()
        report = push_files(
            replace(local, dimse_timeout=120), peer, manifest.paths, stop=stop, associations=1
        )
        assert time.monotonic() - started < 10
        assert report.failed[0].error == "the service is stopping"
        assert report.stopped
    finally:
        release.set()
        assert server is not None
        server.shutdown()


def test_push_items_sends_ready_made_items_without_reading_a_header(
    local: LocalSettings,
    research: ResearchSettings,
    research_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the daemon does: items from its state store, in order, two associations."""
    manifest = study_factory(
        series_per_study=2, instances_per_series=3, transfer_syntaxes=ALL_TRANSFER_SYNTAXES
    )
    items = [read_item(path) for path in sorted(manifest.paths)]

    def no_header(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("push_items read a header")

    monkeypatch.setattr(store, "read_header", no_header)
    monkeypatch.setattr(store, "read_item", no_header)
    stored: list[None] = []
    report = push_items(
        local, research, items, associations=2, on_stored=lambda: stored.append(None)
    )
    assert [r.path for r in report.results] == [item.path for item in items]
    assert all(r.outcome == "stored" and r.attempts == 1 for r in report.results)
    assert [r.sop_instance_uid for r in report.results] == [i.sop_instance_uid for i in items]
    assert report.expected_per_study() == {items[0].study_uid: 6} and len(stored) == 6
    assert research_orthanc.sop_instance_uids() == set(manifest.sop_instance_uids)


def test_push_items_reports_a_missing_file_alone(
    local: LocalSettings,
    research: ResearchSettings,
    research_orthanc: OrthancServer,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=2)
    items = [read_item(path) for path in sorted(manifest.paths)]
    gone = replace(items[0], path=tmp_path / "deleted.dcm", sop_instance_uid="1.2.3.4")
    report = push_items(local, research, [gone, *items], retries=0)
    assert [r.outcome for r in report.results] == ["failed", "stored", "stored"]
    assert report.results[0].error == "cannot send the file (FileNotFoundError)"
    assert len(research_orthanc.instances()) == 2
