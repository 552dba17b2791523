"""End to end: anonpipe against two references, the bare DCMTK transfer and an Orthanc gateway.

Run from the repository root (DCMTK and Orthanc installed)::

    .venv/bin/python -m bench.e2e [--rounds 3] [--quick] [--ours daemon|run-once|both] [--record]

One site is built once with :func:`tests.harness.deployment.build_site`: a staging Orthanc
holding 8 approved studies (by default 2 series of 60 CT/MR objects each, 256x256x16 bit: 960
objects, ~126 MB, with identifiers planted in standard elements, sequences two deep, a private
block with a UN element, the file meta and free text; ``--plan old`` is issue 5's 2 x 30 objects
of 512x512), the review DB that approves them, an empty research Orthanc, a gateway Orthanc and
the anonpipe.toml. Each round then times, in turn and after ``sync``:

- DCMTK: for each approved study ``movescu`` (study level) into a DCMTK ``storescp`` writing
  files, then one ``storescu`` of the received folder into the research Orthanc: the transfer of
  the old pipeline, without de-identification;
- gateway: the Orthanc gateway pipeline, per approved study: the gateway Orthanc C-MOVEs it from
  staging into itself (REST ``/modalities/staging/move``, synchronous), anonymizes it
  (``POST /studies/{id}/anonymize``, Orthanc's default profile, synchronous) and C-STOREs the
  anonymized study to research (``/modalities/research/store``, synchronous); the gateway is
  emptied before each run;
- ours, the resident daemon (default): ``anonpipe daemon`` is started before the clock on an
  empty data folder and identity store with a review DB whose studies have no review yet, and
  waits idle (its poll interval set to an hour, so only our poll starts a run); the reviews
  are then inserted (the reviewers' approvals), and the clock runs from ``anonpipectl poll``
  (the same JSON line on the control socket) until the run is ``done`` (the state the test
  harness reads, ``tests.harness.daemon.run_state``, checked every 50 ms; the control socket's
  ``status`` as a fallback); the daemon is stopped after each round;
- ours, ``run-once`` (``--ours run-once`` or ``both``): ``python -m anonpipe.cli run-once`` as
  a subprocess, interpreter start and exit included, as issue 5 measured it.

Before each run the research Orthanc is emptied; after it research must hold exactly the
expected number of instances and studies (a bench that loses files fails). In the first round
one object per study is downloaded from research after the gateway and after ours and searched
for the planted identifiers (what each pipeline leaves, not part of the timing). Our runs log
at info in JSON; their ``pull finished``, ``push finished`` and ``push verified`` lines give
where our time goes. CPU time is counted too: the DCMTK tools', the gateway Orthanc's, ours
(daemon or run-once and their worker processes, from /proc), and the staging and research
Orthancs' in each run. For the daemon, peak RSS of the daemon and of its process group summed.

Printed: median seconds of each, the ratios ours/DCMTK (target <= 1.3), ours/gateway and
gateway/DCMTK, objects and MB. ``--record`` appends a dated section to bench/RESULTS.md;
``--note`` adds paragraphs to it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bench.net_throughput import _commit, _fresh, _fs_type, _versions, _wrap
from tests.harness.daemon import run_state
from tests.harness.dcmtk import StoreSCP, movescu, storescu
from tests.harness.deployment import Site, StudyPlan, build_site
from tests.harness.orthanc import OrthancServer
from tests.harness.ports import LOOPBACK
from tests.harness.studygen import BENCH, BENCH_SMALL, ImageSize, Manifest

RESULTS = Path(__file__).with_name("RESULTS.md")
TARGET = 1.3  # ours / DCMTK, wall time
X = "\u00d7"  # the multiplication sign, as RESULTS.md writes it
STORESCP_AET = "STORESCP"
STAGING_AET = "STAGING"
RESEARCH_AET = "RESEARCH"
GATEWAY_AET = "GATEWAY"
#: The corpus of issue 12 and the one of issue 5 (``--plan old``): studies, series, objects, size.
PLANS: dict[str, tuple[int, int, int, ImageSize]] = {
    "issue12": (8, 2, 60, BENCH_SMALL),
    "old": (8, 2, 30, BENCH),
}
#: Our poll interval in the bench's config: only our ``poll`` may start a run.
QUIET_POLL_INTERVAL = 3600


@dataclass(frozen=True)
class Corpus:
    """A built site and what each run of ours starts from."""

    site: Site
    review_snapshot: Path  # every study approved (as built)
    review_pending: Path  # the same studies, no review yet
    objects: int
    size: int


@dataclass(frozen=True)
class Bench(Corpus):
    """The site with the references' servers."""

    storescp: StoreSCP
    gateway: OrthancServer


# -- set-up -----------------------------------------------------------------------------------


def configure(site: Site, **sections: dict[str, object]) -> None:
    """Set keys in sections of the site's anonpipe.toml (added after the section's header)."""
    config = site.config_path.read_text(encoding="utf-8")
    for section, keys in sections.items():
        lines = "".join(f"{key} = {value}\n" for key, value in keys.items())
        header = f"[{section}]\n"
        if header not in config:
            raise RuntimeError(f"no [{section}] in {site.config_path}")
        # A key written twice is an error in TOML: drop the harness's own line first.
        kept = [
            line
            for line in config.splitlines(keepends=True)
            if not any(line.startswith(f"{key} =") for key in keys)
        ]
        config = "".join(kept).replace(header, header + lines, 1)
    site.config_path.write_text(config, encoding="utf-8")


def settings_overrides(items: list[str]) -> dict[str, dict[str, object]]:
    """``--set section.key=value`` (TOML values) as {section: {key: value}}."""
    sections: dict[str, dict[str, object]] = {}
    for item in items:
        name, _, value = item.partition("=")
        section, _, key = name.partition(".")
        if not (section and key and value):
            raise SystemExit(
                f"--set {item!r}: use section.key=value, e.g. pipeline.studies_in_flight=3"
            )
        sections.setdefault(section, {})[key] = value
    return sections


def snapshot_reviews(site: Site, work: Path) -> tuple[Path, Path]:
    """Copies of the review DB as built (approved) and without its reviews (pending)."""
    approved, pending = work / "review.db.approved", work / "review.db.pending"
    shutil.copyfile(site.review.path, approved)
    shutil.copyfile(site.review.path, pending)
    with contextlib.closing(sqlite3.connect(pending)) as db, db:
        db.execute(f'DELETE FROM "{site.review.review_table}"')
    return approved, pending


