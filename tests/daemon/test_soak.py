"""The daemon over time: a bounded soak, and 200 hostile connections during a pull and a stop.

The soak (marker ``soak``) keeps studies coming for ``ANONPIPE_SOAK_MINUTES`` (2 by default, so
the suite's run is a short soak) and samples the daemon's memory, file descriptors, threads and
processes between runs: a leak in any of them grows with the number of runs, which a single run
never shows. The full 30-minute soak, whose figures are in bench/RESULTS.md::

    ANONPIPE_SOAK_MINUTES=30 .venv/bin/pytest -s -m soak tests/daemon/test_soak.py \\
        -p no:cacheprovider

Only the soak: ``-m soak``; everything but the soak: ``-m "not soak"``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import json
import os
import selectors
import signal
import socket
import sqlite3
import statistics
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pytest

from anonpipe import ctl
from tests.harness.daemon import Daemon, make_site, query_state
from tests.harness.deployment import Site, StudyPlan
from tests.harness.orthanc import OrthancFactory
from tests.harness.ports import LOOPBACK
from tests.harness.studygen import Manifest, generate

#: Minutes of feeding studies (after the warm-up runs).
SOAK_MINUTES = float(os.environ.get("ANONPIPE_SOAK_MINUTES", "2"))
#: Seconds between the starts of two feeding rounds (each waits for its study to be published).
PACE = 3.0
#: Runs before the baseline: the first ones import lazily loaded modules, fill pydicom's and
#: pynetdicom's caches, start the forkserver and the default executor's threads.
WARM_UP_RUNS = 3
#: Allowed growth over the baseline. RSS: the 30-minute soak (600 runs) grew 6.5 MiB, the
#: 2-minute one (40 runs) 1 MiB (bench/RESULTS.md, "Soak"); 30 MiB leaves room for that, and a
#: leak of 50 KiB per run (one association with its buffers) crosses it within 600 runs.
RSS_MARGIN_MIB = 30.0
FD_MARGIN = 4
THREAD_MARGIN = 4
#: Allowed growth between the median of the first third of samples and that of the last
#: third: a trend, which a margin alone would only catch once the margin is used up.
RSS_TREND_MIB = 10.0
COUNT_TREND = 2

#: A tiny study: one CT series of two instances (the protocol kind adds its protocol series).
_SERIES, _INSTANCES = 1, 2


# ---------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sample:
    """One look at the daemon (its own process) and at its process group (with the workers,
    the forkserver and the resource tracker)."""

    elapsed: float
    runs_done: int
    rounds: int
    rss_mib: float
    fds: int
    threads: int
    group_rss_mib: float
    processes: int


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _rss_mib(pid: int) -> float:
    """VmRSS of *pid* in MiB (0 once it is gone)."""
    try:
        return int(_status(pid)["VmRSS"].split()[0]) / 1024
    except (OSError, KeyError):
        return 0.0


def _group_members(pgid: int) -> list[int]:
    """The pids of process group *pgid* (the daemon runs in its own session)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # Fields after the command name, which may hold spaces and parentheses.
            after = (entry / "stat").read_text().rpartition(")")[2].split()
            if int(after[2]) == pgid:
                members.append(int(entry.name))
    return members


def sample(pid: int, started: float, runs_done: int = 0, rounds: int = 0) -> Sample:
    status = _status(pid)
    members = _group_members(pid)
    return Sample(
        elapsed=round(time.monotonic() - started, 1),
        runs_done=runs_done,
        rounds=rounds,
        rss_mib=round(int(status["VmRSS"].split()[0]) / 1024, 1),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        group_rss_mib=round(sum(_rss_mib(m) for m in members), 1),
        processes=len(members),
    )


def _write_samples(samples: list[Sample], path: Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, [f.name for f in fields(Sample)])
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)


# ---------------------------------------------------------------------------------- feeding


