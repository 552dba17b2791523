"""Scaling: how the resident daemon's cost grows with the work, from poll to done.

Run from the repository root (DCMTK and Orthanc installed)::

    .venv/bin/python -m bench.scale [--quick] [--cases study,multiframe,cores] [--record]

Every case runs the whole daemon as :mod:`bench.e2e` does (``anonpipe daemon`` started before
the clock on an empty data folder and identity store, idle; the reviews inserted; the clock from
the ``poll`` request on the control socket until the run is ``done``) against a staging and a
research Orthanc of its own (stopped after the case), and samples /proc every 0.2 s for the
daemon's process group (the daemon, multiprocessing's forkserver and resource tracker, the
de-identification workers): peak RSS of the daemon, and RSS and PSS summed over the group.

- ``study``: one approved study of 5,000 CT/MR objects (2 series of 2,500, 256x256x16 bit,
  explicit VR little endian, identifiers planted as :func:`tests.harness.studygen.generate`
  plants them), stored in staging with ``storescu``. Target: peak RSS summed < 300 MB.
- ``multiframe``: one approved study holding one uncompressed Enhanced CT object of 4,096
  frames of 512x512x16 bit (2 GiB of pixel data, 2.0 GiB file, functional groups per frame,
  the same planted identifiers; written by :func:`tests.harness.studygen.generate_multiframe`
  without holding it in memory), stored in staging with ``storescu`` (Orthanc's REST upload
  would hold it in our memory; Orthanc's ``MaximumStorageSize`` is 0, unlimited, in the
  harness). Target: peak RSS summed < 300 MB.
- ``cores``: the e2e corpus (8 studies x 2 series x 60 objects, 256x256), the daemon started
  under ``taskset -c 0`` and under ``taskset -c 0,1``: the daemon and everything it forks (the
  affinity is inherited; the bench checks each member's ``Cpus_allowed_list``) are pinned, the
  Orthancs and the bench itself are not (alike in both). ``jobs = 2`` in both (the harness's
  config). Rounds alternate 1 core, 2 cores. Target: 2 cores >= 1.7x the throughput of 1 core.

``--quick``: 1,000 objects, a 256 MiB object (512 frames), the cores case with 8 x 2 x 30 objects
and one round. ``--record`` appends a dated section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.e2e import (
    MB,
    QUIET_POLL_INTERVAL,
    RESEARCH_AET,
    STAGING_AET,
    Corpus,
    OurRun,
    _expect,
    _ts,
    configure,
    isolate_tmp,
    load_note,
    make_plan,
    run_daemon,
    snapshot_reviews,
    stop_on_signals,
)
from bench.net_throughput import _commit, _fs_type, _versions, _wrap
from tests.harness.dcmtk import storescu
from tests.harness.deployment import Site, StudyPlan, build_site, build_site_from
from tests.harness.orthanc import OrthancServer
from tests.harness.studygen import BENCH, BENCH_SMALL, Manifest, generate, generate_multiframe

RESULTS = Path(__file__).with_name("RESULTS.md")
X = "\u00d7"
RSS_TARGET = 300 * MB  # bytes, the daemon and its workers summed
CORES_TARGET = 1.7  # throughput on 2 cores / on 1 core
CASES = ("study", "multiframe", "cores")


@dataclass
class CaseResult:
    """One case: what it ran on and its runs (for ``cores``: the 1-core and 2-core runs)."""

    name: str
    corpus: str
    objects: int
    size: int
    setup_seconds: float
    runs: dict[str, list[OurRun]] = field(default_factory=dict)
    error: str = ""  # why the case stopped, with the daemon's log tail


def _servers(stack: ExitStack, work: Path) -> tuple[OrthancServer, OrthancServer]:
    """A staging and a research Orthanc that wait 10 minutes for a slow peer (2 GiB objects)."""
    staging = stack.enter_context(
        OrthancServer(STAGING_AET, workdir=work / "orthanc-staging", dicom_scu_timeout=600)
    )
    research = stack.enter_context(
        OrthancServer(RESEARCH_AET, workdir=work / "orthanc-research", dicom_scu_timeout=600)
    )
    return staging, research


def _sockets(stack: ExitStack) -> Path:
    # The control socket path must stay short (108 bytes): keep it out of the work folder.
    sockets = Path(tempfile.mkdtemp(prefix="scale-", dir="/tmp"))
    stack.callback(shutil.rmtree, sockets, ignore_errors=True)
    return sockets / "control.sock"


def _corpus(site: Site, work: Path) -> Corpus:
    configure(site, review={"poll_interval": QUIET_POLL_INTERVAL})
    approved, pending = snapshot_reviews(site, work)
    objects = site.expected_instances()
    _expect("staging Orthanc", int(site.staging.statistics()["CountInstances"]), objects)
    size = sum(path.stat().st_size for m in site.manifests for path in m.paths)
    return Corpus(site, approved, pending, objects, size)


def _storescu_upload(staging: OrthancServer, folder: Path) -> Callable[[Iterable[Path]], object]:
    """Store the generated folder in staging with ``storescu`` (no file is held in memory)."""

    def upload(_paths: Iterable[Path]) -> object:
        return storescu(staging.dicom_port, [folder], called_aet=STAGING_AET, timeout=3600)

    return upload


def generated_site(
    stack: ExitStack, work: Path, make: Callable[[Path], Manifest]
) -> tuple[Corpus, float]:
    began = time.perf_counter()
    staging, research = _servers(stack, work)
    manifest = make(work / "generated")
    site, _port = build_site_from(
        work / "site",
        staging,
        research,
        [manifest],
        upload=_storescu_upload(staging, manifest.root),
        socket_path=_sockets(stack),
    )
    return _corpus(site, work), time.perf_counter() - began


def plan_site(stack: ExitStack, work: Path, plan: StudyPlan) -> tuple[Corpus, float]:
    began = time.perf_counter()
    staging, research = _servers(stack, work)
    site, _port = build_site(work / "site", staging, research, plan, socket_path=_sockets(stack))
    return _corpus(site, work), time.perf_counter() - began


def _describe(corpus: Corpus) -> str:
    series = corpus.site.manifests[0].series[0]
    frames = ""
    if series.sop_class_uid.endswith(".2.1"):  # Enhanced CT
        frames = " multi-frame"
    return (
        f"{corpus.objects} object(s){frames}, {series.size.rows}{X}{series.size.columns}, "
        f"{corpus.size / MB:,.0f} MB in {len(corpus.site.approved_uids)} stud(y/ies)"
    )


def _progress(case: str, label: str, run: OurRun, objects: int) -> None:
    print(
        f"  {case} {label}: {run.seconds:.2f} s, {objects / run.seconds:.1f} objects/s, "
        f"peak RSS daemon {run.peak_root_rss / MB:.0f} MB, group {run.peak_rss / MB:.0f} MB "
        f"(PSS {run.peak_pss / MB:.0f} MB, {run.processes} processes)",
        flush=True,
    )


def run_case(name: str, work: Path, quick: bool, rounds: int) -> CaseResult:
    """Set one case up, run it, stop its servers."""
    with ExitStack() as stack:
        if name == "study":
            count = 1000 if quick else 5000
            corpus, setup = generated_site(
                stack,
                work,
                lambda out: generate(
                    out,
                    patients=1,
                    series_per_study=2,
                    instances_per_series=count // 2,
                    size=BENCH_SMALL,
                    seed=4200,
                ),
            )
        elif name == "multiframe":
            frames = 512 if quick else 4096
            corpus, setup = generated_site(
                stack,
                work,
                lambda out: generate_multiframe(out, frames=frames, size=BENCH, seed=4300),
            )
        else:
            plan = make_plan("issue12", instances=30 if quick else 0)
            corpus, setup = plan_site(stack, work, plan)
        result = CaseResult(name, _describe(corpus), corpus.objects, corpus.size, setup)
        print(f"{name}: {result.corpus} (set-up {setup:.0f} s)", flush=True)
        try:
            _run_rounds(name, corpus, work, rounds, result)
        except RuntimeError as exc:  # a failed run: say so, go on with the other cases
            result.error = str(exc)
            print(f"  {name} FAILED: {exc}", flush=True)
        return result


def _cpu_list(text: str) -> set[int]:
    """``0,2-3`` (taskset's and /proc's syntax) as {0, 2, 3}."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _run_rounds(name: str, corpus: Corpus, work: Path, rounds: int, result: CaseResult) -> None:
    if name != "cores":
        for n in range(rounds):
            run = run_daemon(corpus, work / f"daemon-{n + 1}.log", timeout=3600)
            result.runs.setdefault("daemon", []).append(run)
            _progress(name, f"round {n + 1}", run, corpus.objects)
        return
    for n in range(rounds):
        for label, cpus in (("1 core", "0"), ("2 cores", "0,1")):
            log = work / f"daemon-{cpus.replace(',', '')}-{n + 1}.log"
            run = run_daemon(corpus, log, cpus=cpus, timeout=3600)
            allowed = {frozenset(_cpu_list(v)) for v in run.affinity.values()}
            if allowed != {frozenset(_cpu_list(cpus))}:
                raise RuntimeError(f"{label}: the group's CPUs were {run.affinity}")
            result.runs.setdefault(label, []).append(run)
            _progress(name, f"round {n + 1} {label}", run, corpus.objects)