def approve_all(site: Site, approved: Path) -> None:
    """Insert the reviews of the approved snapshot into the live review DB (one transaction)."""
    table = site.review.review_table
    with contextlib.closing(sqlite3.connect(site.review.path, timeout=30)) as db:
        db.execute("ATTACH DATABASE ? AS snap", (str(approved),))
        with db:
            db.execute(f'INSERT INTO "{table}" SELECT * FROM snap."{table}"')
        db.execute("DETACH DATABASE snap")


def start_gateway(stack: ExitStack, work: Path, site: Site) -> OrthancServer:
    """A third Orthanc that staging may C-MOVE to and that knows staging and research."""
    gateway = stack.enter_context(
        OrthancServer(
            GATEWAY_AET,
            workdir=work / "orthanc-gateway",
            modalities={"staging": site.staging, "research": site.research},
            dicom_scu_timeout=120,
        )
    )
    site.staging.add_modality("gateway", GATEWAY_AET, LOOPBACK, gateway.dicom_port)
    return gateway


def set_up(stack: ExitStack, work: Path, plan: StudyPlan, push_associations: int = 0) -> Bench:
    """Start the three Orthancs and ``storescp``, build the site, snapshot the review DB.

    *push_associations* (when not 0) is written into the site's ``[research]`` section.
    """
    staging = stack.enter_context(OrthancServer(STAGING_AET, workdir=work / "orthanc-staging"))
    research = stack.enter_context(OrthancServer(RESEARCH_AET, workdir=work / "orthanc-research"))
    # The control socket path must stay short (108 bytes): keep it out of the work folder.
    sockets = Path(tempfile.mkdtemp(prefix="e2e-", dir="/tmp"))
    stack.callback(shutil.rmtree, sockets, ignore_errors=True)
    site, _port = build_site(
        work / "site", staging, research, plan, socket_path=sockets / "control.sock"
    )
    if push_associations:
        configure(site, research={"push_associations": push_associations})
    gateway = start_gateway(stack, work, site)
    storescp = stack.enter_context(StoreSCP(work / "storescp", aet=STORESCP_AET))
    staging.add_modality("storescp", STORESCP_AET, LOOPBACK, storescp.port)
    approved, pending = snapshot_reviews(site, work)
    objects = site.expected_instances()
    _expect("staging Orthanc", len(staging.instances()), objects)
    size = sum(path.stat().st_size for m in site.manifests for path in m.paths)
    return Bench(site, approved, pending, objects, size, storescp, gateway)


def _expect(what: str, got: int, want: int) -> None:
    if got != want:
        raise RuntimeError(f"{what}: {got} objects, expected {want}")


# -- CPU time ---------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _proc_cpu(pid: int | None) -> float:
    stat = _proc_stat(pid) if pid is not None else None
    return stat[1] if stat else 0.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _orthanc_cpu(site: Site) -> float:
    return _proc_cpu(site.staging.pid) + _proc_cpu(site.research.pid)


def _storescp_pid(scp: StoreSCP) -> int | None:
    proc = scp._proc  # a bench: the harness does not expose the pid
    return proc.pid if proc is not None else None


class TreeCpu:
    """CPU seconds of a process and all its descendants, sampled from /proc every 20 ms.

    Our worker processes are children of multiprocessing's forkserver, which run-once does not
    wait for, so ``wait4`` would count only run-once itself. What a process spends after its
    last sample (at most 20 ms) is missed. Each sample reads the stat of new pids once and of
    the tree's pids again (about 0.2 ms of CPU, not a full scan of /proc).
    """

    def __init__(self, root: int) -> None:
        self.tree = {root}
        self.last: dict[int, float] = {}
        self._others: set[int] = set()  # pids seen outside the tree
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.02)

    def sample(self) -> None:
        pids = {int(name) for name in os.listdir("/proc") if name.isdigit()}
        for pid in sorted(pids - self.tree - self._others):  # parents before their children
            stat = _proc_stat(pid)
            if stat is not None and stat[0] in self.tree:
                self.tree.add(pid)
            else:
                self._others.add(pid)
        for pid in self.tree & pids:
            stat = _proc_stat(pid)
            if stat is not None:
                self.last[pid] = stat[1]

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.last.values())


def _role(pid: int, root: int, parent: int) -> str:
    """daemon, forkserver, resource tracker (its children), or worker (forked by another)."""
    if pid == root:
        return "daemon"
    if parent != root:
        return "worker"  # forked by the forkserver: its command line is the forkserver's
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "other"
    if b"forkserver" in cmd:
        return "forkserver"
    if b"resource_tracker" in cmd:
        return "resource tracker"
    return "child"


