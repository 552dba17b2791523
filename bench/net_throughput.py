"""DICOM network throughput over loopback: DCMTK and Orthanc against anonpipe's SCP, push and pull.

Run from the repository root (DCMTK and Orthanc installed)::

    .venv/bin/python -m bench.net_throughput --files 1000 --rounds 1 [--record]

One CT study (512x512x16 bit, 4 series) is generated once and the same files go through every
case, each a pair of a reference and ours measured in turn, in the same run:

- receive: ``storescu`` -> ``storescp`` (writing files) vs ``storescu`` -> our StorageSCP, with
  1 sender and with 4 (the study split by series over 4 ``storescu`` processes at once; the
  reference is then ``storescp --fork``, one process per association);
- send: ``storescu`` -> Orthanc vs :func:`anonpipe.scu.push_items` -> the same Orthanc, with 1
  and 4 associations (4 ``storescu`` processes for the reference); Orthanc is emptied before
  each run. The items (path and header UIDs) are built before the clock starts, as the daemon
  builds them from its state store; ``--push-files`` times :func:`anonpipe.scu.push_files`
  (which reads every header) instead;
- pull: ``movescu`` (study level) into ``storescp`` vs :func:`anonpipe.scu.pull_study` into our
  SCP, from a staging Orthanc holding the study.

Every run checks that all objects arrived (a bench that loses files fails) and starts after
``sync``. DCMTK tools and Orthanc run with ``TCP_NODELAY=1``; our side runs as it is configured
(our SCP spools into a folder on the landing filesystem and renames each object into place;
after each receive or pull the landing folder is made durable with
:func:`anonpipe.durable.sync_folder`, inside the timing, as the daemon does once per study).
Printed: median seconds and files/s per case and the ratio ours/reference (target >= 0.9).
``--push-sweep 1,2,4`` then times the push with each number of associations (reference: as
many ``storescu`` processes, the series split between them). ``--record`` appends a dated
section to bench/RESULTS.md; ``--note`` adds a paragraph to it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from anonpipe.config import LocalSettings, Peer, ResearchSettings, StagingSettings
from anonpipe.durable import sync_folder
from anonpipe.logs import configure_logging
from anonpipe.scp import LandingRegistry, StorageSCP
from anonpipe.scu import PushItem, PushReport, pull_study, push_files, push_items, read_item
from bench.anon_throughput import _warm
from tests.harness.dcmtk import StoreSCP, movescu, storescu
from tests.harness.orthanc import OrthancServer
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.studygen import BENCH, generate

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTIONS = ("receive", "send", "pull")
SENDERS = 4  # parallel senders / associations, and series in the study
TARGET = 0.9  # ours / reference, files per second
X = "\u00d7"  # the multiplication sign, as RESULTS.md writes it
OUR_AET = "ANONPIPE"
STORESCU_AET = "STORESCU"
STORESCP_AET = "STORESCP"
STAGING_AET = "STAGING"
RESEARCH_AET = "RESEARCH"


@dataclass(frozen=True)
class StudySet:
    """The generated study: its files, by series folder, and its UID."""

    root: Path
    study_uid: str
    series_dirs: tuple[Path, ...]
    paths: tuple[Path, ...]
    size: int
    #: What the daemon's state store holds for each file (built once, outside the timings).
    items: tuple[PushItem, ...] = ()

    @property
    def count(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Pair:
    """One comparison: a reference case and ours, both keys into the measured times."""

    section: str
    name: str
    reference: str
    ours: str


PAIRS = (
    Pair("receive", "1 sender", "`storescu` → `storescp`", "`storescu` → anonpipe SCP"),
    Pair(
        "receive",
        f"{SENDERS} senders",
        f"{SENDERS}{X} `storescu` → `storescp --fork`",
        f"{SENDERS}{X} `storescu` → anonpipe SCP",
    ),
    Pair("send", "1 association", "`storescu` → Orthanc", "`push_items` → Orthanc"),
    Pair(
        "send",
        f"{SENDERS} associations",
        f"{SENDERS}{X} `storescu` → Orthanc",
        f"`push_items(associations={SENDERS})` → Orthanc",
    ),
    Pair("pull", "study C-MOVE", "`movescu` → `storescp`", "`pull_study` → anonpipe SCP"),
)


# -- setup ------------------------------------------------------------------------------------


def make_study(root: Path, files: int) -> StudySet:
    """Generate (or reuse, in a kept --work folder) one CT study of `files` objects in 4 series."""
    per_series = max(1, -(-files // SENDERS))
    if not root.exists():
        generate(root, patients=1, studies_per_patient=1, series_per_study=SENDERS,
                 instances_per_series=per_series, size=BENCH, modalities=("CT",),
                 transfer_syntaxes=(ExplicitVRLittleEndian,), seed=7)  # fmt: skip
    paths = tuple(sorted(root.rglob("*.dcm")))
    series_dirs = tuple(sorted({p.parent for p in paths}))
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    items = tuple(read_item(path) for path in paths)
    return StudySet(root, study_uid, series_dirs, paths, _warm(root), items)


@dataclass
class Servers:
    """Everything the cases talk to; stopped by the ExitStack that started them."""

    local: LocalSettings
    registry: LandingRegistry
    storescp: StoreSCP
    forking: StoreSCP
    staging: OrthancServer
    research: OrthancServer


def start_servers(stack: ExitStack, work: Path) -> Servers:
    """Start both storescp flavours, our SCP, the staging and the research Orthanc."""
    local = LocalSettings(ae_title=OUR_AET, bind=LOOPBACK, port=free_port(), min_free_mb=0)
    registry = LandingRegistry()
    peers = [Peer(ae_title=STORESCU_AET, host=LOOPBACK), Peer(ae_title=STAGING_AET, host=LOOPBACK)]
    scp = StorageSCP(local, peers=peers, registry=registry, spool_dir=work / "spool")
    scp.start()
    stack.callback(scp.stop)
    storescp = stack.enter_context(StoreSCP(work / "storescp", aet=STORESCP_AET))
    forking = stack.enter_context(StoreSCP(work / "storescp-fork", aet=STORESCP_AET, fork=True))
    staging = stack.enter_context(OrthancServer(STAGING_AET, workdir=work / "orthanc-staging"))
    research = stack.enter_context(OrthancServer(RESEARCH_AET, workdir=work / "orthanc-research"))
    staging.add_modality("anonpipe", OUR_AET, LOOPBACK, local.port)
    staging.add_modality("storescp", STORESCP_AET, LOOPBACK, storescp.port)
    return Servers(local, registry, storescp, forking, staging, research)


def load_staging(servers: Servers, study: StudySet) -> None:
    """Store the study in the staging Orthanc (with storescu: faster than REST uploads)."""
    storescu(servers.staging.dicom_port, [study.root], called_aet=STAGING_AET, timeout=600)
    _expect("staging Orthanc", servers.staging.count_instances(study.study_uid), study.count)


# -- one run of each case ---------------------------------------------------------------------


def _expect(what: str, got: int, want: int) -> None:
    if got != want:
        raise RuntimeError(f"{what}: {got} objects arrived, {want} were sent")


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _storescu_parallel(port: int, called_aet: str, dirs: Sequence[Path]) -> None:
    """One ``storescu`` process per folder, all at once; returns when all are done."""
    with ThreadPoolExecutor(len(dirs)) as pool:
        done = pool.map(
            lambda d: storescu(port, [d], called_aet=called_aet, calling_aet=STORESCU_AET), dirs
        )
        list(done)  # re-raise the first failure


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def receive_storescp(scp: StoreSCP, study: StudySet, senders: int) -> float:
    assert scp.output_dir is not None
    _fresh(scp.output_dir)
    dirs = study.series_dirs if senders > 1 else (study.root,)
    elapsed = _timed(lambda: _storescu_parallel(scp.port, scp.aet, dirs))
    _expect("storescp", len(scp.received()), study.count)
    return elapsed


def receive_ours(servers: Servers, study: StudySet, senders: int, landing_dir: Path) -> float:
    dirs = study.series_dirs if senders > 1 else (study.root,)
    with servers.registry.expect(study.study_uid, landing_dir) as landing:
        start = time.perf_counter()
        _storescu_parallel(servers.local.port, OUR_AET, dirs)
        sync_folder(landing_dir)
        elapsed = time.perf_counter() - start
        _expect("anonpipe SCP", landing.landed, study.count)
    shutil.rmtree(landing_dir)
    return elapsed


def _split(study: StudySet, senders: int) -> list[list[Path]]:
    """The series folders dealt to `senders` senders (the study's root for one)."""
    if senders == 1:
        return [[study.root]]
    return [list(study.series_dirs[i::senders]) for i in range(senders)]


def _storescu_groups(port: int, called_aet: str, groups: Sequence[Sequence[Path]]) -> None:
    """One ``storescu`` process per group of folders, all at once."""
    with ThreadPoolExecutor(len(groups)) as pool:
        done = pool.map(
            lambda g: storescu(port, g, called_aet=called_aet, calling_aet=STORESCU_AET), groups
        )
        list(done)


def send_storescu(research: OrthancServer, study: StudySet, senders: int) -> float:
    research.delete_all()
    groups = _split(study, senders)
    elapsed = _timed(lambda: _storescu_groups(research.dicom_port, research.aet, groups))
    _expect("research Orthanc", research.count_instances(study.study_uid), study.count)
    return elapsed


#: Set by --push-files: time push_files (reads each header) instead of push_items.
PUSH_READS_HEADERS = False


def send_ours(servers: Servers, study: StudySet, associations: int) -> float:
    research = servers.research
    research.delete_all()
    target = ResearchSettings(ae_title=research.aet, host=LOOPBACK, port=research.dicom_port)
    start = time.perf_counter()
    report: PushReport
    if PUSH_READS_HEADERS:
        report = push_files(servers.local, target, study.paths, associations=associations)
    else:
        report = push_items(servers.local, target, study.items, associations=associations)
    elapsed = time.perf_counter() - start
    if report.failed:
        raise RuntimeError(f"push: {len(report.failed)} failed, first: {report.failed[0]}")
    _expect("push report", len(report.stored), study.count)
    _expect("research Orthanc", research.count_instances(study.study_uid), study.count)
    return elapsed


def pull_movescu(servers: Servers, study: StudySet) -> float:
    scp = servers.storescp
    assert scp.output_dir is not None
    _fresh(scp.output_dir)
    keys = {"StudyInstanceUID": study.study_uid}
    elapsed = _timed(
        lambda: movescu(servers.staging.dicom_port, scp.aet, keys, called_aet=STAGING_AET)
    )
    _expect("storescp (C-MOVE)", len(scp.received()), study.count)
    return elapsed


def pull_ours(servers: Servers, study: StudySet, landing_dir: Path) -> float:
    staging = StagingSettings(ae_title=STAGING_AET, host=LOOPBACK, port=servers.staging.dicom_port)
    start = time.perf_counter()
    result = pull_study(servers.local, staging, servers.registry, study.study_uid, landing_dir)
    sync_folder(landing_dir)
    elapsed = time.perf_counter() - start
    if result.status != "complete":
        raise RuntimeError(f"pull: {result.status}: {result.detail}")
    _expect("anonpipe SCP (pull)", result.landed, study.count)
    shutil.rmtree(landing_dir)
    return elapsed


def cases(servers: Servers, study: StudySet, work: Path) -> dict[str, Callable[[], float]]:
    """Case name -> one timed, verified run; pairs are adjacent so they alternate."""
    land = work / "landing"
    return {
        PAIRS[0].reference: lambda: receive_storescp(servers.storescp, study, 1),
        PAIRS[0].ours: lambda: receive_ours(servers, study, 1, land / "recv1"),
        PAIRS[1].reference: lambda: receive_storescp(servers.forking, study, SENDERS),
        PAIRS[1].ours: lambda: receive_ours(servers, study, SENDERS, land / "recv4"),
        PAIRS[2].reference: lambda: send_storescu(servers.research, study, 1),
        PAIRS[2].ours: lambda: send_ours(servers, study, 1),
        PAIRS[3].reference: lambda: send_storescu(servers.research, study, SENDERS),
        PAIRS[3].ours: lambda: send_ours(servers, study, SENDERS),
        PAIRS[4].reference: lambda: pull_movescu(servers, study),
        PAIRS[4].ours: lambda: pull_ours(servers, study, land / "pull"),
    }


# -- report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    pair: Pair
    ref_s: float
    ours_s: float
    files: int

    @property
    def ratio(self) -> float:
        return self.ref_s / self.ours_s


def summarize(pairs: Sequence[Pair], times: dict[str, list[float]], files: int) -> list[Row]:
    return [
        Row(p, statistics.median(times[p.reference]), statistics.median(times[p.ours]), files)
        for p in pairs
        if times.get(p.reference) and times.get(p.ours)
    ]


def print_table(rows: Sequence[Row]) -> None:
    columns = ("case", "ref s", "ref f/s", "ours s", "ours f/s", "ours/ref", "target")
    print("{:24s} {:>7s} {:>8s} {:>7s} {:>8s} {:>8s} {:>7s}".format(*columns))
    for r in rows:
        met = "met" if r.ratio >= TARGET else "MISSED"
        print(f"{r.pair.section + ' ' + r.pair.name:24s} {r.ref_s:7.2f} {r.files / r.ref_s:8.0f} "
              f"{r.ours_s:7.2f} {r.files / r.ours_s:8.0f} {r.ratio:8.2f} {met:>7s}")  # fmt: skip
    print(f"(ours/ref is throughput relative to the reference: target >= {TARGET})")
    for r in rows:
        print(f"  {r.pair.section} {r.pair.name}: ref = {r.pair.reference}; ours = {r.pair.ours}")


def _commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=False, cwd=RESULTS.parent
        )
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" with uncommitted changes" if git("status", "--porcelain") else "")


