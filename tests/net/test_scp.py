"""The resident Storage SCP against real senders: DCMTK storescu/echoscu, pynetdicom, Orthanc."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE

from anonpipe.config import LocalSettings, Peer, ResearchSettings
from anonpipe.dimse import Status
from anonpipe.scp import Arrival, LandingError, LandingRegistry, StorageSCP
from anonpipe.scp.lander import BELOW_FLOOR
from anonpipe.scu import push_files
from tests.harness.dcmtk import DcmtkError, echoscu, storescu
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.studygen import ALL_TRANSFER_SYNTAXES, Manifest
from tests.harness.tmpfs import small_tmpfs
from tests.net.conftest import OUR_AE, start_scp

pytestmark = pytest.mark.timeout(120)


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: everything after preamble and file meta."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL value
    return data[144 + meta_length :]


def _pyscu_store(port: int, dataset: Dataset, calling: str = "PYSCU") -> int | None:
    """C-STORE one dataset with pynetdicom; the response status, None if none came."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate(LOOPBACK, port, ae_title=OUR_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    return int(status.Status) if "Status" in status else None


def test_store_lands_every_syntax_unchanged(
    scp: StorageSCP,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    manifest = study_factory(
        series_per_study=3, instances_per_series=4, transfer_syntaxes=ALL_TRANSFER_SYNTAXES
    )
    (study,) = manifest.studies
    arrivals: list[Arrival] = []
    landing_dir = tmp_path / "from_staging"
    with registry.expect(study.study_instance_uid, landing_dir, arrivals.append) as landing:
        storescu(scp.port, [manifest.root], called_aet=OUR_AE)
        assert landing.landed == 12
    landed = {p.name for p in landing_dir.iterdir()}
    assert landed == {f"{uid}.dcm" for uid in manifest.sop_instance_uids}
    assert {a.sop_instance_uid for a in arrivals} == set(manifest.sop_instance_uids)
    for instance in manifest.instances:
        out = dcmread(landing_dir / f"{instance.sop_instance_uid}.dcm")
        sent = dcmread(instance.path)
        # storescu may re-encode between uncompressed syntaxes; the content is what was sent.
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName"):
            assert out[keyword].value == sent[keyword].value
        if out.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID:
            assert out.PixelData == sent.PixelData
        assert out.file_meta.MediaStorageSOPInstanceUID == instance.sop_instance_uid
    # Nothing left behind in the temporary folder, nothing hidden in the landing folder.
    assert not [p for p in landing_dir.iterdir() if p.name.startswith(".")]
    assert scp.status().landed == 12


def test_received_bytes_are_written_without_decoding(
    scp: StorageSCP,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
    local: LocalSettings,
) -> None:
    """Sent as-is from files (our push), every data set lands byte for byte, in its syntax."""
    manifest = study_factory(
        series_per_study=3, instances_per_series=2, transfer_syntaxes=ALL_TRANSFER_SYNTAXES
    )
    sender = replace(local, ae_title="PYSCU", port=free_port())
    us = ResearchSettings(ae_title=OUR_AE, host=LOOPBACK, port=scp.port, retries=0)
    landing_dir = tmp_path / "from_staging"
    with registry.expect(manifest.studies[0].study_instance_uid, landing_dir):
        report = push_files(sender, us, manifest.paths)
    assert [r.outcome for r in report.results] == ["stored"] * 6
    for instance in manifest.instances:
        out = landing_dir / f"{instance.sop_instance_uid}.dcm"
        assert _dataset_bytes(out) == _dataset_bytes(instance.path)
        assert dcmread(out).file_meta.TransferSyntaxUID == instance.transfer_syntax_uid


def test_unsolicited_store_is_refused(
    scp: StorageSCP,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    expected = study_factory(series_per_study=1, instances_per_series=1)
    other = study_factory(series_per_study=1, instances_per_series=2)
    landing_dir = tmp_path / "from_staging"
    with registry.expect(expected.studies[0].study_instance_uid, landing_dir) as landing:
        with pytest.raises(DcmtkError):
            storescu(scp.port, [other.root], called_aet=OUR_AE)
        status = _pyscu_store(scp.port, dcmread(other.paths[0]))
        assert landing.landed == 0
    assert status == Status.REFUSED_NOT_AUTHORIZED
    assert list(landing_dir.iterdir()) == []
    # storescu stops at its first refused object; pynetdicom sent one more.
    assert scp.status().refused == {"unsolicited: no pull expects it": 2}


@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("SOPInstanceUID", "../../../../tmp/evil"),
        ("SOPInstanceUID", "1.2.3/../../x"),
        ("SeriesInstanceUID", "1.2/.."),
        ("StudyInstanceUID", "../1.2.3"),
    ],
)
def test_traversal_shaped_uid_is_refused(
    scp: StorageSCP,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
    element: str,
    value: str,
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=1)
    dataset = dcmread(manifest.paths[0])
    setattr(dataset, element, value)
    if element == "SOPInstanceUID":
        dataset.file_meta.MediaStorageSOPInstanceUID = UID(value)
    landing_dir = tmp_path / "run" / "from_staging"
    with registry.expect(manifest.studies[0].study_instance_uid, landing_dir) as landing:
        status = _pyscu_store(scp.port, dataset)
        assert landing.landed == 0
    assert status is not None and status >= 0xA000
    assert list(landing_dir.iterdir()) == []
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_unknown_calling_ae_and_wrong_host_are_rejected(
    local: LocalSettings, registry: LandingRegistry
) -> None:
    # STAGING is allowed only from 10.9.8.7; we connect from 127.0.0.1.
    peers = [Peer("STAGING", "10.9.8.7"), Peer("ECHOSCU", LOOPBACK)]
    scp = start_scp(local, registry, peers)
    try:
        echoscu(scp.port, called_aet=OUR_AE, calling_aet="ECHOSCU")  # allowed peer answers
        with pytest.raises(DcmtkError, match=r"(?i)reject"):
            echoscu(scp.port, called_aet=OUR_AE, calling_aet="INTRUDER")
        with pytest.raises(DcmtkError, match=r"(?i)reject"):
            echoscu(scp.port, called_aet=OUR_AE, calling_aet="STAGING")
        with pytest.raises(DcmtkError, match=r"(?i)reject"):
            echoscu(scp.port, called_aet="SOMEONE", calling_aet="ECHOSCU")
        rejected = scp.status().rejected_associations
    finally:
        scp.stop()
    assert rejected == {
        "calling AE title is not an allowed peer": 1,
        "calling AE title is allowed, but not from this address": 1,
        "called AE title is not ours": 1,
    }