# -- report -----------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _peak(runs: Sequence[OurRun], attr: str) -> float:
    return float(max(getattr(r, attr) for r in runs))


def summary_rows(results: Sequence[CaseResult]) -> list[list[str]]:
    rows = []
    for case in results:
        for label, runs in case.runs.items():
            seconds = _median([r.seconds for r in runs])
            rows.append(
                [
                    f"{case.name}" + ("" if label == "daemon" else f", {label}"),
                    case.corpus,
                    f"{seconds:.2f}",
                    f"{case.objects / seconds:.3g}",
                    f"{case.size / MB / seconds:.1f}",
                    f"{_median([r.cpu for r in runs]):.1f}",
                    f"{_peak(runs, 'idle_rss') / MB:.0f}",
                    f"{_peak(runs, 'peak_root_rss') / MB:.0f}",
                    f"{_peak(runs, 'peak_rss') / MB:.0f}",
                    f"{_peak(runs, 'peak_pss') / MB:.0f}",
                    f"{_peak(runs, 'processes'):.0f}",
                ]
            )
    return rows


HEADERS = [
    "case",
    "corpus",
    "poll → done s",
    "objects/s",
    "MB/s",
    "CPU s",
    "idle RSS MB",
    "peak RSS daemon MB",
    "peak RSS group MB",
    "peak PSS group MB",
    "processes",
]