class GroupMeter:
    """Memory and CPU of a process group (a daemon and everything it forks), from /proc.

    Every *interval* seconds the group's members are found (pids whose process group is
    *pgid*; pids seen outside it are not read again) and each member's RSS (``statm``), PSS
    (``smaps_rollup``: shared pages split between the processes sharing them, so the sum does
    not count the forked workers' shared pages twice) and CPU seconds are read. Peaks are kept
    from the last :meth:`reset`; CPU is the sum over members of user + system seconds, as last
    seen (what a process spends after its last sample is missed).
    """

    _PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, pgid: int, interval: float = 0.2) -> None:
        self.pgid = pgid
        self.interval = interval
        self.cpu_seen: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.affinity: dict[int, str] = {}  # Cpus_allowed_list of each member, when first seen
        self.peak_root_rss = 0
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.peak_by_pid: dict[int, int] = {}  # RSS
        self.peak_root_at = 0.0  # time.time() of the daemon's peak
        self.samples = 0
        self.roles: dict[int, str] = {}
        #: (time.time(), the daemon's RSS, the group's RSS summed) of every sample since reset
        self.series: list[tuple[float, int, int]] = []
        self._others: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def _members(self) -> list[int]:
        members = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in self._others:
                continue
            if pid in self.names:
                members.append(pid)
                continue
            try:
                text = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[2]) != self.pgid:
                self._others.add(pid)
                continue
            self.names[pid] = text[text.index("(") + 1 : text.rindex(")")]
            self.roles[pid] = _role(pid, self.pgid, int(fields[1]))
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("Cpus_allowed_list:"):
                        self.affinity[pid] = line.split(":", 1)[1].strip()
            members.append(pid)
        return members

    def sample(self) -> None:
        rss_total = pss_total = root_rss = count = 0
        with self._lock:
            for pid in self._members():
                stat = _proc_stat(pid)
                try:
                    resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._PAGE
                    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                except (OSError, IndexError, ValueError):
                    continue
                if stat is None:
                    continue
                self.cpu_seen[pid] = stat[1]
                pss = next(
                    (int(line.split()[1]) * 1024 for line in rollup.splitlines()
                     if line.startswith("Pss:")),
                    resident,
                )  # fmt: skip
                count += 1
                rss_total += resident
                pss_total += pss
                if pid == self.pgid:
                    root_rss = resident
                    if resident > self.peak_root_rss:
                        self.peak_root_at = time.time()
                self.peak_by_pid[pid] = max(self.peak_by_pid.get(pid, 0), resident)
            self.peak_root_rss = max(self.peak_root_rss, root_rss)
            self.peak_rss = max(self.peak_rss, rss_total)
            self.peak_pss = max(self.peak_pss, pss_total)
            self.peak_processes = max(self.peak_processes, count)
            self.series.append((time.time(), root_rss, rss_total))
            self.samples += 1

    def reset(self) -> dict[int, float]:
        """Start new peaks; return the CPU seconds seen so far per pid (a baseline)."""
        self.sample()
        with self._lock:
            self.peak_root_rss = self.peak_rss = self.peak_pss = self.peak_processes = 0
            self.peak_by_pid = {}
            self.series = []
            self.samples = 0
            return dict(self.cpu_seen)

    def refresh_affinity(self) -> None:
        """Read each live member's ``Cpus_allowed_list`` again (a pid first seen while
        ``taskset`` had not yet pinned itself showed the old list)."""
        with self._lock:
            for pid in list(self.affinity):
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("Cpus_allowed_list:"):
                            self.affinity[pid] = line.split(":", 1)[1].strip()

    def peaks_by_role(self) -> dict[str, int]:
        """Peak RSS since :meth:`reset` of the daemon, the forkserver, the resource tracker
        and the largest worker."""
        with self._lock:
            peaks: dict[str, int] = {}
            for pid, rss in self.peak_by_pid.items():
                role = self.roles.get(pid, "other")
                peaks[role] = max(peaks.get(role, 0), rss)
            return peaks

    def cpu_since(self, baseline: dict[int, float]) -> float:
        """CPU seconds of the group since *baseline* (see :meth:`reset`)."""
        self.sample()
        with self._lock:
            return sum(cpu - baseline.get(pid, 0.0) for pid, cpu in self.cpu_seen.items())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the resident daemon ----------------------------------------------------------------------