@dataclass
class Feeder:
    """Puts new studies into the staging PACS and their reviews into the review DB while the
    daemon runs, as the scanners and the reviewers do."""

    site: Site
    root: Path
    seed: int = 70_000
    count: int = 0
    manifests: list[Manifest] = field(default_factory=list)
    approved: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    def add(self, kind: str = "approved") -> str:
        """One new study of *kind* ("approved", "protocol" or "rejected"); its original UID."""
        self.count += 1
        manifest = generate(
            self.root / f"{self.count:05d}",
            series_per_study=_SERIES,
            instances_per_series=_INSTANCES,
            modalities=("CT",),
            protocol_series=kind == "protocol",
            seed=self.seed + self.count,
        )
        self.site.staging.upload(manifest.paths)
        (study,) = manifest.studies
        uid = study.study_instance_uid
        accession = f"SOAK{self.count:05d}"
        review = self.site.review
        if kind == "rejected":
            review.add_rejected_phi(uid, accession)
            self.rejected.append(uid)
        else:
            study_id = review.add_study(uid, accession)
            review.add_review(study_id, has_protocol_series=kind == "protocol")
            self.approved.append(uid)
        self.manifests.append(manifest)
        return uid

    def expected_instances(self) -> int:
        """Clean instances of the approved studies fed (protocol series are quarantined)."""
        return sum(
            len(series.instances)
            for manifest in self.manifests
            for study in manifest.studies
            if study.study_instance_uid in self.approved
            for series in study.series
            if not series.is_protocol
        )


def _published(site: Site, uid: str) -> bool:
    try:
        return site.review.find_study(uid).image_published
    except (KeyError, OSError, sqlite3.Error):  # not there yet, or the daemon is writing
        return False


def _runs_done(site: Site) -> int:
    rows = query_state(site, "SELECT COUNT(*) FROM runs WHERE state = 'done'")
    return int(str(rows[0][0])) if rows else 0


def _all_runs_done(site: Site) -> bool:
    rows = query_state(site, "SELECT COUNT(*) FROM runs WHERE state != 'done'")
    return bool(rows) and rows[0][0] == 0


def _wait(daemon: Daemon, predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Like ``Daemon.wait_for``, but at a pace that leaves the review DB to the daemon."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({daemon.proc.returncode}): {daemon.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {daemon.log_tail()}")
        time.sleep(0.2)


def _poke(site: Site) -> None:
    """``anonpipectl poll``: the daemon looks at the review DB now, not at its next interval."""
    with contextlib.suppress(OSError):
        ctl.request(site.socket_path, "poll", {}, timeout=10)


def _ready(daemon: Daemon) -> bool:
    return any("READY=1" in m for m in daemon.read_notifications())


#: The site's own studies: one approved, one held (reviews conflict, held at every selection),
#: one missing from staging (written back as failed once).
_SOAK_SITE = StudyPlan(
    approved=1,
    approved_with_protocol=0,
    rejected_phi=0,
    conflicting=1,
    missing_from_staging=1,
    series_per_study=_SERIES,
    instances_per_series=_INSTANCES,
)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


