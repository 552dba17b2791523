"""pynetdicom's association threads wait for work (anonpipe.reactors) on both of our ends.

Counted, not timed: how often each thread of an idle association wakes up. pynetdicom alone
wakes each of them every millisecond (about 1,000 times a second).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest
from pynetdicom.presentation import build_context

from anonpipe import reactors
from anonpipe.config import LocalSettings, StagingSettings
from anonpipe.dimse import VERIFICATION
from anonpipe.scp import StorageSCP
from anonpipe.scu.association import associate
from tests.harness.ports import LOOPBACK

IDLE_SECONDS = 1.0


@pytest.fixture
def wakeups(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[int]]:
    """Waits of pynetdicom's threads, by thread id, while the test runs."""
    counts: Counter[int] = Counter()
    sleep = reactors._Clock.sleep

    def counting(seconds: float) -> None:
        if threading.current_thread() in reactors._WAITS:
            counts[threading.get_ident()] += 1
        sleep(seconds)

    monkeypatch.setattr(reactors._Clock, "sleep", staticmethod(counting))
    yield counts


def _ourselves(local: LocalSettings) -> StagingSettings:
    return StagingSettings(ae_title=local.ae_title, host=LOOPBACK, port=local.port)


def test_an_idle_association_wakes_ten_times_a_second_not_a_thousand(
    local: LocalSettings, scp: StorageSCP, wakeups: Counter[int]
) -> None:
    caller = replace(local, ae_title="PYSCU")
    with associate(caller, _ourselves(local), [build_context(VERIFICATION)]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
        time.sleep(0.2)  # the echo's own wake-ups are over
        wakeups.clear()
        time.sleep(IDLE_SECONDS)
        idle = dict(wakeups)
        started = time.monotonic()
        assert assoc.send_c_echo().Status == 0x0000
        answered_in = time.monotonic() - started
    # Four threads wait: our client's DUL and reactor, our SCP's DUL and reactor.
    assert len(idle) == 4, idle
    most = max(idle.values())
    assert most <= 2 * IDLE_SECONDS / reactors.MAX_WAIT, idle
    # A request after the idle second is answered without waiting out a sleep.
    assert answered_in < reactors.MAX_WAIT, answered_in


def test_many_exchanges_wake_only_for_work(
    local: LocalSettings, scp: StorageSCP, wakeups: Counter[int]
) -> None:
    """200 echoes: each wakes the threads a few times (a PDU to send, a message to serve),
    never a millisecond poll between them."""
    caller = replace(local, ae_title="PYSCU")
    with associate(caller, _ourselves(local), [build_context(VERIFICATION)]) as assoc:
        wakeups.clear()
        for _ in range(200):
            assert assoc.send_c_echo().Status == 0x0000
        counts = dict(wakeups)
    assert sum(counts.values()) < 200 * 12, counts


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_ended_associations_leave_no_file_descriptors_behind(
    local: LocalSettings, scp: StorageSCP
) -> None:
    """Each association's wake-up pipe is closed when its DUL thread ends, not when the
    garbage collector finds the association's reference cycles (a soak run grew by 16 fds)."""
    caller = replace(local, ae_title="PYSCU")
    with associate(caller, _ourselves(local), [build_context(VERIFICATION)]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
    time.sleep(0.3)
    gc.disable()
    try:
        before = _open_fds()
        for _ in range(20):
            with associate(caller, _ourselves(local), [build_context(VERIFICATION)]) as assoc:
                assert assoc.send_c_echo().Status == 0x0000
        deadline = time.monotonic() + 5
        while _open_fds() > before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _open_fds() <= before + 2, (before, _open_fds())
    finally:
        gc.enable()
