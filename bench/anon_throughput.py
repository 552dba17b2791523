"""De-identification throughput: plain ``cp -r``, dicognito, deid and anonpipe on one CT set.

Run from the repository root with the bench extra installed::

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python -m bench.anon_throughput --files 1000 --rounds 3

Each round runs every tool once, in turn (alternating, so drift of the machine hits all alike),
each as its own process on the same input, writing to a fresh output folder. The input is read
once beforehand so every tool starts with it in the page cache. Printed: median seconds,
files/s, MB/s, and ratios against ``cp -r`` and dicognito. Figures go to bench/RESULTS.md by hand.

``--cpu`` measures instead the CPU time (user + system, this process) that
:func:`~anonpipe.anon.deidentify.deidentify_file` spends per file, one process, on the same
input: the engine's own cost, free of process start-up and of the other tools. It is less
disturbed by other load on the machine than wall-clock times are.

Our package is byte-compiled first, as ``pip install`` does for an installed copy and had done
for dicognito and deid: a source tree run with ``PYTHONDONTWRITEBYTECODE`` set (this machine's
shells) would otherwise compile ~20 modules at every start, ~0.06 s charged to us alone.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

import anonpipe
from tests.harness.studygen import BENCH, generate

PY = sys.executable
DEID_SCRIPT = """
import os, sys
os.makedirs(sys.argv[2], exist_ok=True)
from deid.dicom import get_files, replace_identifiers
from deid.config import DeidRecipe
files = list(get_files(sys.argv[1]))
replace_identifiers(dicom_files=files, deid=DeidRecipe(), save=True, output_folder=sys.argv[2])
"""


def _tools(config: Path, jobs: int) -> dict[str, list[str]]:
    return {
        "cp -r": ["cp", "-r", "{src}", "{dest}"],
        "dicognito": [PY, "-m", "dicognito", "--quiet", "-o", "{dest}", "{src}"],
        "deid": [PY, "-c", DEID_SCRIPT, "{src}", "{dest}"],
        "anonpipe": [
            PY, "-m", "anonpipe.cli", "anonymize", "-c", str(config),
            "{src}", "{dest}", "--quarantine", "{dest}.q", "--jobs", str(jobs),
        ],
    }  # fmt: skip


def _config(work: Path) -> Path:
    config = work / "anonpipe.toml"
    config.write_text(
        f'[pipeline]\ndata_dir = "{work}/data"\n'
        f'[anon]\nidentity_db = "{work}/identity.db"\nkey_file = "{work}/anon.key"\n'
        '[logging]\nformat = "json"\nlevel = "warning"\n'
    )
    return config


def _warm(src: Path) -> int:
    total = 0
    for path in src.rglob("*"):
        if path.is_file():
            total += len(path.read_bytes())
    return total


def _cpu_per_file(src: Path, work: Path, rounds: int) -> int:
    """Print the engine's CPU milliseconds per file, best of `rounds`, in this process."""
    from anonpipe.anon.batch import Engine, EngineSpec
    from anonpipe.anon.identity import load_or_create_key

    files = sorted(src.rglob("*.dcm"))
    best = float("inf")
    for round_ in range(rounds):
        out = work / "out-cpu"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        spec = EngineSpec(
            identity_db=out / "identity.db",
            key=load_or_create_key(out / "anon.key"),
            options=("clean_descriptors",),
            dates="shift",
            allowed_modalities=("CT", "MR"),
        )
        engine = Engine(spec)
        try:
            start = time.process_time()
            for path in files:
                outcome = engine.run(path, out / "clean", out / "q", durable=False)
                if outcome.status != "clean":
                    print(f"{path}: {outcome.status} ({outcome.reason})", file=sys.stderr)
                    return 1
            per_file = (time.process_time() - start) * 1000 / len(files)
        finally:
            engine.close()
        best = min(best, per_file)
        print(f"round {round_ + 1} {per_file:6.2f} ms CPU per file")
    print(f"\n{len(files)} files, best of {rounds}: {best:.2f} ms CPU per file (one process)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="CT objects (512x512x16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip", action="append", default=[], help="tool to leave out")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--cpu", action="store_true", help="CPU per file of the engine only")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="anon-bench-"))
    src = work / "in"
    if not src.exists():
        series = max(1, args.files // 100)
        generate(src, patients=1, studies_per_patient=1, series_per_study=series,
                 instances_per_series=args.files // series, size=BENCH, modalities=("CT",),
                 transfer_syntaxes=(ExplicitVRLittleEndian,), seed=1)  # fmt: skip
    files = sum(1 for p in src.rglob("*.dcm"))
    size = _warm(src)
    if args.cpu:
        return _cpu_per_file(src, work, args.rounds)
    compileall.compile_dir(Path(anonpipe.__file__).parent, quiet=1)
    config = _config(work)
    tools = {k: v for k, v in _tools(config, args.jobs).items() if k not in args.skip}
    times: dict[str, list[float]] = {name: [] for name in tools}
    for round_ in range(args.rounds):
        for name, command in tools.items():
            dest = work / f"out-{name.replace(' ', '')}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.rmtree(f"{dest}.q", ignore_errors=True)
            for suffix in ("", "-wal", "-shm"):  # a fresh identity store every run
                (work / f"identity.db{suffix}").unlink(missing_ok=True)
            argv = [a.format(src=src, dest=dest) for a in command]
            start = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            elapsed = time.perf_counter() - start
            if done.returncode != 0:
                print(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
                return 1
            written = sum(1 for p in dest.rglob("*") if p.is_file())
            times[name].append(elapsed)
            print(f"round {round_ + 1} {name:10s} {elapsed:7.2f} s  ({written} files out)")

    print(f"\n{files} files, {size / 1e6:.0f} MB, {args.jobs} jobs, median of {args.rounds}")
    median = {name: statistics.median(t) for name, t in times.items()}
    columns = ("tool", "seconds", "files/s", "MB/s", "vs cp", "vs dicognito")
    print("{:10s} {:>8s} {:>8s} {:>7s} {:>6s} {:>12s}".format(*columns))
    for name, seconds in median.items():
        vs_cp = median["cp -r"] / seconds if "cp -r" in median else float("nan")
        vs_dg = median["dicognito"] / seconds if "dicognito" in median else float("nan")
        print(f"{name:10s} {seconds:8.2f} {files / seconds:8.0f} {size / 1e6 / seconds:7.0f} "
              f"{vs_cp:6.2f} {vs_dg:12.2f}")  # fmt: skip
    print("(ratios are throughput relative to the named tool: >1 means faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