@pytest.mark.soak
@pytest.mark.timeout(int(SOAK_MINUTES * 60) + 600)
def test_soak_studies_keep_flowing_and_the_daemon_does_not_grow(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    """For SOAK_MINUTES, a new study every PACE seconds (every tenth with a protocol series,
    every seventh round also one rejected for PHI), each published and written back before the
    next; the daemon's RSS, fds and threads stay within the baseline plus a margin and do not
    trend up, and no process is left behind by a run."""
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, _SOAK_SITE)
    feeder = Feeder(site, tmp_path / "feed")
    daemon = Daemon(site, short_dir)
    started = time.monotonic()
    samples: list[Sample] = []
    try:
        _wait(daemon, lambda: _ready(daemon), 60, "READY=1")
        startup = sample(daemon.proc.pid, started)
        baseline: Sample | None = None
        deadline: float | None = None
        rounds = 0
        while deadline is None or time.monotonic() < deadline:
            begun = time.monotonic()
            rounds += 1
            kind = "protocol" if rounds % 10 == 5 else "approved"
            uid = feeder.add(kind)
            if rounds % 7 == 3:
                feeder.add("rejected")
            _poke(site)
            _wait(daemon, functools.partial(_published, site, uid), 120, f"round {rounds}")
            _wait(daemon, lambda: _all_runs_done(site), 60, f"round {rounds}'s run done")
            now = sample(daemon.proc.pid, started, _runs_done(site), rounds)
            if baseline is None:
                if now.runs_done >= WARM_UP_RUNS:
                    baseline, deadline = now, time.monotonic() + SOAK_MINUTES * 60
            else:
                samples.append(now)
            time.sleep(max(0.0, PACE - (time.monotonic() - begun)))
    finally:
        code = daemon.terminate()
        _write_samples(samples, tmp_path / "soak.csv")
    assert code == 0 and daemon.leftovers is False
    assert baseline is not None and samples

    # Every approved study published and written back; the rejected ones never picked.
    in_research = site.research.study_instance_uids()
    for uid in [*site.approved_uids, *feeder.approved]:
        row = site.review.find_study(uid)
        assert row.image_published and row.study_uid in in_research
    for uid in [*feeder.rejected, *site.held_uids]:
        assert not site.review.find_study(uid).image_published
    for uid in site.missing_uids:  # written back once as an error, never retried
        assert site.review.find_study(uid).processing_error
    expected = site.expected_instances() + feeder.expected_instances()
    assert len(site.research.instances()) == expected

    end = samples[-1]
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    peak = {
        key: max(getattr(s, key) for s in samples)
        for key in ("rss_mib", "fds", "threads", "group_rss_mib", "processes")
    }
    minutes = round((end.elapsed - baseline.elapsed) / 60, 1)
    first_rss, last_rss = _median([s.rss_mib for s in first]), _median([s.rss_mib for s in last])
    summary = {
        "minutes": minutes,
        "studies": len(feeder.approved),
        "rejected": len(feeder.rejected),
        "runs": end.runs_done,
        "startup": asdict(startup),
        "baseline": asdict(baseline),
        "end": asdict(end),
        "max": peak,
        "rss_median_first_third": first_rss,
        "rss_median_last_third": last_rss,
    }
    (tmp_path / "soak.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nSOAK {minutes} min, {len(feeder.approved)} studies (+{len(feeder.rejected)}"
        f" rejected) in {end.runs_done} runs; rss MiB startup/baseline/end/max {startup.rss_mib}/"
        f"{baseline.rss_mib}/{end.rss_mib}/{peak['rss_mib']} (process group"
        f" {baseline.group_rss_mib}/{end.group_rss_mib}/max {peak['group_rss_mib']});"
        f" fds {startup.fds}/{baseline.fds}/{end.fds}/{peak['fds']};"
        f" threads {startup.threads}/{baseline.threads}/{end.threads}/{peak['threads']};"
        f" processes {baseline.processes}/{end.processes}/max {peak['processes']};"
        f" rss medians first/last third {first_rss}/{last_rss}; samples {tmp_path / 'soak.csv'}"
    )

    assert peak["rss_mib"] <= baseline.rss_mib + RSS_MARGIN_MIB
    assert peak["fds"] <= baseline.fds + FD_MARGIN
    assert peak["threads"] <= baseline.threads + THREAD_MARGIN
    # Between runs only the forkserver and the resource tracker are left beside the daemon.
    assert peak["processes"] <= baseline.processes
    assert last_rss - first_rss <= RSS_TREND_MIB, f"RSS trend up by {last_rss - first_rss} MiB"
    for key in ("fds", "threads"):
        grew = _median([getattr(s, key) for s in last]) - _median([getattr(s, key) for s in first])
        assert grew <= COUNT_TREND, f"{key} trend up by {grew}"


# ---------------------------------------------------------------------------------- hostile


#: 100 connections that send nothing and 100 that send half a PDU (a header announcing 4096
#: bytes, then 3), from 100 loopback addresses: two each, under the SCP's per-address cap.
HOSTILE_ADDRESSES = 100
HALF_PDU = b"\x01\x00\x00\x00\x10\x00abc"
RSS_HOSTILE_MARGIN_MIB = 50.0
#: Zero bytes one more connection sends: to pynetdicom, a "PDU" of unknown type every 6 bytes,
#: each an ERROR record (10,000 here) until the SCP stopped reading after the association ended.
GARBAGE_BYTES = 60_000
GARBAGE_RECORDS_AT_MOST = 50
STOP_WITHIN = 10.0