def test_free_space_floor_answers_out_of_resources(
    local: LocalSettings,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=1)
    scp = start_scp(local, registry, [Peer("PYSCU", LOOPBACK)], min_free_bytes=2**62)
    try:
        landing_dir = tmp_path / "from_staging"
        with registry.expect(manifest.studies[0].study_instance_uid, landing_dir) as landing:
            status = _pyscu_store(scp.port, dcmread(manifest.paths[0]))
            assert landing.refused == 1
        assert status == Status.OUT_OF_RESOURCES
        assert list(landing_dir.iterdir()) == []
        echoscu(scp.port, called_aet=OUR_AE, calling_aet="PYSCU")  # still serving
    finally:
        scp.stop()


def test_a_study_is_expected_by_one_pull_only(registry: LandingRegistry, tmp_path: Path) -> None:
    with registry.expect("1.2.3", tmp_path / "a"), pytest.raises(LandingError, match="already"):
        registry.register("1.2.3", tmp_path / "b")
    with pytest.raises(LandingError, match="valid UID"):
        registry.register("../1", tmp_path / "c")
    assert registry.get("1.2.3") is None


def test_stop_drains_an_active_association(
    scp: StorageSCP,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=3)
    landing_dir = tmp_path / "from_staging"
    with registry.expect(manifest.studies[0].study_instance_uid, landing_dir) as landing:
        ae = AE(ae_title="PYSCU")
        for path in manifest.paths[:1]:
            ds = dcmread(path)
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(LOOPBACK, scp.port, ae_title=OUR_AE)
        assert assoc.is_established
        stopped = threading.Event()
        aborted: list[int] = []

        def stop() -> None:
            aborted.append(scp.stop(drain_timeout=20))
            stopped.set()

        stopper = threading.Thread(target=stop)
        stopper.start()
        # The SCP no longer accepts, but the open association is served until released.
        statuses = [int(assoc.send_c_store(dcmread(p)).Status) for p in manifest.paths]
        assert not stopped.is_set()
        assoc.release()
        stopper.join(10)
        assert landing.landed == 3
    assert statuses == [0, 0, 0]
    assert aborted == [0]
    with pytest.raises(DcmtkError):
        echoscu(scp.port, called_aet=OUR_AE, calling_aet="STORESCU", timeout=5)


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root / CAP_SYS_ADMIN; skipped otherwise), unmounted afterwards."""
    with small_tmpfs(tmp_path / "tiny", "1m") as mountpoint:
        yield mountpoint


def test_full_disk_answers_out_of_resources_and_keeps_serving(
    local: LocalSettings,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tiny_filesystem: Path,
) -> None:
    """Objects of 512 KiB into 1 MiB: the first lands, the rest get 0xA700, on the same
    association, with nothing partial left behind; the SCP still answers afterwards."""
    manifest = study_factory(series_per_study=1, instances_per_series=4, size=(512, 512))
    spool_dir = tiny_filesystem / "incoming"
    spool_dir.mkdir()
    (spool_dir / "in-leftover.dcm").write_bytes(b"partial object of a crashed run")
    scp = start_scp(local, registry, [Peer("PYSCU", LOOPBACK)], spool_dir=spool_dir)
    try:
        assert not (spool_dir / "in-leftover.dcm").exists()  # swept at start
        sender = replace(local, ae_title="PYSCU", port=free_port())
        us = ResearchSettings(ae_title=OUR_AE, host=LOOPBACK, port=scp.port, retries=0)
        landing_dir = tiny_filesystem / "from_staging"
        with registry.expect(manifest.studies[0].study_instance_uid, landing_dir) as landing:
            # One association: with two (the default), which object lands first is a race.
            report = push_files(sender, us, manifest.paths, associations=1)
            assert landing.landed == 1
        assert [r.status for r in report.results] == [0, 0xA700, 0xA700, 0xA700]
        assert report.seconds < 10  # answered, not timed out
        assert list(spool_dir.iterdir()) == []
        assert len(list(landing_dir.iterdir())) == 1
        assert scp.status().refused == {"no space left on the landing filesystem": 3}
        echoscu(scp.port, called_aet=OUR_AE, calling_aet="PYSCU")
    finally:
        scp.stop()


def test_the_free_space_floor_holds_while_an_object_arrives(
    local: LocalSettings,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """A 20 MiB unsolicited object into a 24 MiB data disk with an 8 MiB floor: it used to be
    spooled whole (filling the disk a pull was landing on) before being refused. Now the spool
    stops at the floor, the answer is Out of Resources, and a legitimate object still lands."""
    big, small = (
        study_factory(series_per_study=1, instances_per_series=1, size=size)
        for size in ((2048, 2048), (256, 256))
    )
    floor = 8 << 20
    with small_tmpfs(tmp_path / "disk", "24m") as disk:
        (disk / "incoming").mkdir()
        scp = start_scp(
            local,
            registry,
            [Peer("PYSCU", LOOPBACK)],
            spool_dir=disk / "incoming",
            min_free_bytes=floor,
        )
        lowest = [shutil.disk_usage(disk).free]
        sending = threading.Event()

        def sample() -> None:
            while not sending.is_set():
                lowest[0] = min(lowest[0], shutil.disk_usage(disk).free)
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            ds = dcmread(big.paths[0])
            ds.Rows, ds.Columns = 2560, 4096
            ds.PixelData = os.urandom(20 << 20)  # 20 MiB: spooled whole, 4 MiB would be left
            assert _pyscu_store(scp.port, ds) == Status.OUT_OF_RESOURCES
            sending.set()
            sampler.join()
            assert lowest[0] >= floor - (1 << 20), f"free space fell to {lowest[0] >> 20} MiB"
            assert list((disk / "incoming").iterdir()) == []
            assert scp.status().refused == {BELOW_FLOOR: 1}
            small_ds = dcmread(small.paths[0])
            with registry.expect(str(small_ds.StudyInstanceUID), disk / "landing") as landing:
                assert _pyscu_store(scp.port, small_ds) == Status.SUCCESS
                assert landing.landed == 1
        finally:
            sending.set()
            scp.stop()


def test_a_transfer_cut_midway_leaves_no_partial_object(
    local: LocalSettings,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """The sender dies in the middle of a 64 MB object: its spool file (patient data) goes when
    the connection closes, not at the next restart months later; the SCP keeps serving."""
    manifest = study_factory(series_per_study=1, instances_per_series=1)
    (path,) = manifest.paths
    ds = dcmread(path)
    ds.Rows = ds.Columns = 4096
    ds.PixelData = bytes(4096 * 4096 * 2)
    ds.save_as(path)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    scp = start_scp(local, registry, [Peer("STORESCU", LOOPBACK)], spool_dir=spool_dir)
    sender: subprocess.Popen[bytes] | None = None
    try:
        with registry.expect(manifest.studies[0].study_instance_uid, tmp_path / "landing"):
            sender = subprocess.Popen(
                ["storescu", "-aec", OUR_AE, "-aet", "STORESCU", LOOPBACK, str(scp.port), path],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _wait_until(lambda: any(f.stat().st_size > 2**20 for f in spool_dir.iterdir()))
            sender.kill()
            sender.wait(10)
            _wait_until(lambda: not list(spool_dir.iterdir()))
        assert not (tmp_path / "landing").exists() or not list((tmp_path / "landing").iterdir())
        echoscu(scp.port, called_aet=OUR_AE, calling_aet="STORESCU")
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
        scp.stop()


def _wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_c_store_without_affected_sop_instance_uid_ends_its_association_only(
    scp: StorageSCP,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """pynetdicom's network thread died on such a command (raw traceback, no answer, a spool
    file kept until restart). Now: that association is aborted at once, nothing is kept, the
    refusal is counted, and the next association is served."""
    manifest = study_factory(series_per_study=1, instances_per_series=2)
    ds = dcmread(manifest.paths[0])
    with registry.expect(str(ds.StudyInstanceUID), tmp_path / "landing") as landing:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(LOOPBACK, scp.port, ae_title=OUR_AE)
        assert assoc.is_established
        request = C_STORE()
        request.MessageID = 7
        request.AffectedSOPClassUID = ds.SOPClassUID
        request.Priority = 2
        encoded = DicomBytesIO()
        encoded.is_little_endian, encoded.is_implicit_VR = True, False
        write_dataset(encoded, ds)
        request.DataSet = io.BytesIO(encoded.getvalue())
        context = assoc._get_valid_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, "scu")
        assert context.context_id is not None
        started = time.monotonic()
        assoc.dimse.send_msg(request, context.context_id)  # no Affected SOP Instance UID
        _wait_until(lambda: not assoc.is_established, timeout=5)
        assert time.monotonic() - started < 5
        assert assoc.is_aborted
        # The SCP is still serving: the other object lands.
        assert _pyscu_store(scp.port, dcmread(manifest.paths[1])) == Status.SUCCESS
        assert landing.landed == 1
    assert not list(Path(tempfile.gettempdir()).glob("in-*.dcm"))  # the spool (see conftest)
    assert scp.status().refused == {"malformed DIMSE command: association aborted": 1}


def _connect_from(address: str, port: int, first_bytes: bytes = b"") -> socket.socket:
    """A TCP connection to our SCP from another loopback address (another host, as seen)."""
    sock = socket.socket()
    sock.bind((address, 0))
    sock.connect((LOOPBACK, port))
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def _rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_idle_half_sent_and_huge_pdus_neither_lock_out_nor_bloat_the_scp(
    scp: StorageSCP,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """200 connections that send nothing or half a PDU, from 100 addresses, and one PDU header
    claiming 4 GiB: an allowed peer still associates, echoes and stores at once, memory stays
    flat, the idle connections are closed within seconds and a stop takes under a second."""
    rss = _rss_mib()
    hostile = [_connect_from(f"127.0.1.{1 + i % 100}", scp.port) for i in range(100)]
    hostile += [
        _connect_from(f"127.0.1.{1 + i % 100}", scp.port, b"\x01\x00\x00\x00\x10\x00abc")
        for i in range(100)
    ]
    huge = _connect_from("127.0.2.1", scp.port, struct.pack(">BBL", 1, 0, 0xFFFFFFF0))
    with contextlib.suppress(OSError):
        for _ in range(64):  # the SCP closes the connection instead of buffering this
            huge.sendall(bytes(1 << 20))
    try:
        started = time.monotonic()
        echoscu(scp.port, called_aet=OUR_AE, calling_aet="STORESCU")  # an allowed peer
        manifest = study_factory(series_per_study=1, instances_per_series=1)
        ds = dcmread(manifest.paths[0])
        with registry.expect(str(ds.StudyInstanceUID), tmp_path / "landing") as landing:
            assert _pyscu_store(scp.port, ds) == Status.SUCCESS
            assert landing.landed == 1
        assert time.monotonic() - started < 10
        assert _rss_mib() - rss < 50
        _wait_until(lambda: scp.active_associations() == 0, timeout=15)
        assert scp.status().rejected_associations.get("PDU longer than we accept") == 1
    finally:
        for sock in [*hostile, huge]:
            sock.close()


def test_one_address_may_hold_few_connections_without_an_association(scp: StorageSCP) -> None:
    sockets = [_connect_from("127.0.3.1", scp.port) for _ in range(20)]
    try:
        _wait_until(
            lambda: (
                scp.status().rejected_associations.get(
                    "too many connections without an association from one address", 0
                )
                == 12
            )
        )
        echoscu(scp.port, called_aet=OUR_AE, calling_aet="STORESCU")  # others still get in
    finally:
        for sock in sockets:
            sock.close()


def test_stop_with_idle_connections_open_is_quick(scp: StorageSCP) -> None:
    sockets = [_connect_from(f"127.0.4.{1 + i}", scp.port) for i in range(30)]
    try:
        _wait_until(lambda: scp.active_associations() >= 20)
        started = time.monotonic()
        scp.stop(drain_timeout=2)
        assert time.monotonic() - started < 5
    finally:
        for sock in sockets:
            sock.close()