def _phase_at(run: OurRun, after: float) -> str:
    """What the run was doing *after* seconds from the poll, from its log's pull/push lines."""
    moment = run.launched + after
    doing = []
    for event, name in (("pull finished", "pull"), ("push finished", "push")):
        for e in run.events:
            if e.get("event") == event:
                with_end = _ts(e)
                if with_end - float(str(e.get("seconds", 0))) <= moment <= with_end:
                    doing.append(name)
                    break
    return " and ".join(doing) or "neither pull nor push"


def peaks_by_activity(run: OurRun) -> dict[str, int]:
    """The group's peak summed RSS while pulls ran, while pushes ran, and otherwise."""
    spans: dict[str, list[tuple[float, float]]] = {"pull": [], "push": []}
    for event, name in (("pull finished", "pull"), ("push finished", "push")):
        for e in run.events:
            if e.get("event") == event:
                end = _ts(e)
                spans[name].append((end - float(str(e.get("seconds", 0))), end))
    peaks: dict[str, int] = {}
    for moment, _root, group in run.series:
        doing = [n for n, ss in spans.items() if any(a <= moment <= b for a, b in ss)]
        key = " and ".join(doing) or "neither"
        peaks[key] = max(peaks.get(key, 0), group)
    return peaks


def memory_notes(results: Sequence[CaseResult]) -> list[str]:
    """Per case: the peak RSS of each member role, and when the daemon peaked."""
    lines = []
    for case in results:
        for label, runs in case.runs.items():
            run = max(runs, key=lambda r: r.peak_rss)
            roles = ", ".join(
                f"{role} {rss / MB:.0f} MB" for role, rss in sorted(run.peaks.items())
            )
            name = case.name + ("" if label == "daemon" else f", {label}")
            activity = ", ".join(
                f"{key} {rss / MB:.0f} MB" for key, rss in sorted(peaks_by_activity(run).items())
            )
            lines.append(
                f"{name}: peak RSS by process ({roles}); the daemon's peak "
                f"{run.peak_root_after:.1f} s after the poll, during "
                f"{_phase_at(run, run.peak_root_after)}, of {run.seconds:.1f} s; the group's "
                f"peak summed RSS while pulling / pushing / neither: {activity}"
            )
    return lines


def verdicts(results: Sequence[CaseResult]) -> list[str]:
    lines = []
    for case in results:
        if case.error:
            first = case.error.splitlines()[0] if case.error else ""
            lines.append(f"{case.name}: FAILED ({first}); see the failure below")
        if case.name == "cores" and {"1 core", "2 cores"} <= set(case.runs):
            one = _median([r.seconds for r in case.runs["1 core"]])
            two = _median([r.seconds for r in case.runs["2 cores"]])
            ratio = one / two
            met = "met" if ratio >= CORES_TARGET else "not met"
            lines.append(
                f"cores: 2 cores give {ratio:.2f}{X} the throughput of 1 core "
                f"({case.objects / one:.1f} → {case.objects / two:.1f} objects/s; target ≥ "
                f"{CORES_TARGET}{X}: {met})"
            )
        elif "daemon" in case.runs:
            peak = _peak(case.runs["daemon"], "peak_rss")
            met = "met" if peak < RSS_TARGET else "not met"
            lines.append(
                f"{case.name}: peak RSS of the daemon and its workers summed {peak / MB:.0f} MB "
                f"(target < {RSS_TARGET / MB:.0f} MB: {met})"
            )
    return lines


def print_results(results: Sequence[CaseResult]) -> None:
    rows = summary_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows), 0) for i, h in enumerate(HEADERS)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    for line in memory_notes(results):
        print(line)
    for line in verdicts(results):
        print(line)


