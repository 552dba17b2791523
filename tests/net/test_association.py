"""The association helper against a real peer (DCMTK ``storescp``)."""

from __future__ import annotations

import queue
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.presentation import build_context

from anonpipe.config import LocalSettings, StagingSettings
from anonpipe.dimse import VERIFICATION
from anonpipe.scu.association import Cause, PeerUnavailable, associate
from tests.harness.dcmtk import StoreSCP
from tests.harness.ports import LOOPBACK


class _CheckpointNobodyStopsAt(threading.Event):
    """pynetdicom's reactor passes its pause checkpoint: the race window, held open.

    It lingers there a moment, looking paused, so a request sees it paused and sends; then it
    goes on polling the message queue as if it had never stopped.
    """

    def wait(self, timeout: float | None = None) -> bool:
        time.sleep(0.002)
        return True


class _LateWaiter(queue.Queue[Any]):
    """The request reaches the queue late, so the reactor sees the response first."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            time.sleep(0.2)
        return super().get(block, timeout)


def test_a_response_the_reactor_took_reaches_the_waiting_request(
    local: LocalSettings, tmp_path: Path
) -> None:
    """Without the fix the C-ECHO waits out the DIMSE timeout and comes back empty."""
    local = replace(local, dimse_timeout=3)
    with StoreSCP(tmp_path / "sink", aet="SINK") as sink:
        peer = StagingSettings(ae_title="SINK", host=LOOPBACK, port=sink.port, connect_timeout=5)
        with associate(local, peer, [build_context(VERIFICATION)]) as assoc:
            assoc._reactor_checkpoint = _CheckpointNobodyStopsAt()
            assoc._reactor_checkpoint.set()
            assoc.dimse.msg_queue = _LateWaiter()
            for _ in range(3):
                started = time.monotonic()
                status = assoc.send_c_echo()
                assert status.get("Status") == 0x0000
                assert time.monotonic() - started < 2


def test_a_response_nobody_waits_for_is_dropped_as_before(
    local: LocalSettings, tmp_path: Path
) -> None:
    """Outside a request (checkpoint set) the reactor's handling is pynetdicom's own."""
    with StoreSCP(tmp_path / "sink", aet="SINK") as sink:
        peer = StagingSettings(ae_title="SINK", host=LOOPBACK, port=sink.port, connect_timeout=5)
        with associate(local, peer, [build_context(VERIFICATION)]) as assoc:
            response = C_ECHO()
            response.MessageIDBeingRespondedTo = 1
            response.Status = 0
            assoc._serve_request(response, 1)
            assert assoc.dimse.msg_queue.empty()


def _one_shot_peer(answer: bytes | None) -> tuple[int, threading.Thread]:
    """A TCP peer that takes one connection, reads the association request and then sends
    *answer* (a raw PDU) or, if None, just closes: a PACS dying in the middle of the handshake."""
    server = socket.create_server((LOOPBACK, 0))
    port = server.getsockname()[1]

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                if answer is not None:
                    conn.sendall(answer)
                    time.sleep(0.5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


#: An A-ABORT PDU from the peer's application (source 0, reason 0).
_A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


@pytest.mark.parametrize(
    ("answer", "cause"),
    [(None, Cause.OUTAGE), (_A_ABORT, Cause.REFUSAL)],
    ids=["closed-without-a-word", "a-abort"],
)
def test_an_association_ended_before_its_answer_is_told_by_how_it_ended(
    local: LocalSettings, answer: bytes | None, cause: Cause
) -> None:
    """A PACS stopped while we associate closes without a word: an outage, waited for (a CI
    failure of the research-outage scenario failed the study as refused). An A-ABORT in answer
    to our request is the peer saying no: a refusal."""
    port, thread = _one_shot_peer(answer)
    peer = StagingSettings(ae_title="PEER", host=LOOPBACK, port=port, connect_timeout=5)
    with (
        pytest.raises(PeerUnavailable) as caught,
        associate(local, peer, [build_context(VERIFICATION)]),
    ):
        pass
    thread.join(5)
    assert caught.value.cause is cause, caught.value.reason
