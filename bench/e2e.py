"""End to end: a whole ``anonpipe run-once`` against the old pipeline's transfer with DCMTK.

Run from the repository root (DCMTK and Orthanc installed)::

    .venv/bin/python -m bench.e2e --rounds 2 [--record]

One site is built once with :func:`tests.harness.deployment.build_site`: a staging Orthanc
holding 8 approved studies (2 series of 30 CT/MR objects each, 512x512x16 bit: 480 objects,
~250 MB), the review DB that approves them, an empty research Orthanc and the anonpipe.toml.
Each round then times, in turn and after ``sync``:

- reference: for each approved study ``movescu`` (study level) into a DCMTK ``storescp`` writing
  files, then one ``storescu`` of the received folder into the research Orthanc: the transfer of
  the old pipeline, without de-identification;
- ours: ``python -m anonpipe.cli run-once -c anonpipe.toml`` as a subprocess: select from the
  review DB, C-FIND + C-MOVE each study into our SCP with de-identification overlapping, protocol
  check, hook, C-STORE, C-FIND verification, review DB write-back; exit.

Before each run the research Orthanc is emptied; before ours the review DB is restored to its
snapshot and anonpipe's data folder and identity store are removed, so every run of ours is a
first run. After each run the research Orthanc must hold exactly the expected number of
instances (a bench that loses files fails). Our run logs at info in JSON; its ``pull finished``,
``push finished`` and ``push verified`` lines give where our time goes, phase by phase. CPU time
is counted too: the DCMTK tools' and ours (run-once and its worker processes), and the two
Orthancs' in each run.

Printed: median seconds of each, the ratio ours/reference (target <= 1.3), objects and MB.
``--record`` appends a dated section to bench/RESULTS.md; ``--note`` adds paragraphs to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
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

from bench.net_throughput import _commit, _fresh, _fs_type, _versions, _wrap
from tests.harness.dcmtk import StoreSCP, movescu, storescu
from tests.harness.deployment import Site, StudyPlan, build_site
from tests.harness.orthanc import OrthancServer
from tests.harness.ports import LOOPBACK
from tests.harness.studygen import BENCH

RESULTS = Path(__file__).with_name("RESULTS.md")
TARGET = 1.3  # ours / reference, wall time
X = "\u00d7"  # the multiplication sign, as RESULTS.md writes it
STORESCP_AET = "STORESCP"
STAGING_AET = "STAGING"
RESEARCH_AET = "RESEARCH"


@dataclass(frozen=True)
class Bench:
    """The built site and what each run starts from."""

    site: Site
    storescp: StoreSCP
    review_snapshot: Path
    objects: int
    size: int


# -- set-up -----------------------------------------------------------------------------------


def set_up(stack: ExitStack, work: Path, plan: StudyPlan, push_associations: int = 0) -> Bench:
    """Start both Orthancs and ``storescp``, build the site, snapshot the review DB.

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
        config = site.config_path.read_text(encoding="utf-8")
        config = config.replace(
            "[research]\n", f"[research]\npush_associations = {push_associations}\n"
        )
        site.config_path.write_text(config, encoding="utf-8")
    storescp = stack.enter_context(StoreSCP(work / "storescp", aet=STORESCP_AET))
    staging.add_modality("storescp", STORESCP_AET, LOOPBACK, storescp.port)
    snapshot = work / "review.db.snapshot"
    shutil.copyfile(site.review.path, snapshot)
    objects = site.expected_instances()
    _expect("staging Orthanc", len(staging.instances()), objects)
    size = sum(path.stat().st_size for m in site.manifests for path in m.paths)
    return Bench(site, storescp, snapshot, objects, size)


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


# -- the two runs -----------------------------------------------------------------------------


@dataclass
class RefRun:
    """One timed reference transfer: wall seconds (in all, and its C-MOVE part) and CPU."""

    seconds: float
    move_seconds: float
    cpu: float  # the DCMTK tools and storescp
    orthanc_cpu: float


@dataclass
class OurRun:
    """One timed ``run-once``: wall seconds, CPU and its log events."""

    seconds: float
    launched: float  # time.time() at launch, to place the log's timestamps
    ended: float
    cpu: float  # run-once and every process it started
    orthanc_cpu: float
    events: list[dict[str, object]] = field(default_factory=list)


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
    _expect("research Orthanc (reference)", len(site.research.instances()), b.objects)
    return RefRun(elapsed, moved - start, cpu, orthanc_cpu)