def _versions() -> str:
    import pynetdicom

    dcmtk = subprocess.run(["storescp", "--version"], capture_output=True, text=True, check=False)
    orthanc = subprocess.run(
        [shutil.which("Orthanc") or "/usr/sbin/Orthanc", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    dcmtk_version = dcmtk.stdout.split()[2].lstrip("v") if dcmtk.stdout.count(" ") > 2 else "?"
    orthanc_version = orthanc.stdout.split()[1] if orthanc.stdout else "?"
    return f"DCMTK {dcmtk_version}, Orthanc {orthanc_version}, pynetdicom {pynetdicom.__version__}"


def _fs_type(path: Path) -> str:
    done = subprocess.run(
        ["df", "--output=fstype", str(path)], capture_output=True, text=True, check=False
    )
    return done.stdout.split()[-1] if done.returncode == 0 else "?"


def _wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, width=100, break_long_words=False, break_on_hyphens=False)


def record(rows: Sequence[Row], study: StudySet, rounds: int, seconds: float, notes: str) -> None:
    """Append a dated section with the table (same layout as the de-identification one)."""
    met = [r for r in rows if r.ratio >= TARGET]
    missed = ", ".join(
        f"{r.pair.section} {r.pair.name}: {r.ratio:.2f}{X}" for r in rows if r not in met
    )
    missed = f" (missed: {missed})" if missed else ""
    lines = [
        "",
        "## Network throughput (`bench/net_throughput.py`)",
        "",
        f"{datetime.date.today().isoformat()}, commit {_commit()}.",
        f"`python -m bench.net_throughput --files {study.count} --rounds {rounds}`: "
        f"{study.count:,} generated CT objects, 512{X}512{X}16 bit, explicit VR little endian, "
        f"{study.size / 1e6:.0f} MB, one study in {len(study.series_dirs)} series; loopback, "
        f"{_versions()}; every DCMTK tool and Orthanc with `TCP_NODELAY=1`; all files on "
        f"{_fs_type(study.root)} (our SCP renames each object into place and the landing folder "
        f"is synced once per receive or pull, `sync_folder`, timed; `storescp` does not sync); "
        f"median of {rounds} round(s), whole bench {seconds:.0f} s.",
        "",
        "| case | reference | files/s | anonpipe | files/s | ours/ref |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.pair.section}, {r.pair.name} | {r.pair.reference} | {r.files / r.ref_s:.0f} "
            f"| {r.pair.ours} | {r.files / r.ours_s:.0f} | **{r.ratio:.2f}** |"
        )
    lines += [
        "",
        f"Target: ours ≥ {TARGET}{X} the reference's files/s: met in {len(met)} of {len(rows)} "
        f"cases{missed}.",
    ]
    for paragraph in notes.split("\n\n") if notes else []:
        lines += ["", paragraph]
    lines = [line if line.startswith("|") else _wrap(line) for line in lines]
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    print(f"recorded in {RESULTS}")


def push_sweep(
    servers: Servers, study: StudySet, counts: Sequence[int], rounds: int
) -> list[tuple[int, float, float]]:
    """Median seconds of the reference and of ours for each number of associations, alternating;
    printed as a table. Returns (associations, reference s, ours s) per count."""
    times: dict[tuple[str, int], list[float]] = {}
    for round_ in range(rounds):
        for n in counts:
            for who in ("ref", "ours"):
                os.sync()
                if who == "ref":
                    elapsed = send_storescu(servers.research, study, n)
                else:
                    elapsed = send_ours(servers, study, n)
                times.setdefault((who, n), []).append(elapsed)
                print(f"round {round_ + 1} push sweep {who:4s} {n} association(s) {elapsed:7.2f} s "
                      f"{study.count / elapsed:6.0f} files/s", flush=True)  # fmt: skip
    rows = [
        (n, statistics.median(times[("ref", n)]), statistics.median(times[("ours", n)]))
        for n in counts
    ]
    print(f"\npush sweep, {study.count} files, median of {rounds} round(s)")
    print(f"{'associations':>12s} {'storescu f/s':>12s} {'ours f/s':>9s} {'ours/ref':>8s}")
    for n, ref_s, ours_s in rows:
        print(f"{n:12d} {study.count / ref_s:12.0f} {study.count / ours_s:9.0f} "
              f"{ref_s / ours_s:8.2f}")  # fmt: skip
    return rows


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--files",
        type=int,
        default=1000,
        help="CT objects (512x512x16), rounded up to a multiple of 4",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip", action="append", default=[], choices=SECTIONS)
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the work folder in place")
    parser.add_argument("--record", action="store_true", help="append results to RESULTS.md")
    parser.add_argument(
        "--note", default="", help="text for the recorded section (blank lines: paragraphs)"
    )
    parser.add_argument(
        "--push-files", action="store_true", help="time push_files (reads headers), not push_items"
    )
    parser.add_argument(
        "--push-sweep",
        default="",
        help="comma-separated numbers of push associations to time afterwards, e.g. 1,2,4",
    )
    args = parser.parse_args()
    global PUSH_READS_HEADERS
    PUSH_READS_HEADERS = args.push_files
    sweep = [int(n) for n in args.push_sweep.split(",") if n.strip()]

    configure_logging("warning")
    began = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="net-bench-", dir="/var/tmp"))
    # Everything temporary stays in the work folder: our SCP spools into work/spool (on the
    # landing filesystem, so landing is a rename), the harness's logs and anything else in tmp.
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)
    try:
        study = make_study(work / "in", args.files)
        print(f"{study.count} files, {study.size / 1e6:.0f} MB in {work}")
        pairs = [p for p in PAIRS if p.section not in args.skip]
        times: dict[str, list[float]] = {}
        with ExitStack() as stack:
            servers = start_servers(stack, work)
            if "pull" not in args.skip:
                load_staging(servers, study)
            runs = cases(servers, study, work)
            for round_ in range(args.rounds):
                for pair in pairs:
                    for name in (pair.reference, pair.ours):
                        os.sync()  # no run pays for the write-back of the previous one's files
                        elapsed = runs[name]()
                        times.setdefault(name, []).append(elapsed)
                        print(f"round {round_ + 1} {name:44s} {elapsed:7.2f} s "
                              f"{study.count / elapsed:6.0f} files/s", flush=True)  # fmt: skip
            if sweep:
                push_sweep(servers, study, sweep, args.rounds)
        rows = summarize(pairs, times, study.count)
        seconds = time.perf_counter() - began
        print(f"\n{study.count} files, median of {args.rounds} round(s), {seconds:.0f} s in all")
        print_table(rows)
        if args.record:
            record(rows, study, args.rounds, seconds, args.note)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