class HostileConnections:
    """200 connections to the daemon's SCP that never associate, held open from one thread.

    The SCP closes each a few seconds after it opened (ARTIM, read timeout); it is opened
    again at once. Connects are non-blocking, so all 200 are in flight together as an attacker's
    would be (a blocking connect waits out every SYN the full listen backlog drops). Also
    samples the daemon's RSS: the peak is what counts.
    """

    def __init__(self, port: int, pid: int) -> None:
        self.port = port
        self.pid = pid
        self.slots: list[tuple[str, bytes]] = [
            (f"127.0.1.{1 + n % HOSTILE_ADDRESSES}", HALF_PDU if n >= HOSTILE_ADDRESSES else b"")
            for n in range(2 * HOSTILE_ADDRESSES)
        ]
        self.selector = selectors.DefaultSelector()
        #: slot -> (socket, connected)
        self.sockets: dict[int, tuple[socket.socket, bool]] = {}
        #: connections the SCP closed (each opened again at once)
        self.closed_by_scp = 0
        #: slot -> when to try again after a failed connect (the daemon stopped listening)
        self._retry_at: dict[int, float] = {}
        self.peak_rss_mib = 0.0
        self._running = True
        for slot in range(len(self.slots)):
            self._open(slot)
        self._thread = threading.Thread(target=self._keep_open, daemon=True)
        self._thread.start()

    @property
    def connected(self) -> int:
        return sum(1 for _sock, up in list(self.sockets.values()) if up)

    def _open(self, slot: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((self.slots[slot][0], 0))
        if sock.connect_ex((LOOPBACK, self.port)) not in (0, errno.EINPROGRESS):
            sock.close()
            self._retry_at[slot] = time.monotonic() + 0.5
            return
        self.sockets[slot] = (sock, False)
        self.selector.register(sock, selectors.EVENT_WRITE, slot)

    def _drop(self, slot: int) -> None:
        sock, _up = self.sockets.pop(slot)
        self.selector.unregister(sock)
        sock.close()

    def _keep_open(self) -> None:
        while self._running:
            for key, _events in self.selector.select(timeout=0.2):
                slot = key.data
                sock, up = self.sockets[slot]
                if not up:  # the connect finished
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        self._drop(slot)
                        self._retry_at[slot] = time.monotonic() + 0.5
                        continue
                    with contextlib.suppress(OSError):
                        sock.send(self.slots[slot][1])  # a few bytes: never blocks
                    self.sockets[slot] = (sock, True)
                    self.selector.modify(sock, selectors.EVENT_READ, slot)
                    continue
                try:
                    if sock.recv(4096):
                        continue  # not a close: ignore what it said
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self._drop(slot)  # closed by the SCP
                self.closed_by_scp += 1
            now = time.monotonic()
            for slot in range(len(self.slots)):
                if slot not in self.sockets and self._retry_at.get(slot, 0) <= now:
                    self._open(slot)
            self.peak_rss_mib = max(self.peak_rss_mib, _rss_mib(self.pid))

    def close(self) -> None:
        self._running = False
        self._thread.join(10)
        for sock, _up in self.sockets.values():
            sock.close()
        self.sockets.clear()
        self.selector.close()


def _scp_associations(site: Site) -> int:
    return int(ctl.request(site.socket_path, "status", {})["scp"]["active_associations"])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of *pid* so far."""
    after = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(after[11]) + int(after[12])) / os.sysconf("SC_CLK_TCK")


#: The SCP must have held at least this many of them at once (each lives ~5 s, and pynetdicom's
#: listen backlog of 5 limits how fast they are accepted: ~60 at once on a loaded 2-core box).
HOSTILE_HELD_AT_LEAST = 30


@pytest.mark.timeout(120)
def test_200_hostile_connections_stop_neither_a_pull_nor_an_echo_nor_sigterm(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    """While 200 idle or half-sent connections from 100 addresses are held open (each one the
    SCP closes is opened again), the staging PACS echoes our SCP and its C-MOVE
    sub-associations deliver two studies, which are published; the daemon's RSS stays within
    start-up + 50 MiB; a connection sending 60 KB of zeros costs a few log records, not one
    per 6 bytes; SIGTERM ends the daemon (exit 0) within 10 s with the connections still open."""
    plan = StudyPlan(
        approved=0,
        approved_with_protocol=0,
        rejected_phi=0,
        conflicting=0,
        missing_from_staging=0,
    )
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, plan)
    scp_port = int(tomllib.loads(site.config_path.read_text())["local"]["port"])
    feeder = Feeder(site, tmp_path / "feed")
    daemon = Daemon(site, short_dir)
    pid = daemon.proc.pid
    hostile: HostileConnections | None = None
    counted: list[int] = []
    try:
        _wait(daemon, lambda: _ready(daemon), 60, "READY=1")
        startup_rss = _rss_mib(pid)
        cpu_before, hostile_since = _cpu_seconds(pid), time.monotonic()
        hostile = HostileConnections(scp_port, pid)
        _wait(
            daemon,
            lambda: _scp_associations(site) >= HOSTILE_HELD_AT_LEAST,
            30,
            "the SCP to hold the hostile connections",
        )
        site.staging.echo("anonpipe")  # Orthanc's C-ECHO to our SCP: REST 200 or raises

        uids = [feeder.add() for _ in range(2)]
        pull_started = time.monotonic()
        _poke(site)

        def published() -> bool:
            counted.append(_scp_associations(site))
            return all(_published(site, uid) for uid in uids)

        _wait(daemon, published, 60, "the studies published")
        pull_seconds = time.monotonic() - pull_started
        site.staging.echo("anonpipe")
        with socket.create_connection((LOOPBACK, scp_port), timeout=5) as garbage:
            with contextlib.suppress(OSError):  # the SCP may close it before all is sent
                garbage.sendall(bytes(GARBAGE_BYTES))
            time.sleep(1)
        held_at_stop = hostile.connected
        counted.append(_scp_associations(site))
        cpu_share = (_cpu_seconds(pid) - cpu_before) / (time.monotonic() - hostile_since)

        signalled = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.proc.wait(STOP_WITHIN + 20)
        stop_seconds = time.monotonic() - signalled
    finally:
        if hostile is not None:
            hostile.close()
        daemon.terminate()  # only cleans up when the daemon already exited

    assert hostile is not None
    in_research = site.research.study_instance_uids()
    assert all(site.review.find_study(uid).study_uid in in_research for uid in uids)
    assert len(site.research.instances()) == feeder.expected_instances()
    print(
        f"\nHOSTILE 200 connections held ({held_at_stop} connected at SIGTERM, the SCP closed"
        f" {hostile.closed_by_scp}; the SCP counted {min(counted)}..{max(counted)} at once):"
        f" pull+publish of 2 studies {pull_seconds:.1f} s; daemon CPU {100 * cpu_share:.0f} %"
        f" of a core; rss MiB startup {startup_rss:.1f} peak {hostile.peak_rss_mib:.1f};"
        f" SIGTERM -> exit {code} in {stop_seconds:.1f} s; {GARBAGE_BYTES} zero bytes logged"
        f" {(site.root / 'daemon.log').read_text().count('Unknown PDU type')} times"
    )
    assert held_at_stop >= 190 and max(counted) >= HOSTILE_HELD_AT_LEAST
    garbage_records = (site.root / "daemon.log").read_text().count("Unknown PDU type")
    assert garbage_records <= GARBAGE_RECORDS_AT_MOST, f"{garbage_records} records of garbage"
    assert hostile.peak_rss_mib <= startup_rss + RSS_HOSTILE_MARGIN_MIB
    assert code == 0 and stop_seconds < STOP_WITHIN