def record(
    results: Sequence[CaseResult], args: argparse.Namespace, seconds: float, work: Path
) -> None:
    options = ["--quick"] if args.quick else []
    if args.cases != ",".join(CASES):
        options.append(f"--cases {args.cases}")
    if args.rounds:
        options.append(f"--rounds {args.rounds}")
    affinity = next(
        (
            run.affinity
            for case in results
            for label, runs in case.runs.items()
            if label == "1 core"
            for run in runs
        ),
        {},
    )
    members = ", ".join(sorted({name.rsplit(" ", 1)[0] for name in affinity})) or "?"
    lines = [
        "",
        "## Scaling (issue 12) (`bench/scale.py`)",
        "",
        f"{args.date}, commit {_commit()}; machine: {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB.",
        f"`.venv/bin/python -m bench.scale {' '.join(options)}`".replace(" `", "`"),
        "",
        "Each case through the whole resident daemon: `anonpipe daemon` started before the clock "
        "(empty data folder and identity store, review DB without reviews, idle with both PACS "
        "echoed), the reviews inserted, the clock from the `poll` request on the control socket "
        "(what `anonpipectl poll` sends) until the run is `done` (state.db, every 50 ms), a "
        "staging and a research Orthanc of the case's own, objects stored in staging with "
        "`storescu`; the research Orthanc checked for every object afterwards. Memory: /proc "
        "of the daemon's process group sampled every 0.2 s (the daemon, multiprocessing's "
        "forkserver and resource tracker, the de-identification workers): peak RSS of the "
        "daemon process, and peak of the group's RSS summed (the target's figure; forked "
        "workers' shared pages count once per process) and of its PSS summed (shared pages "
        "split); idle RSS is the group's summed RSS just before the poll. CPU: the group's user "
        f"+ system seconds from poll to done. Loopback, {_versions()}, files on "
        f"{_fs_type(work)}; our config as the harness writes it (`jobs = 2`; the "
        "default push associations, studies in flight and parallel moves), `poll_interval` an "
        "hour.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|---|---|" + "---:|" * (len(HEADERS) - 2),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(results)]
    lines += ["", "Where the memory is (`worker`: the largest de-identification worker):", ""]
    lines += [f"- {line}" for line in memory_notes(results)]
    lines += ["", "Against the targets:", ""]
    lines += [f"- {line}" for line in verdicts(results)]
    cases = {case.name: case for case in results}
    if "cores" in cases:
        lines += [
            "",
            "Pinning (`cores`): the daemon was started as `taskset -c 0 python -m anonpipe.cli "
            "daemon` (1 core) or `taskset -c 0,1 …` (2 cores); everything it forks inherits the "
            f"affinity, checked from each member's `Cpus_allowed_list` ({members}). Not pinned, "
            "alike in both: the staging and research Orthancs and the bench. Rounds alternate; "
            "medians.",
        ]
    for paragraph in args.note.split("\n\n") if args.note else []:
        lines += ["", paragraph]
    lines = [line if line.startswith(("|", "- ")) else _wrap(line) for line in lines]
    for case in results:
        if case.error:
            tail = case.error.splitlines()[-12:]
            lines += ["", f"`{case.name}` failed; the end of the message and daemon log:", ""]
            lines += ["```", *(line[:300] for line in tail), "```"]
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    print(f"recorded in {RESULTS}")


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated, of {', '.join(CASES)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller corpora, one round")
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds per case (default 1; cores: 2, quick 1)"
    )
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the work folder in place")
    parser.add_argument("--record", action="store_true", help="append results to RESULTS.md")
    parser.add_argument("--note", default="", help="text for the recorded section")
    parser.add_argument(
        "--date", default=datetime.date.today().isoformat(), help="date of the recorded section"
    )
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    stop_on_signals()
    before = load_note()
    print(f"before: {before}", flush=True)
    began = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-bench-", dir="/var/tmp"))
    isolate_tmp(work)
    results: list[CaseResult] = []
    try:
        for name in cases:
            rounds = args.rounds or (2 if name == "cores" and not args.quick else 1)
            folder = work / name
            if folder.exists():
                raise SystemExit(f"{folder} exists: give a new or empty --work folder")
            folder.mkdir(parents=True)
            results.append(run_case(name, folder, args.quick, rounds))
            if not args.keep:  # the generated corpus and both Orthancs' storage
                shutil.rmtree(folder, ignore_errors=True)
        seconds = time.perf_counter() - began
        after = load_note()
        print(f"\nwhole bench {seconds:.0f} s; at the end: {after}")
        print_results(results)
        if args.record:
            args.note = (
                f"Whole bench {seconds:.0f} s. Machine at the start: {before}; at the end: "
                f"{after}." + (f"\n\n{args.note}" if args.note else "")
            )
            record(results, args, seconds, work)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