def reset_ours(b: Bench) -> None:
    """Every run a first run: research, data folder, identity store emptied; review DB as built."""
    site = b.site
    site.research.delete_all()
    shutil.rmtree(site.data_dir, ignore_errors=True)
    site.data_dir.mkdir()
    for suffix in ("", "-wal", "-shm"):
        (site.root / f"identity.db{suffix}").unlink(missing_ok=True)
    shutil.copyfile(b.review_snapshot, site.review.path)


def run_ours(b: Bench, log_path: Path) -> OurRun:
    """``anonpipe run-once`` as a subprocess; its JSON log (info) goes to *log_path*."""
    site = b.site
    reset_ours(b)
    os.sync()
    argv = [sys.executable, "-m", "anonpipe.cli", "run-once", "-c", str(site.config_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    orthancs = _orthanc_cpu(site)
    with log_path.open("wb") as log:
        launched = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        meter = TreeCpu(proc.pid)
        returncode = proc.wait()
        elapsed = time.perf_counter() - start
        ended = time.time()
        cpu = meter.stop()
    orthanc_cpu = _orthanc_cpu(site) - orthancs
    if returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"anonpipe run-once exited {returncode}:\n{tail}")
    _expect("research Orthanc (ours)", len(site.research.instances()), b.objects)
    studies = len(site.research.studies())
    _expect("research Orthanc studies (ours)", studies, len(site.approved_uids))
    return OurRun(elapsed, launched, ended, cpu, orthanc_cpu, _events(log_path))


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
    ("select", "review DB selection, run directory, worker pool start"),
    ("pull", "per study C-FIND + C-MOVE into our SCP (de-identification overlapping)"),
    (
        "after pull",
        "per study: de-identification not hidden by the pull, `sync`, state writes; once: "
        "protocol check, hook",
    ),
    ("push", "per study C-STORE to research (`push_files`)"),
    ("verify", "per study C-FIND count after its push"),
    ("between pushes", "per study research C-FIND for instances already there, state writes"),
    ("write-back", "review DB write-back, run directory"),
    ("exit", "SCP stop, worker and interpreter exit"),
)
PULL_PHASES = ("pull", "after pull")  # what the reference's movescu part compares with
PUSH_PHASES = ("push", "verify", "between pushes")  # ... and its storescu part


