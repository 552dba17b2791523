"""One-command demo of anonpipe's main job, on synthetic data and embedded defaults.

Run it as ``bash scripts/demo.sh`` (which sets up the machine first) or, once set up, as
``.venv/bin/python scripts/demo.py [--keep] [--studies N]``. In a fresh folder under /tmp it:

1. starts two local Orthanc PACS on free loopback ports: STAGING (identified) and RESEARCH;
2. generates studies and loads them into staging, and fills a SQLite review database in the
   django-dicom-review schema: approved studies (one with a "Patient Protocol" series, which
   must be quarantined), one rejected for PHI, one with conflicting reviews (held back) and one
   approved study that staging does not have (reported as failed);
3. starts ``anonpipe daemon`` and waits until its first run is done;
4. prints ``anonpipectl status``, the run's ``overview.txt``, what arrived in the research PACS
   (de-identified) and the review rows the daemon wrote back;
5. stops the daemon (SIGTERM, must exit 0) and both Orthancs, and removes the folder unless
   ``--keep`` was given.

Exit status 0 when everything worked and research holds exactly the expected clean instances,
1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# The repository root, so that tests.harness imports when this runs as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anonpipe import ctl
from tests.harness.deployment import Site, StudyPlan, build_site
from tests.harness.orthanc import OrthancServer, wait_for_stopped

RUN_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0


class DemoError(RuntimeError):
    """Something the demo expected did not happen; the message says what."""


@dataclass
class Daemon:
    """``anonpipe daemon`` as a subprocess whose output goes to a log file."""

    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path

    @classmethod
    def start(cls, config: Path, log_path: Path) -> Daemon:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # never notify a systemd supervisor of this shell
        log = log_path.open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "anonpipe.cli", "daemon", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=config.parent,
        )
        return cls(proc, log, log_path)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> int:
        """SIGTERM and wait (SIGKILL after STOP_TIMEOUT); return the exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            return self.proc.returncode
        finally:
            self.log.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")
    parser.add_argument(
        "--studies",
        type=int,
        default=4,
        metavar="N",
        help="approved studies to generate, one of them with a protocol series (default 4)",
    )
    args = parser.parse_args(argv)
    if args.studies < 1:
        parser.error("--studies must be at least 1")
    return args


def heading(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 76 - len(title)), flush=True)


@contextlib.contextmanager
def orthancs(root: Path) -> Iterator[tuple[OrthancServer, OrthancServer]]:
    """Start STAGING and RESEARCH; always stop both (in parallel) on the way out."""
    staging = OrthancServer("STAGING", workdir=root / "orthanc-staging")
    research = OrthancServer("RESEARCH", workdir=root / "orthanc-research")
    try:
        staging.start()
        research.start()
        yield staging, research
    finally:
        staging.stop(wait=False)
        research.stop(wait=False)
        wait_for_stopped()


def run_state(data_dir: Path) -> tuple[str, str, str | None] | None:
    """(state, run folder, error) of the first run in the state store, read-only; None if none."""
    path = data_dir / "state.db"
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
            row = db.execute(
                "SELECT state, path, error FROM runs ORDER BY started LIMIT 1"
            ).fetchone()
    except sqlite3.OperationalError:
        return None  # not created yet, or busy: ask again
    return None if row is None else (str(row[0]), str(row[1]), row[2])


