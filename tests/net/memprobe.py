"""Run one push or one receive in a process of its own and report how much its RSS grew.

Used by ``test_memory.py``: measured in a fresh process, an earlier test's peak cannot hide
this one's (``VmHWM`` only ever rises, and the test process has run other transfers). The peak
is reset before the transfer (``/proc/self/clear_refs``, Linux >= 4.0) and read afterwards; a
thread also samples ``VmRSS`` every 20 ms, in case the reset is not allowed.

::

    python -m tests.net.memprobe push FILE AE HOST PORT
    python -m tests.net.memprobe receive SPOOL LANDING STUDY_UID CALLING_AE

``push`` C-STOREs FILE with :func:`anonpipe.scu.push_files`; ``receive`` runs our
:class:`~anonpipe.scp.StorageSCP` on a free port, prints ``port N``, lands what arrives for
STUDY_UID and ends when a line comes on stdin. Both then print one JSON line: ``before`` (RSS
before the transfer), ``peak`` (the highest RSS during it) and ``after``, in bytes, and the
transfer's outcome.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

KIB = 1024


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * KIB
    raise LookupError(field)


class PeakRss:
    """``with PeakRss() as rss:`` then ``rss.before``, ``rss.peak``, ``rss.after`` in bytes."""

    def __init__(self) -> None:
        self.before = self.peak = self.after = 0
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.before = _status("VmRSS")
        self.peak = self.before
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, _status("VmRSS"))

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._sampler.join()
        self.after = _status("VmRSS")
        self.peak = max(self.peak, self.after, _status("VmHWM"))

    def report(self, **outcome: Any) -> str:
        return json.dumps(
            {"before": self.before, "peak": self.peak, "after": self.after, **outcome}
        )


def _local() -> Any:
    from anonpipe.config import LocalSettings
    from tests.harness.ports import LOOPBACK, free_port

    return LocalSettings(
        ae_title="ANONPIPE",
        bind=LOOPBACK,
        port=free_port(),
        acse_timeout=10,
        dimse_timeout=60,
        network_timeout=60,
        min_free_mb=0,
    )


def push(path: Path, ae_title: str, host: str, port: int) -> str:
    from anonpipe.config import ResearchSettings
    from anonpipe.scu import push_files

    research = ResearchSettings(
        ae_title=ae_title, host=host, port=port, connect_timeout=5, retries=0, retry_backoff=0
    )
    with PeakRss() as rss:
        started = time.monotonic()
        report = push_files(_local(), research, [path])
        seconds = time.monotonic() - started
    return rss.report(outcomes=[r.outcome for r in report.results], seconds=seconds)


def receive(spool: Path, landing: Path, study_uid: str, calling_ae: str) -> str:
    from anonpipe.config import Peer
    from anonpipe.scp import LandingRegistry, StorageSCP
    from tests.harness.ports import LOOPBACK

    registry = LandingRegistry()
    scp = StorageSCP(_local(), [Peer(calling_ae, LOOPBACK)], registry, spool_dir=spool)
    with registry.expect(study_uid, landing) as expected:
        scp.start()
        try:
            with PeakRss() as rss:
                print(f"port {scp.port}", flush=True)
                sys.stdin.readline()
        finally:
            scp.stop(drain_timeout=5)
        landed = expected.landed
    return rss.report(landed=landed)


def main(argv: list[str]) -> None:
    from anonpipe.logs import configure_logging

    configure_logging("warning", "json", stream=sys.stderr)  # stdout carries the results
    mode, *args = argv
    if mode == "push":
        print(push(Path(args[0]), args[1], args[2], int(args[3])), flush=True)
    elif mode == "receive":
        print(receive(Path(args[0]), Path(args[1]), args[2], args[3]), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
