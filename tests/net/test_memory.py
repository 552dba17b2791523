"""A big object costs the network side no more memory than a small one, sending or receiving;
and a send waiting on a slow peer still ends at once when the association does.

A 2 GiB multi-frame object pushed to a research Orthanc slower than our disk used to grow the
daemon's RSS by ~1.1 GB: pynetdicom queued the whole file for its network thread (fixed in
:mod:`anonpipe.scu.association`, see "Sending is paced by the peer"). Each transfer runs in a
process of its own (:mod:`tests.net.memprobe`), so no earlier peak hides its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import EnhancedCTImageStorage
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF

from anonpipe.config import LocalSettings, ResearchSettings
from anonpipe.scu import Cause, end_open_associations, push_files
from anonpipe.scu.association import SEND_PDU_CAP
from tests.harness.dcmtk import StoreSCP, storescu
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.studygen import ALL_TRANSFER_SYNTAXES, Manifest, generate_multiframe
from tests.net.conftest import OUR_AE
from tests.net.slowlink import SlowLink

pytestmark = pytest.mark.timeout(120)

MB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
#: 768 frames of 512x512x16 bit: a 384 MiB object.
FRAMES = 768
#: The peer's link: slower than any disk, so without back-pressure most of the object queues.
LINK_RATE = 64 * MB
#: What one transfer may add to the process's RSS, whatever the object's size.
GROWTH_LIMIT = 100 * MB


@pytest.fixture(scope="module")
def big_object(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate_multiframe(tmp_path_factory.mktemp("multiframe"), frames=FRAMES, seed=5151)


def _probe(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.net.memprobe", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        **kwargs,
    )


def _result(proc: subprocess.Popen[str], stdin: str | None = None) -> dict[str, Any]:
    out, _ = proc.communicate(stdin, timeout=90)
    assert proc.returncode == 0, out
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _dataset_tail(path: Path) -> tuple[int, bytes]:
    """The data set's length (after preamble and file meta, which the SCP rebuilds) and its
    last MiB."""
    with path.open("rb") as f:
        head = f.read(144)
        assert head[128:132] == b"DICM"
        start = 144 + int.from_bytes(head[140:144], "little")  # (0002,0000) UL value
        end = f.seek(0, os.SEEK_END)
        f.seek(end - MB)
        return end - start, f.read()


def test_pushing_a_big_object_to_a_slow_peer_holds_little_of_it(big_object: Manifest) -> None:
    (path,) = big_object.paths
    size = path.stat().st_size
    assert size > 380 * MB
    with StoreSCP(None) as peer, SlowLink(peer.port, LINK_RATE) as link:
        result = _result(_probe("push", str(path), peer.aet, LOOPBACK, str(link.port)))
    assert result["outcomes"] == ["stored"]
    # The link set the pace (the object did not go around it).
    assert result["seconds"] > 0.8 * size / LINK_RATE
    growth = result["peak"] - result["before"]
    assert growth < GROWTH_LIMIT, f"RSS grew {growth / MB:.0f} MB pushing {size / MB:.0f} MB"
    # Nothing kept afterwards either (freed memory malloc did not give back counts in RSS).
    assert result["after"] - result["before"] < GROWTH_LIMIT / 2


def test_receiving_a_big_object_holds_little_of_it(big_object: Manifest, tmp_path: Path) -> None:
    (path,) = big_object.paths
    (study_uid,) = big_object.study_uids
    spool, landing = tmp_path / "incoming", tmp_path / "landing"
    proc = _probe("receive", str(spool), str(landing), study_uid, "STORESCU", stdin=subprocess.PIPE)
    assert proc.stdout is not None
    port = int(proc.stdout.readline().split()[1])
    storescu(port, [path], called_aet=OUR_AE)
    result = _result(proc, "done\n")
    assert result["landed"] == 1
    (landed,) = landing.iterdir()
    assert _dataset_tail(landed) == _dataset_tail(path)
    growth = result["peak"] - result["before"]
    assert growth < GROWTH_LIMIT, f"RSS grew {growth / MB:.0f} MB receiving the object"


def _push_in_background(
    local: LocalSettings, peer: ResearchSettings, path: Path
) -> tuple[threading.Thread, list[Any]]:
    reports: list[Any] = []
    thread = threading.Thread(
        target=lambda: reports.append(push_files(local, peer, [path], retries=0)), daemon=True
    )
    thread.start()
    return thread, reports


def _settings(port: int, aet: str) -> ResearchSettings:
    return ResearchSettings(ae_title=aet, host=LOOPBACK, port=port, connect_timeout=5)


def test_stopping_ends_a_send_paced_by_a_slow_peer(
    local: LocalSettings, big_object: Manifest
) -> None:
    """The sender waits for room in the send queue: SIGTERM's end_open_associations ends that
    wait too, the association is aborted and the rest of the file never read."""
    (path,) = big_object.paths
    with StoreSCP(None) as peer, SlowLink(peer.port, LINK_RATE) as link:
        thread, reports = _push_in_background(
            replace(local, dimse_timeout=120), _settings(link.port, peer.aet), path
        )
        time.sleep(1.5)
        assert end_open_associations("the service is stopping") == 1
        started = time.monotonic()
        thread.join(10)
        assert not thread.is_alive()
        assert time.monotonic() - started < 2
    (result,) = reports[0].results
    assert (result.outcome, result.error, result.cause) == (
        "failed",
        "the service is stopping",
        Cause.LOCAL,
    )


def test_a_peer_dying_ends_a_send_paced_by_it(local: LocalSettings, big_object: Manifest) -> None:
    """The peer goes away in the middle of the object: the push fails at once (not after the
    DIMSE timeout), as an outage (worth retrying)."""
    (path,) = big_object.paths
    with StoreSCP(None) as peer, SlowLink(peer.port, LINK_RATE) as link:
        thread, reports = _push_in_background(
            replace(local, dimse_timeout=120), _settings(link.port, peer.aet), path
        )
        time.sleep(1.5)
        peer.stop()  # SIGTERM: its connection is reset
        started = time.monotonic()
        thread.join(20)
        assert not thread.is_alive()
        assert time.monotonic() - started < 5
    (result,) = reports[0].results
    assert result.outcome == "failed" and result.cause is Cause.OUTAGE, result


def test_a_peer_that_stops_taking_data_ends_the_send_after_the_dimse_timeout(
    local: LocalSettings, big_object: Manifest
) -> None:
    """The peer hangs in the middle of the object, connection open: the sender, waiting for
    room, gives up after the DIMSE timeout without progress, and aborts the association."""
    (path,) = big_object.paths
    with StoreSCP(None) as peer, SlowLink(peer.port, LINK_RATE) as link:
        thread, reports = _push_in_background(
            replace(local, dimse_timeout=2), _settings(link.port, peer.aet), path
        )
        time.sleep(1.0)
        link.stall()
        started = time.monotonic()
        thread.join(20)
        assert not thread.is_alive()
        assert 1.5 < time.monotonic() - started < 6
    (result,) = reports[0].results
    assert (result.outcome, result.error, result.cause) == (
        "failed",
        "the peer took no data for 2 s while we sent",
        Cause.OUTAGE,
    )


def test_a_peer_allowing_unlimited_pdus_gets_pdus_of_a_bounded_size(
    local: LocalSettings, tmp_path: Path
) -> None:
    """pynetdicom reads each PDU it sends whole: told "no limit" (0), it read the whole file
    as one PDU. We send at most SEND_PDU_CAP bytes per PDU whatever the peer allows."""
    manifest = generate_multiframe(tmp_path / "mf", frames=24, seed=5152)  # 12 MiB
    (path,) = manifest.paths
    longest: list[int] = [0]

    def on_pdu(event: Any) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            longest[0] = max(longest[0], len(event.pdu))

    unlimited = AE(ae_title="UNLIMITED")
    unlimited.maximum_pdu_size = 0
    unlimited.add_supported_context(EnhancedCTImageStorage, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = unlimited.start_server(
        (LOOPBACK, port),
        block=False,
        evt_handlers=[(evt.EVT_PDU_RECV, on_pdu), (evt.EVT_C_STORE, lambda _event: 0x0000)],
    )
    assert server is not None
    try:
        report = push_files(local, _settings(port, "UNLIMITED"), [path], retries=0)
    finally:
        server.shutdown()
    assert [r.outcome for r in report.results] == ["stored"]
    assert 0 < longest[0] <= SEND_PDU_CAP + 6  # the PDU's header: type, reserved, length