def _ts(event: dict[str, object]) -> float:
    stamp = str(event["timestamp"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


def phases(run: OurRun) -> dict[str, float]:
    """Seconds per phase from the log: each study's pull and push are logged with durations."""

    def stamps(name: str) -> list[dict[str, object]]:
        return [e for e in run.events if e.get("event") == name]

    pulls, pushes = stamps("pull finished"), stamps("push finished")
    verified, done = stamps("push verified"), stamps("run done")
    listening = stamps("storage scp listening")
    if not (pulls and pushes and listening and done) or len(verified) != len(pushes):
        return {}
    pull_spans = [(_ts(e) - float(str(e["seconds"])), _ts(e)) for e in pulls]
    push_spans = [(_ts(e) - float(str(e["seconds"])), _ts(e)) for e in pushes]
    checked = [_ts(e) for e in verified]
    # The last study's tail of de-identification shares its gap with the protocol check, the hook
    # and the first research C-FIND (none of them logged; the site has no hook): "after pull".
    gaps = [pull_spans[i + 1][0] - pull_spans[i][1] for i in range(len(pull_spans) - 1)]
    return {
        "start-up": _ts(listening[0]) - run.launched,
        "select": pull_spans[0][0] - _ts(listening[0]),
        "pull": sum(end - start for start, end in pull_spans),
        "after pull": sum(gaps) + push_spans[0][0] - pull_spans[-1][1],
        "push": sum(end - start for start, end in push_spans),
        "verify": sum(c - end for c, (_s, end) in zip(checked, push_spans, strict=True)),
        "between pushes": sum(
            push_spans[i + 1][0] - checked[i] for i in range(len(push_spans) - 1)
        ),
        "write-back": _ts(done[0]) - checked[-1],
        "exit": run.ended - _ts(done[0]),
    }


# -- report -----------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass(frozen=True)
class Result:
    reference: list[RefRun]
    ours: list[OurRun]
    objects: int
    size: int
    studies: int

    @property
    def ref_s(self) -> float:
        return _median([r.seconds for r in self.reference])

    @property
    def ours_s(self) -> float:
        return _median([r.seconds for r in self.ours])

    @property
    def ratio(self) -> float:
        return self.ours_s / self.ref_s

    @property
    def ref_move_s(self) -> float:
        return _median([r.move_seconds for r in self.reference])

    @property
    def phases(self) -> dict[str, float]:
        """Ours, phase by phase, median over the rounds (empty if a log lacked a line)."""
        split = [s for s in (phases(r) for r in self.ours) if s]
        if not split:
            return {}
        return {name: _median([s[name] for s in split]) for name, _ in PHASES}

    def cpu(self) -> tuple[float, float, float, float]:
        """Median CPU seconds: reference tools, reference Orthancs, ours, ours' Orthancs."""
        return (
            _median([r.cpu for r in self.reference]),
            _median([r.orthanc_cpu for r in self.reference]),
            _median([r.cpu for r in self.ours]),
            _median([r.orthanc_cpu for r in self.ours]),
        )


def print_result(r: Result) -> None:
    met = "met" if r.ratio <= TARGET else "MISSED"
    ref_cpu, ref_orthanc, ours_cpu, ours_orthanc = r.cpu()
    print(f"{r.studies} studies, {r.objects} objects, {r.size / 1e6:.0f} MB, "
          f"median of {len(r.ours)} round(s)")  # fmt: skip
    print(f"{'transfer':22s} {'seconds':>8s} {'objects/s':>10s} {'MB/s':>6s} "
          f"{'CPU s':>6s} {'Orthanc CPU s':>14s}")  # fmt: skip
    for name, seconds, cpu, orthanc in (
        ("reference (DCMTK)", r.ref_s, ref_cpu, ref_orthanc),
        ("anonpipe run-once", r.ours_s, ours_cpu, ours_orthanc),
    ):
        print(f"{name:22s} {seconds:8.2f} {r.objects / seconds:10.0f} "
              f"{r.size / 1e6 / seconds:6.0f} {cpu:6.2f} {orthanc:14.2f}")  # fmt: skip
    print(f"ours / reference: {r.ratio:.2f} (target <= {TARGET}: {met})")
    print(f"reference: movescu {r.ref_move_s:.2f} s, storescu {r.ref_s - r.ref_move_s:.2f} s")
    split = r.phases
    if split:
        print("\nwhere our time goes (from the run's log):")
        for name, what in PHASES:
            seconds = split[name]
            print(f"  {name:15s} {seconds:6.2f} s {100 * seconds / r.ours_s:4.0f} %  {what}")


def record(
    r: Result, args: argparse.Namespace, plan: StudyPlan, seconds: float, work: Path
) -> None:
    """Append a dated section to RESULTS.md."""
    met = r.ratio <= TARGET
    ref_cpu, ref_orthanc, ours_cpu, ours_orthanc = r.cpu()
    associations = (
        f"`push_associations = {args.push_associations}`"
        if args.push_associations
        else "one push association"
    )
    ref_move, ref_store = r.ref_move_s, r.ref_s - r.ref_move_s
    lines = [
        "",
        "## End to end (`bench/e2e.py`)",
        "",
        f"{datetime.date.today().isoformat()}, commit {_commit()}; machine: 2 cores.",
        f"`python -m bench.e2e {' '.join(_options(args))}`: {r.studies} approved studies of "
        f"{plan.series_per_study} series {X} {plan.instances_per_series} generated CT/MR objects, "
        f"512{X}512{X}16 bit, explicit VR little endian: {r.objects} objects, "
        f"{r.size / 1e6:.0f} MB, in a staging Orthanc and approved in a review DB "
        f"(`tests/harness/deployment.py`); loopback, {_versions()}; every DCMTK tool and Orthanc "
        f"with `TCP_NODELAY=1`; all files on {_fs_type(work)}; the research Orthanc emptied "
        f"before every run and checked after it for exactly {r.objects} instances; our config "
        f"as the harness writes it (`jobs = 2`; {associations}); each run of ours a first run "
        f"(empty data folder and identity store); median of {args.rounds} round(s), "
        f"alternating, whole bench {seconds:.0f} s.",
        "",
        "| transfer | seconds | objects/s | MB/s | CPU s | Orthancs' CPU s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| reference: per study `movescu` → `storescp` (files), then `storescu` → research "
        f"| {r.ref_s:.2f} | {r.objects / r.ref_s:.0f} | {r.size / 1e6 / r.ref_s:.0f} "
        f"| {ref_cpu:.2f} | {ref_orthanc:.2f} |",
        f"| **anonpipe `run-once`** | **{r.ours_s:.2f}** | {r.objects / r.ours_s:.0f} "
        f"| {r.size / 1e6 / r.ours_s:.0f} | {ours_cpu:.2f} | {ours_orthanc:.2f} |",
        "",
        f"Rounds: reference {', '.join(f'{x.seconds:.2f}' for x in r.reference)} s; ours "
        f"{', '.join(f'{x.seconds:.2f}' for x in r.ours)} s. CPU: the DCMTK tools and `storescp` "
        "for the reference; `run-once`, its forkserver and de-identification workers for ours "
        "(sampled from /proc); both Orthancs for each.",
        "",
        f"Target: ours ≤ {TARGET}{X} the reference's wall time: "
        f"**{'met' if met else 'not met'} ({r.ratio:.2f}{X})**.",
        "",
        "Not the same work: ours selects from the review DB, fsyncs every landed object and its "
        "folder before answering the C-STORE, de-identifies (a process pool of 2 overlapping the "
        "pull) and syncs the outputs once per study, writes the run directory audit trail and "
        "the state store, verifies each study with a C-FIND after its push and writes back to "
        "the review DB; the reference only moves the bytes (`storescp` does not fsync) and "
        "starts no interpreter.",
    ]
    split = r.phases
    if split:
        pulled = sum(split[p] for p in PULL_PHASES)
        pushed = sum(split[p] for p in PUSH_PHASES)
        lines += [
            "",
            f"Where our {r.ours_s:.2f} s go (the `pull finished`, `push finished` and "
            "`push verified` lines of the run's JSON log, median over the rounds; the "
            f"reference's two parts: `movescu` {ref_move:.2f} s, `storescu` {ref_store:.2f} s):",
            "",
            "| phase | seconds | share | what |",
            "|---|---:|---:|---|",
        ]
        for name, what in PHASES:
            seconds = split[name]
            lines.append(f"| {name} | {seconds:.2f} | {100 * seconds / r.ours_s:.0f} % | {what} |")
        lines += [
            "",
            f"Pull with de-identification {pulled:.2f} s against `movescu` {ref_move:.2f} s "
            f"({pulled / ref_move:.1f}{X}); push with verification {pushed:.2f} s against "
            f"`storescu` {ref_store:.2f} s ({pushed / ref_store:.1f}{X}).",
        ]
    for paragraph in args.note.split("\n\n") if args.note else []:
        lines += ["", paragraph]
    lines = [line if line.startswith("|") else _wrap(line) for line in lines]
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    print(f"recorded in {RESULTS}")


def _options(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces this run (without --record, --note, --work, --keep)."""
    shown = [f"--rounds {args.rounds}"]
    defaults = {"studies": 8, "series": 2, "instances": 30, "push_associations": 0}
    for name, default in defaults.items():
        if getattr(args, name) != default:
            shown.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    return shown


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8, help="approved studies")
    parser.add_argument("--series", type=int, default=2, help="series per study")
    parser.add_argument("--instances", type=int, default=30, help="objects per series")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--push-associations",
        type=int,
        default=0,
        help="set [research] push_associations in our config (default: as the harness writes it)",
    )
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the work folder in place")
    parser.add_argument("--record", action="store_true", help="append results to RESULTS.md")
    parser.add_argument(
        "--note", default="", help="text for the recorded section (blank lines: paragraphs)"
    )
    args = parser.parse_args()

    plan = StudyPlan(
        approved=args.studies,
        approved_with_protocol=0,
        rejected_phi=0,
        conflicting=0,
        missing_from_staging=0,
        series_per_study=args.series,
        instances_per_series=args.instances,
        size=BENCH,
    )
    began = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="e2e-bench-", dir="/var/tmp"))
    if (work / "site").exists():
        raise SystemExit(f"{work / 'site'} exists: give a new or empty --work folder")
    # Everything temporary stays in the work folder (the harness's logs, storescp's output).
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)
    try:
        with ExitStack() as stack:
            b = set_up(stack, work, plan, args.push_associations)
            print(f"{len(b.site.approved_uids)} studies, {b.objects} objects, "
                  f"{b.size / 1e6:.0f} MB in {work} (set-up {time.perf_counter() - began:.0f} s)",
                  flush=True)  # fmt: skip
            reference: list[RefRun] = []
            ours: list[OurRun] = []
            for round_ in range(args.rounds):
                reference.append(run_reference(b))
                print(f"round {round_ + 1} reference {reference[-1].seconds:7.2f} s", flush=True)
                ours.append(run_ours(b, work / f"anonpipe-{round_ + 1}.log"))
                print(f"round {round_ + 1} anonpipe  {ours[-1].seconds:7.2f} s", flush=True)
            result = Result(reference, ours, b.objects, b.size, len(b.site.approved_uids))
        seconds = time.perf_counter() - began
        print(f"\nwhole bench {seconds:.0f} s")
        print_result(result)
        if args.record:
            record(result, args, plan, seconds, work)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