def wait_for_run(daemon: Daemon, data_dir: Path) -> Path:
    """Wait until the daemon's first run is done; return its run folder."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise DemoError(f"the daemon exited with status {daemon.proc.returncode}")
        current = run_state(data_dir)
        if current is not None:
            state, folder, error = current
            if state == "done":
                return Path(folder)
            if state == "failed":
                raise DemoError(f"the run failed: {error}")
        time.sleep(0.2)
    raise DemoError(f"the run was not done within {RUN_TIMEOUT:.0f} s")


def show_status(socket_path: Path) -> None:
    heading("1. anonpipectl status")
    if ctl.main(["--socket", str(socket_path), "status"]) != 0:
        raise DemoError("anonpipectl status failed")


def show_overview(run_dir: Path) -> None:
    heading(f"2. {run_dir.name}/overview.txt")
    print((run_dir / "overview.txt").read_text(errors="replace").rstrip())


def describe_study(research: OrthancServer, study_id: str) -> str:
    """One line for a study stored in research, from its de-identified main DICOM tags."""
    study: dict[str, Any] = research.get_json(f"/studies/{study_id}")
    tags = study.get("MainDicomTags", {})
    patient = study.get("PatientMainDicomTags", {})
    series_ids: list[str] = study.get("Series", [])
    modalities = sorted(
        {
            str(research.get_json(f"/series/{sid}").get("MainDicomTags", {}).get("Modality", "?"))
            for sid in series_ids
        }
    )
    instances = len(research.get_json(f"/studies/{study_id}/instances"))
    return (
        f"{tags.get('StudyInstanceUID', '?')}  {len(series_ids)} series, {instances:>3} instances"
        f"  {'/'.join(modalities):<5}  PatientName={patient.get('PatientName', '')!r}"
        f"  PatientID={patient.get('PatientID', '')!r}"
    )


def show_research(site: Site) -> None:
    """Print what arrived in research and check it is exactly the expected clean instances."""
    heading("3. arrived in the research PACS (de-identified)")
    study_ids = site.research.studies()
    for study_id in study_ids:
        print(describe_study(site.research, study_id))
    arrived = len(site.research.instances())
    expected = site.expected_instances()
    print(
        f"-- {len(study_ids)} studies, {arrived} instances; expected {len(site.approved_uids)} "
        f"studies, {expected} instances (protocol series quarantined, not sent)"
    )
    if arrived != expected or len(study_ids) != len(site.approved_uids):
        raise DemoError("research does not hold exactly the expected clean studies")


def review_kind(site: Site, uid: str | None) -> str:
    for kind, uids in (
        ("protocol", site.protocol_uids),
        ("approved", site.approved_uids),
        ("rejected", site.rejected_uids),
        ("conflicting", site.held_uids),
        ("missing", site.missing_uids),
    ):
        if uid in uids:
            return kind
    return "?"


def show_review(site: Site) -> None:
    """Print the review DB's study rows as the daemon left them."""
    heading("4. review database after the run (written back by the daemon)")
    print(f"{'id':>3}  {'kind':<11} {'accession':<10} {'published':<9} {'pub_date':<19}  error")
    for row in site.review.studies():
        pub_date = row.pub_date.isoformat(sep=" ") if row.pub_date else "-"
        error = (row.processing_error_msg or "-")[:70]
        print(
            f"{row.id:>3}  {review_kind(site, row.original_study_uid):<11} "
            f"{row.accession_no:<10} {'yes' if row.image_published else 'no':<9} "
            f"{pub_date:<19}  {error}"
        )


def demo(root: Path, plan: StudyPlan) -> None:
    """Everything between starting the PACS and stopping them."""
    started = time.monotonic()
    with orthancs(root) as (staging, research):
        print(f"staging  Orthanc: DICOM {staging.dicom_port}, REST {staging.base_url}")
        print(f"research Orthanc: DICOM {research.dicom_port}, REST {research.base_url}")
        site, port = build_site(
            root / "site", staging, research, plan, socket_path=root / "ctl.sock"
        )
        print(
            f"loaded {len(staging.instances())} instances of {len(staging.studies())} studies "
            f"into staging; review DB {site.review.path}; anonpipe SCP port {port}"
        )
        print(f"set-up took {time.monotonic() - started:.1f} s; starting the daemon")
        daemon = Daemon.start(site.config_path, root / "daemon.log")
        try:
            run_started = time.monotonic()
            run_dir = wait_for_run(daemon, site.data_dir)
            print(f"the run {run_dir.name} finished in {time.monotonic() - run_started:.1f} s")
            show_status(site.socket_path)
            show_overview(run_dir)
            show_research(site)
            show_review(site)
        except BaseException:
            code = daemon.stop()
            print(f"\n--- daemon log (exit status {code}), last lines:", file=sys.stderr)
            print(daemon.log_tail(), file=sys.stderr)
            raise
        heading("stopping")
        code = daemon.stop()
        print(f"daemon stopped with SIGTERM: exit status {code}")
        if code != 0:
            raise DemoError(f"the daemon exited with status {code} on SIGTERM, expected 0")
    print(f"Orthancs stopped; total {time.monotonic() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = StudyPlan(
        approved=args.studies - 1,
        approved_with_protocol=1,
        rejected_phi=1,
        conflicting=1,
        missing_from_staging=1,
        series_per_study=2,
        instances_per_series=5,
    )
    # A short path: the control socket's path must stay under 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="anonpipe-demo-", dir="/tmp"))
    print(f"demo folder {root}")
    try:
        demo(root, plan)
    except (DemoError, OSError, RuntimeError) as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {root} (daemon.log, site/anonpipe.toml, site/data/run_at_*/)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