def control(socket_path: Path, command: str, timeout: float = 30.0) -> Any:
    """One request on the daemon's control socket, as ``anonpipectl COMMAND`` sends it.

    The protocol (README, ``anonpipectl``): one JSON object per line each way.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(json.dumps({"command": command, "args": {}}).encode() + b"\n")
        reply = sock.makefile("rb").readline()
    if not reply:
        raise RuntimeError(f"the daemon closed the control connection ({command})")
    answer = json.loads(reply)
    if not answer.get("ok", False):
        raise RuntimeError(f"anonpipectl {command}: {answer.get('error')}")
    return answer.get("result")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}


class ResidentDaemon:
    """``anonpipe daemon`` on a site, in its own process group, measured by a :class:`GroupMeter`.

    *cpus* (``taskset -c`` syntax) pins the daemon from its exec on: everything it forks (the
    forkserver, the de-identification workers) inherits the affinity. Entering starts it and
    waits until it is idle (both PACS echoed, no run); leaving sends SIGTERM and kills what is
    left of the group after 60 s.
    """

    def __init__(
        self, site: Site, log_path: Path, *, cpus: str | None = None, interval: float = 0.2
    ) -> None:
        self.site = site
        self.log_path = log_path
        self.cpus = cpus
        self.interval = interval
        self.proc: subprocess.Popen[bytes] | None = None
        self.meter: GroupMeter | None = None
        self.exit_code: int | None = None

    def __enter__(self) -> Self:
        argv = [sys.executable, "-m", "anonpipe.cli", "daemon", "-c", str(self.site.config_path)]
        if self.cpus is not None:
            argv = ["taskset", "-c", self.cpus, *argv]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                cwd=self.site.root,
                start_new_session=True,
            )
        self.meter = GroupMeter(self.proc.pid, self.interval)
        try:
            self.wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def _alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({self.proc.returncode}):\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = control(self.site.socket_path, "status")
        return result

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until the daemon answers ``status`` idle, with both PACS echoed and no run."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            self._alive()
            try:
                last = status = self.status()
            except (OSError, RuntimeError, ValueError):
                time.sleep(0.1)
                continue
            peers = status.get("peers") or {}
            echoed = all(peers.get(name, {}).get("ok") for name in ("staging", "research"))
            if status.get("state") == "idle" and echoed and not status.get("run"):
                time.sleep(0.5)  # the first cycle's selection ends after its echoes
                return
            time.sleep(0.1)
        raise RuntimeError(f"the daemon did not become idle ({last}):\n{self.log_tail()}")

    def poll(self) -> None:
        """``anonpipectl poll``."""
        control(self.site.socket_path, "poll")

    def wait_done(self, timeout: float, stuck: float = 20.0) -> None:
        """Until the run is done: state.db every 50 ms, the control socket every second.

        Raises when the run failed, or when the daemon says it is waiting (a PACS it cannot
        reach, disk space), blocked or paused for *stuck* seconds: with the bench's poll
        interval of an hour it would not try again in time.
        """
        deadline = time.monotonic() + timeout
        asked = 0.0
        waiting_since: float | None = None
        while time.monotonic() < deadline:
            self._alive()
            state = run_state(self.site)
            if state != "done" and time.monotonic() - asked > 1.0:
                asked = time.monotonic()
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    status = self.status()
                    run = status.get("run") or {}
                    state = state or run.get("state")
                    line = str(status.get("state", ""))
                    if line.startswith(("waiting", "blocked", "paused")):
                        waiting_since = waiting_since or time.monotonic()
                        if time.monotonic() - waiting_since > stuck:
                            raise RuntimeError(
                                f"the daemon is stuck ({line}; run {run}):\n{self.log_tail()}"
                            )
                    else:
                        waiting_since = None
            if state == "done":
                return
            if state == "failed":
                raise RuntimeError(f"the run failed:\n{self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"the run was not done within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    self.exit_code = proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    self.exit_code = proc.wait()
            else:
                self.exit_code = proc.returncode
            deadline = time.monotonic() + 10  # the forkserver leaves once it sees us gone
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # nothing may outlive the bench
            if self.meter is not None:
                self.meter.stop()


# -- the runs ---------------------------------------------------------------------------------


@dataclass
class RefRun:
    """One timed DCMTK transfer: wall seconds (in all, and its C-MOVE part) and CPU."""

    seconds: float
    move_seconds: float
    cpu: float  # the DCMTK tools and storescp
    orthanc_cpu: float


@dataclass
class GatewayRun:
    """One timed gateway pipeline: wall seconds of its three steps, CPU, what leaked."""

    seconds: float
    move_seconds: float
    anonymize_seconds: float
    store_seconds: float
    cpu: float  # the gateway Orthanc
    orthanc_cpu: float  # staging and research
    leaks: dict[str, Any] | None = None


@dataclass
class OurRun:
    """One timed run of ours: wall seconds, CPU, memory and its log events."""

    mode: str  # "daemon" or "run-once"
    seconds: float
    launched: float  # time.time() at the poll or launch, to place the log's timestamps
    ended: float
    cpu: float  # ours and every process it started
    orthanc_cpu: float
    events: list[dict[str, object]] = field(default_factory=list)
    idle_rss: int = 0  # the daemon only: its group's RSS summed, idle before the poll
    peak_root_rss: int = 0
    peak_rss: int = 0
    peak_pss: int = 0
    processes: int = 0
    peaks: dict[str, int] = field(default_factory=dict)  # peak RSS by role (daemon, worker, ...)
    peak_root_after: float = 0.0  # seconds from the poll to the daemon's peak RSS
    series: list[tuple[float, int, int]] = field(default_factory=list)  # GroupMeter.series
    affinity: dict[str, str] = field(default_factory=dict)
    leaks: dict[str, Any] | None = None


def run_reference(b: Bench) -> RefRun:
    """movescu each approved study into storescp, then storescu the folder into research."""
    site, scp = b.site, b.storescp
    assert scp.output_dir is not None
    site.research.delete_all()
    _fresh(scp.output_dir)
    os.sync()
    orthancs, tools, receiver = _orthanc_cpu(site), _children_cpu(), _proc_cpu(_storescp_pid(scp))
    start = time.perf_counter()
    for uid in site.approved_uids:
        keys = {"StudyInstanceUID": uid}
        movescu(site.staging.dicom_port, STORESCP_AET, keys, called_aet=STAGING_AET)
    moved = time.perf_counter()
    storescu(site.research.dicom_port, [scp.output_dir], called_aet=RESEARCH_AET, timeout=600)
    elapsed = time.perf_counter() - start
    cpu = _children_cpu() - tools + _proc_cpu(_storescp_pid(scp)) - receiver
    orthanc_cpu = _orthanc_cpu(site) - orthancs
    _expect("storescp", len(scp.received()), b.objects)
    _expect("research Orthanc (DCMTK)", len(site.research.instances()), b.objects)
    return RefRun(elapsed, moved - start, cpu, orthanc_cpu)


def run_gateway(b: Bench, *, leaks: bool = False) -> GatewayRun:
    """Per study: gateway C-MOVE from staging, REST anonymize, C-STORE to research."""
    site, gateway = b.site, b.gateway
    site.research.delete_all()
    gateway.delete_all()
    os.sync()
    orthancs, own = _orthanc_cpu(site), _proc_cpu(gateway.pid)
    moving = anonymizing = storing = 0.0
    start = time.perf_counter()
    for uid in site.approved_uids:
        t0 = time.perf_counter()
        gateway.post_json(
            "/modalities/staging/move",
            {
                "Level": "Study",
                "Resources": [{"StudyInstanceUID": uid}],
                "TargetAet": GATEWAY_AET,
                "Synchronous": True,
                "Timeout": 600,
            },
            timeout=900,
        )
        study = gateway.study_id(uid)
        if study is None:
            raise RuntimeError("gateway: a study did not arrive by C-MOVE")
        t1 = time.perf_counter()
        anonymized = gateway.post_json(f"/studies/{study}/anonymize", {}, timeout=900)
        t2 = time.perf_counter()
        job = gateway.post_json(
            "/modalities/research/store",
            {"Resources": [anonymized["ID"]], "Synchronous": True, "Timeout": 600},
            timeout=900,
        )
        t3 = time.perf_counter()
        if job and int(job.get("FailedInstancesCount", 0)):
            raise RuntimeError(f"gateway: C-STORE to research failed: {job}")
        moving, anonymizing, storing = moving + t1 - t0, anonymizing + t2 - t1, storing + t3 - t2
    elapsed = time.perf_counter() - start
    cpu = _proc_cpu(gateway.pid) - own
    orthanc_cpu = _orthanc_cpu(site) - orthancs
    _expect("research Orthanc (gateway)", len(site.research.instances()), b.objects)
    _expect("research Orthanc studies (gateway)", len(site.research.studies()),
            len(site.approved_uids))  # fmt: skip
    found = leak_sample(site) if leaks else None
    return GatewayRun(elapsed, moving, anonymizing, storing, cpu, orthanc_cpu, found)


def leak_sample(site: Site) -> dict[str, Any]:
    """One object per research study, downloaded and searched for every planted identifier.

    Returns the number of objects searched, of distinct planted identifying strings and of
    original UIDs found (original dates are not searched: see :meth:`Manifest.find_planted`),
    and where the strings were (``Sequence > Keyword`` paths).
    """
    manifests: list[Manifest] = site.manifests
    objects = strings = uids = 0
    where: set[str] = set()
    for study in site.research.studies():
        instances = site.research.get_json(f"/studies/{study}/instances")
        data = site.research.download(str(instances[0]["ID"]))
        objects += 1
        for manifest in manifests:
            found = manifest.find_planted(data, uids=False)
            strings += len(found)
            uids += len(manifest.find_planted(data, uids=True)) - len(found)
            if found:
                where |= _paths_holding(data, found)
    return {"objects": objects, "identifiers": strings, "uids": uids, "where": sorted(where)}


def _paths_holding(data: bytes, values: set[str]) -> set[str]:
    """Paths of the elements of a DICOM file whose value contains one of *values*."""
    import io

    import pydicom
    from pydicom.dataset import Dataset

    paths: set[str] = set()

    def walk(ds: Dataset, prefix: str) -> None:
        for element in ds:
            name = element.keyword or str(element.tag)
            if element.VR == "SQ":
                for item in element.value:
                    walk(item, f"{prefix}{name} > ")
            elif any(v in str(element.value) for v in values):
                paths.add(prefix + name)

    try:
        walk(pydicom.dcmread(io.BytesIO(data)), "")
    except Exception:  # a bench: an unreadable object only loses the detail
        paths.add("(unreadable)")
    return paths


def reset_ours(b: Corpus, review: Path) -> None:
    """Every run a first run: research, data folder, identity store emptied; review DB copied."""
    site = b.site
    site.research.delete_all()
    shutil.rmtree(site.data_dir, ignore_errors=True)
    site.data_dir.mkdir()
    for suffix in ("", "-wal", "-shm"):
        (site.root / f"identity.db{suffix}").unlink(missing_ok=True)
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{site.review.path}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(review, site.review.path)


def _check_ours(b: Corpus, what: str) -> None:
    site = b.site
    _expect(f"research Orthanc ({what})", len(site.research.instances()), b.objects)
    studies = len(site.research.studies())
    _expect(f"research Orthanc studies ({what})", studies, len(site.approved_uids))


def run_once(b: Corpus, log_path: Path, *, leaks: bool = False) -> OurRun:
    """``anonpipe run-once`` as a subprocess; its JSON log (info) goes to *log_path*."""
    site = b.site
    reset_ours(b, b.review_snapshot)
    os.sync()
    argv = [sys.executable, "-m", "anonpipe.cli", "run-once", "-c", str(site.config_path)]
    orthancs = _orthanc_cpu(site)
    with log_path.open("wb") as log:
        launched = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_clean_env())
        meter = TreeCpu(proc.pid)
        returncode = proc.wait()
        elapsed = time.perf_counter() - start
        ended = time.time()
        cpu = meter.stop()
    orthanc_cpu = _orthanc_cpu(site) - orthancs
    if returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"anonpipe run-once exited {returncode}:\n{tail}")
    _check_ours(b, "run-once")
    found = leak_sample(site) if leaks else None
    return OurRun("run-once", elapsed, launched, ended, cpu, orthanc_cpu, _events(log_path),
                  leaks=found)  # fmt: skip


def run_daemon(
    b: Corpus,
    log_path: Path,
    *,
    cpus: str | None = None,
    leaks: bool = False,
    timeout: float = 1800.0,
    interval: float = 0.2,
) -> OurRun:
    """The resident daemon, timed from ``anonpipectl poll`` until its run is done."""
    site = b.site
    reset_ours(b, b.review_pending)
    log_path.unlink(missing_ok=True)
    with ResidentDaemon(site, log_path, cpus=cpus, interval=interval) as daemon:
        assert daemon.meter is not None
        approve_all(site, b.review_snapshot)
        os.sync()
        orthancs = _orthanc_cpu(site)
        daemon.meter.sample()
        idle_rss = daemon.meter.peak_rss
        baseline = daemon.meter.reset()
        launched = time.time()
        start = time.perf_counter()
        daemon.poll()
        daemon.wait_done(timeout)
        elapsed = time.perf_counter() - start
        ended = time.time()
        cpu = daemon.meter.cpu_since(baseline)
        orthanc_cpu = _orthanc_cpu(site) - orthancs
        meter = daemon.meter
        meter.refresh_affinity()
        affinity = {f"{meter.roles.get(pid, '?')} {pid}": cpus for pid, cpus in
                    sorted(meter.affinity.items())}  # fmt: skip
        run = OurRun(
            "daemon",
            elapsed,
            launched,
            ended,
            cpu,
            orthanc_cpu,
            idle_rss=idle_rss,
            peak_root_rss=meter.peak_root_rss,
            peak_rss=meter.peak_rss,
            peak_pss=meter.peak_pss,
            processes=meter.peak_processes,
            peaks=meter.peaks_by_role(),
            peak_root_after=max(0.0, meter.peak_root_at - launched),
            series=list(meter.series),
            affinity=affinity,
        )
    if daemon.exit_code not in (0, None):
        print(f"warning: the daemon exited {daemon.exit_code} at SIGTERM:\n{daemon.log_tail()}")
    run.events = _events(log_path)
    _check_ours(b, "daemon")
    run.leaks = leak_sample(site) if leaks else None
    return run


def _events(log_path: Path) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


# -- where our time goes ----------------------------------------------------------------------

PHASES = (
    ("start-up", "interpreter, imports, state store, SCP listening"),
    ("select", "review DB selection, run directory, worker pool start, until the first pull"),
    ("pull only", "pulls running (C-FIND + C-MOVE into our SCP, de-identification overlapping)"),
    ("pull and push", "a pull and a push running at once (studies overlapping)"),
    ("push only", "pushes running (C-STORE to research, `push_files`)"),
    (
        "neither",
        "no pull or push running: de-identification not hidden by a pull, `sync`, protocol "
        "check, hook, verification C-FINDs, state writes, review DB write-back",
    ),
    ("exit", "from the log's `run done`: SCP stop, worker and interpreter exit"),
)
#: For the resident daemon the clock starts at the poll and stops when the run is seen done.
DAEMON_PHASES = {
    "start-up": "not timed (the daemon was started before the poll)",
    "select": "from the poll: review DB selection, run directory, worker pool start, until the "
    "first pull",
    "exit": "from the log's `run done` until the bench saw the run done (state.db, every 50 ms)",
}
#: Not shares of the wall time: each study's pull and push durations summed over the studies.
BUSY = ("pull busy", "push busy")


def _ts(event: dict[str, object]) -> float:
    stamp = str(event["timestamp"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


def _covered(spans: Sequence[tuple[float, float]], low: float, high: float) -> float:
    """Seconds of [low, high] inside the union of *spans*."""
    total, reach = 0.0, low
    for start, end in sorted(spans):
        start, end = max(start, reach), min(end, high)
        if end > start:
            total += end - start
            reach = end
    return total


def phases(run: OurRun) -> dict[str, float]:
    """Seconds per phase from the log, whether studies run one after another or overlap.

    Each study's pull and push are logged with their durations (``pull finished``, ``push
    finished``, ``seconds``): from the first pull's start to ``run done`` the wall time is split
    into pull only, pull and push at once, push only, and neither. Empty if a line is missing.
    """

    def stamps(name: str) -> list[dict[str, object]]:
        return [e for e in run.events if e.get("event") == name]

    try:
        pulls = [(_ts(e) - float(str(e["seconds"])), _ts(e)) for e in stamps("pull finished")]
        pushes = [(_ts(e) - float(str(e["seconds"])), _ts(e)) for e in stamps("push finished")]
        done = [_ts(e) for e in stamps("run done")]
        listening = [_ts(e) for e in stamps("storage scp listening")]
    except (KeyError, ValueError):
        return {}
    resident = run.mode == "daemon"
    if not (pulls and pushes and done) or not (listening or resident):
        return {}
    begin = min(start for start, _end in pulls)
    end = done[-1]
    pull = _covered(pulls, begin, end)
    push = _covered(pushes, begin, end)
    both = pull + push - _covered(pulls + pushes, begin, end)
    return {
        "start-up": 0.0 if resident else listening[0] - run.launched,
        "select": begin - (run.launched if resident else listening[0]),
        "pull only": pull - both,
        "pull and push": both,
        "push only": push - both,
        "neither": (end - begin) - (pull + push - both),
        "exit": run.ended - end,
        "pull busy": sum(e - s for s, e in pulls),
        "push busy": sum(e - s for s, e in pushes),
    }


# -- report -----------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


MB = 1e6
MIB = 1024 * 1024


@dataclass(frozen=True)
class Result:
    reference: list[RefRun]
    gateway: list[GatewayRun]
    ours: list[OurRun]  # the resident daemon's runs (or run-once's, with --ours run-once)
    run_once: list[OurRun]  # with --ours both
    objects: int
    size: int
    studies: int

    @property
    def ref_s(self) -> float:
        return _median([r.seconds for r in self.reference])

    @property
    def gateway_s(self) -> float:
        return _median([r.seconds for r in self.gateway])

    @property
    def ours_s(self) -> float:
        return _median([r.seconds for r in self.ours])

    @property
    def ratio(self) -> float:
        """ours / DCMTK."""
        return self.ours_s / self.ref_s

    @property
    def ratio_gateway(self) -> float:
        """ours / gateway."""
        return self.ours_s / self.gateway_s

    @property
    def gateway_ratio(self) -> float:
        """gateway / DCMTK."""
        return self.gateway_s / self.ref_s

    @property
    def ours_name(self) -> str:
        return "anonpipe daemon, poll → done" if self.ours[0].mode == "daemon" else "run-once"

    @property
    def ref_move_s(self) -> float:
        return _median([r.move_seconds for r in self.reference])

    def phases(self, runs: Sequence[OurRun]) -> dict[str, float]:
        """Phase by phase, median over the rounds (empty if a log lacked a line)."""
        split = [s for s in (phases(r) for r in runs) if s]
        if not split:
            return {}
        names = [name for name, _ in PHASES] + list(BUSY)
        return {name: _median([s[name] for s in split]) for name in names}

    def rows(self) -> list[tuple[str, list[float], float, float]]:
        """(name, seconds of each round, median CPU s, median Orthancs' CPU s) per pipeline."""
        rows = [
            (
                "DCMTK: per study `movescu` → `storescp` (files), then `storescu` → research",
                [r.seconds for r in self.reference],
                _median([r.cpu for r in self.reference]),
                _median([r.orthanc_cpu for r in self.reference]),
            ),
            (
                "Orthanc gateway: per study C-MOVE into it, `/anonymize`, C-STORE → research",
                [r.seconds for r in self.gateway],
                _median([r.cpu for r in self.gateway]),
                _median([r.orthanc_cpu for r in self.gateway]),
            ),
        ]
        for runs in (self.ours, self.run_once):
            if runs:
                name = (
                    "**anonpipe daemon, `anonpipectl poll` → run done**"
                    if runs[0].mode == "daemon"
                    else "**anonpipe `run-once`** (interpreter start and exit included)"
                )
                rows.append(
                    (
                        name,
                        [r.seconds for r in runs],
                        _median([r.cpu for r in runs]),
                        _median([r.orthanc_cpu for r in runs]),
                    )
                )
        return rows


def _plain(name: str) -> str:
    return name.replace("*", "").replace("`", "")


def print_result(r: Result) -> None:
    met = "met" if r.ratio <= TARGET else "MISSED"
    print(f"{r.studies} studies, {r.objects} objects, {r.size / MB:.0f} MB, "
          f"median of {len(r.ours)} round(s)")  # fmt: skip
    print(f"{'pipeline':40s} {'seconds':>8s} {'objects/s':>10s} {'MB/s':>6s} "
          f"{'CPU s':>6s} {'Orthanc CPU s':>14s}")  # fmt: skip
    for name, seconds, cpu, orthanc in r.rows():
        median = _median(seconds)
        print(f"{_plain(name)[:40]:40s} {median:8.2f} {r.objects / median:10.0f} "
              f"{r.size / MB / median:6.0f} {cpu:6.2f} {orthanc:14.2f}")  # fmt: skip
    print(f"ours ({r.ours_name}) / DCMTK:   {r.ratio:.2f} (target <= {TARGET}: {met})")
    print(f"ours ({r.ours_name}) / gateway: {r.ratio_gateway:.2f}")
    print(f"gateway / DCMTK: {r.gateway_ratio:.2f}")
    if r.run_once:
        once = _median([x.seconds for x in r.run_once])
        print(f"run-once / DCMTK: {once / r.ref_s:.2f}; run-once / gateway: "
              f"{once / r.gateway_s:.2f}")  # fmt: skip
    print(f"DCMTK: movescu {r.ref_move_s:.2f} s, storescu {r.ref_s - r.ref_move_s:.2f} s")
    g = r.gateway
    print(f"gateway: C-MOVE {_median([x.move_seconds for x in g]):.2f} s, anonymize "
          f"{_median([x.anonymize_seconds for x in g]):.2f} s, C-STORE "
          f"{_median([x.store_seconds for x in g]):.2f} s")  # fmt: skip
    if r.ours[0].mode == "daemon":
        o = r.ours
        print(f"daemon peak RSS {max(x.peak_root_rss for x in o) / MIB:.0f} MiB; its process "
              f"group summed: RSS {max(x.peak_rss for x in o) / MIB:.0f} MiB, PSS "
              f"{max(x.peak_pss for x in o) / MIB:.0f} MiB, {max(x.processes for x in o)} "
              "processes")  # fmt: skip
    for name, runs in (("gateway", r.gateway), ("ours", r.ours)):
        leaks = next((x.leaks for x in runs if x.leaks), None)
        if leaks:
            print(f"planted values in {leaks['objects']} research objects after {name}: "
                  f"{leaks['identifiers']} identifiers, {leaks['uids']} original UIDs "
                  f"{', '.join(leaks['where'])}")  # fmt: skip
    split = r.phases(r.ours)
    if split:
        print(f"\nwhere our time goes ({r.ours_name}, from its log):")
        for name, what in PHASES:
            if r.ours[0].mode == "daemon":
                what = DAEMON_PHASES.get(name, what)
            spent = split[name]
            print(f"  {name:15s} {spent:6.2f} s {100 * spent / r.ours_s:4.0f} %  {what}")
        print(f"  pulls summed over the studies {split['pull busy']:.2f} s, pushes "
              f"{split['push busy']:.2f} s")  # fmt: skip


def record(
    r: Result,
    args: argparse.Namespace,
    plan: StudyPlan,
    seconds: float,
    work: Path,
    date: str,
) -> None:
    """Append a dated section to RESULTS.md."""
    met = r.ratio <= TARGET
    associations = (
        f"`push_associations = {args.push_associations}`"
        if args.push_associations
        else "the default push associations"
    ) + "".join(f"; `{item}`" for item in args.set)
    size = plan.size if isinstance(plan.size, ImageSize) else ImageSize(*plan.size)
    rounds = len(r.ours)
    lines = [
        "",
        "## End to end (issue 12) (`bench/e2e.py`)",
        "",
        f"{date}, commit {_commit()}; machine: {os.cpu_count()} cores.",
        f"`.venv/bin/python -m bench.e2e {' '.join(_options(args))}`: {r.studies} approved "
        f"studies of {plan.series_per_study} series {X} {plan.instances_per_series} generated "
        f"CT/MR objects, {size.rows}{X}{size.columns}{X}16 bit, explicit VR little endian, "
        "identifiers planted in standard elements, sequences two deep, a private block (with a "
        f"UN element), the file meta and free text: {r.objects} objects, {r.size / MB:.0f} MB, "
        "in a staging Orthanc and approved in a review DB (`tests/harness/deployment.py`); "
        f"loopback, {_versions()}; every DCMTK tool and Orthanc with `TCP_NODELAY=1`; all files "
        f"on {_fs_type(work)}; the research Orthanc emptied before every run and checked after "
        f"it for exactly {r.objects} instances in {r.studies} studies; our config as the harness "
        f"writes it (`jobs = 2`; {associations}; `poll_interval` raised to an hour for the "
        f"daemon); each run of ours a first run (empty data folder and identity store); median "
        f"of {rounds} round(s), alternating, whole bench {seconds:.0f} s.",
        "",
        "What is timed. **DCMTK**: per approved study `movescu` into a `storescp` writing files, "
        "then one `storescu` of them into research (the old pipeline's transfer, no "
        "de-identification). **Orthanc gateway**: a third Orthanc; per approved study, in turn, "
        "its REST `POST /modalities/staging/move` (C-MOVE of the study into itself, synchronous), "
        "`POST /studies/{id}/anonymize` (Orthanc's default profile, synchronous) and `POST "
        "/modalities/research/store` of the anonymized study (C-STORE, synchronous): from the "
        "first request until the last store returned, research then holding every object; the "
        "gateway emptied before each run. **Ours**: "
        + (
            "`anonpipe daemon` started before the clock (empty data folder and identity store, "
            "the review DB's studies without reviews), idle with both PACS echoed; the reviews "
            "inserted; the clock runs from the `poll` request on the control socket (the JSON "
            "line `anonpipectl poll` sends) until the run is `done` in the daemon's state "
            "(`tests.harness.daemon.run_state`, read every 50 ms); the daemon stopped after each "
            "round."
            if r.ours[0].mode == "daemon"
            else "`python -m anonpipe.cli run-once` as a subprocess, start to exit."
        )
        + (" `run-once` was timed too, start to exit." if r.run_once else ""),
        "",
        "| pipeline | seconds | objects/s | MB/s | CPU s | Orthancs' CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs_s, cpu, orthanc in r.rows():
        median = _median(runs_s)
        lines.append(
            f"| {name} | {median:.2f} | {r.objects / median:.0f} | {r.size / MB / median:.0f} "
            f"| {cpu:.2f} | {orthanc:.2f} |"
        )
    rounds_text = "; ".join(
        f"{_plain(name).split(':')[0].split(',')[0]} {', '.join(f'{x:.2f}' for x in runs_s)}"
        for name, runs_s, _c, _o in r.rows()
    )
    lines += [
        "",
        f"Rounds (s): {rounds_text}. CPU: the DCMTK tools and `storescp`; the gateway Orthanc; "
        "ours with every process of its group (daemon or run-once, forkserver, "
        "de-identification workers; sampled from /proc); Orthancs': staging and research.",
        "",
        f"**Ratios** (wall time, medians): ours/DCMTK **{r.ratio:.2f}{X}** (target ≤ "
        f"{TARGET}{X}: {'met' if met else 'not met'}); ours/gateway **{r.ratio_gateway:.2f}"
        f"{X}**; gateway/DCMTK {r.gateway_ratio:.2f}{X}.",
    ]
    if r.run_once:
        once = _median([x.seconds for x in r.run_once])
        lines[-1] += (
            f" `run-once`: {once / r.ref_s:.2f}{X} DCMTK, {once / r.gateway_s:.2f}{X} the gateway."
        )
    g = r.gateway
    lines += [
        "",
        f"The gateway's {r.gateway_s:.2f} s: C-MOVE {_median([x.move_seconds for x in g]):.2f} "
        f"s, anonymize {_median([x.anonymize_seconds for x in g]):.2f} s, C-STORE "
        f"{_median([x.store_seconds for x in g]):.2f} s; DCMTK's {r.ref_s:.2f} s: `movescu` "
        f"{r.ref_move_s:.2f} s, `storescu` {r.ref_s - r.ref_move_s:.2f} s.",
    ]
    if r.ours[0].mode == "daemon":
        o = r.ours
        lines[-1] += (
            f" The daemon's peak RSS during its runs {max(x.peak_root_rss for x in o) / MIB:.0f} "
            f"MiB; its process group summed ({max(x.processes for x in o)} processes): RSS "
            f"{max(x.peak_rss for x in o) / MIB:.0f} MiB, PSS "
            f"{max(x.peak_pss for x in o) / MIB:.0f} MiB (sampled every 0.2 s)."
        )
    leaks = [
        (name, next((x.leaks for x in runs if x.leaks), None))
        for name, runs in (("the gateway", r.gateway), ("ours", r.ours))
    ]
    if all(found for _n, found in leaks):
        lines += [
            "",
            "Not the same work. Planted values found in one research object per study (first "
            "round, the object's bytes searched with `Manifest.find_planted`): "
            + "; ".join(
                f"after {name} {found['identifiers']} identifying strings and {found['uids']} "
                "original UIDs"
                for name, found in leaks
                if found
            )
            + ". "
            + "".join(
                f"After {name} they were in {', '.join(found['where'])}. "
                for name, found in leaks
                if found and found["where"]
            )
            + "Ours also syncs each study's landed objects and outputs once, writes the audit "
            "trail and state store, "
            "verifies each study by C-FIND and writes back to the review DB.",
        ]
    split = r.phases(r.ours)
    if split:
        lines += [
            "",
            f"Where our {r.ours_s:.2f} s go (the `pull finished`, `push finished` and "
            "`push verified` lines of the JSON log, median over the rounds):",
            "",
            "| phase | seconds | share | what |",
            "|---|---:|---:|---|",
        ]
        for name, what in PHASES:
            if r.ours[0].mode == "daemon":
                what = DAEMON_PHASES.get(name, what)
            spent = split[name]
            lines.append(f"| {name} | {spent:.2f} | {100 * spent / r.ours_s:.0f} % | {what} |")
        lines += [
            "",
            f"Each study's pull and push durations summed over the studies: pulls "
            f"{split['pull busy']:.2f} s, pushes {split['push busy']:.2f} s (more than their "
            "share of the wall time when studies overlap).",
        ]
    for paragraph in args.note.split("\n\n") if args.note else []:
        lines += ["", paragraph]
    lines = [line if line.startswith("|") else _wrap(line) for line in lines]
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    print(f"recorded in {RESULTS}")


def _options(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces this run (without --record, --note, --work, --keep)."""
    shown = ["--quick"] if args.quick else [f"--rounds {args.rounds}"]
    if args.plan != "issue12":
        shown.append(f"--plan {args.plan}")
    if args.ours != "daemon":
        shown.append(f"--ours {args.ours}")
    for name in ("studies", "series", "instances", "push_associations"):
        if getattr(args, name):
            shown.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    return shown


# -- main -------------------------------------------------------------------------------------


def make_plan(name: str, studies: int = 0, series: int = 0, instances: int = 0) -> StudyPlan:
    """The approved-only plan of *name* (:data:`PLANS`), with any count overridden."""
    default_studies, default_series, default_instances, size = PLANS[name]
    return StudyPlan(
        approved=studies or default_studies,
        approved_with_protocol=0,
        rejected_phi=0,
        conflicting=0,
        missing_from_staging=0,
        series_per_study=series or default_series,
        instances_per_series=instances or default_instances,
        size=size,
    )


def stop_on_signals() -> None:
    """SIGTERM and SIGINT end the bench through its context managers (servers stopped).

    A shell's background job starts with SIGINT ignored: installed here, it works there too.
    """

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def load_note() -> str:
    """The machine's load and other Orthanc or anonpipe processes (another test run, say)."""
    ours = os.getpid()
    others = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == ours:
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{name}/cmdline").read_bytes()
            if b"Orthanc" in cmd or b"anonpipe.cli" in cmd:
                others += 1
    one, five, _ = os.getloadavg()
    return (
        f"load average {one:.2f} (1 min), {five:.2f} (5 min), {others} Orthanc or anonpipe "
        "processes not the bench's (e.g. another session's tests)"
    )


def isolate_tmp(work: Path) -> None:
    """Everything temporary in *work* (the harness's logs, storescp's output)."""
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default="issue12",
        help="issue12: 8 studies x 2 series x 60 objects, 256x256 (default); "
        "old: 8 x 2 x 30 objects, 512x512 (issue 5's)",
    )
    parser.add_argument("--studies", type=int, default=0, help="approved studies (plan's)")
    parser.add_argument("--series", type=int, default=0, help="series per study (plan's)")
    parser.add_argument("--instances", type=int, default=0, help="objects per series (plan's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument(
        "--ours",
        choices=("daemon", "run-once", "both"),
        default="daemon",
        help="how ours runs: the resident daemon from poll to done (default), run-once, or both "
        "(the ratios are the daemon's)",
    )
    parser.add_argument(
        "--push-associations",
        type=int,
        default=0,
        help="set [research] push_associations in our config (default: as the harness writes it)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="set a key in our config, e.g. pipeline.studies_in_flight=3 (repeatable)",
    )
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the work folder in place")
    parser.add_argument("--record", action="store_true", help="append results to RESULTS.md")
    parser.add_argument(
        "--note", default="", help="text for the recorded section (blank lines: paragraphs)"
    )
    parser.add_argument(
        "--date", default=datetime.date.today().isoformat(), help="date of the recorded section"
    )
    args = parser.parse_args()
    stop_on_signals()
    before = load_note()
    print(f"before: {before}", flush=True)
    rounds = 1 if args.quick else args.rounds
    plan = make_plan(args.plan, args.studies, args.series, args.instances)
    began = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="e2e-bench-", dir="/var/tmp"))
    if (work / "site").exists():
        raise SystemExit(f"{work / 'site'} exists: give a new or empty --work folder")
    isolate_tmp(work)
    try:
        with ExitStack() as stack:
            b = set_up(stack, work, plan, args.push_associations)
            for section, keys in settings_overrides(args.set).items():
                configure(b.site, **{section: keys})
            if args.ours != "run-once":
                configure(b.site, review={"poll_interval": QUIET_POLL_INTERVAL})
            print(f"{len(b.site.approved_uids)} studies, {b.objects} objects, "
                  f"{b.size / MB:.0f} MB in {work} (set-up {time.perf_counter() - began:.0f} s)",
                  flush=True)  # fmt: skip
            reference: list[RefRun] = []
            gateway: list[GatewayRun] = []
            ours: list[OurRun] = []
            once: list[OurRun] = []
            for round_ in range(rounds):
                first = round_ == 0
                n = round_ + 1
                reference.append(run_reference(b))
                print(f"round {n} DCMTK     {reference[-1].seconds:7.2f} s", flush=True)
                gateway.append(run_gateway(b, leaks=first))
                print(f"round {n} gateway   {gateway[-1].seconds:7.2f} s", flush=True)
                if args.ours in ("daemon", "both"):
                    ours.append(run_daemon(b, work / f"daemon-{n}.log", leaks=first))
                    print(f"round {n} daemon    {ours[-1].seconds:7.2f} s", flush=True)
                if args.ours in ("run-once", "both"):
                    target = ours if args.ours == "run-once" else once
                    target.append(run_once(b, work / f"run-once-{n}.log", leaks=first))
                    print(f"round {n} run-once  {target[-1].seconds:7.2f} s", flush=True)
            result = Result(
                reference, gateway, ours, once, b.objects, b.size, len(b.site.approved_uids)
            )
        seconds = time.perf_counter() - began
        after = load_note()
        print(f"\nwhole bench {seconds:.0f} s; at the end: {after}")
        print_result(result)
        if args.record:
            args.note = f"Machine at the start: {before}; at the end: {after}." + (
                f"\n\n{args.note}" if args.note else ""
            )
            record(result, args, plan, seconds, work, args.date)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
