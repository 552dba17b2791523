"""The daemon as systemd runs it: a subprocess with NOTIFY_SOCKET, signals, kill -9 and resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from anonpipe import ctl
from anonpipe.config import load_settings
from anonpipe.daemon.rundir import RunDir
from tests.harness.daemon import Daemon, make_site, query_state, run_state
from tests.harness.deployment import Site, StudyPlan
from tests.harness.mutants import DEEP_NESTING_KINDS, mutate
from tests.harness.orthanc import OrthancFactory, OrthancServer
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.studygen import ALL_TRANSFER_SYNTAXES, SOP_CLASS_BY_MODALITY
from tests.harness.tmpfs import small_tmpfs

pytestmark = pytest.mark.timeout(300)


def test_daemon_notifies_systemd_serves_control_and_stops_cleanly(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, StudyPlan())
    daemon = Daemon(site, short_dir)
    try:
        daemon.wait_for(
            lambda: any("READY=1" in m for m in daemon.read_notifications()), what="READY=1"
        )
        ready = next(m for m in daemon.messages if "READY=1" in m)
        assert "STATUS=" in ready
        daemon.wait_for(lambda: run_state(site) == "done", what="the run to finish")
        assert len(site.research.instances()) == site.expected_instances()

        status = ctl.request(site.socket_path, "status", {})
        assert status["run"]["state"] == "done" and status["scp"]["listening"]
        assert status["peers"]["research"]["ok"] and status["peers"]["staging"]["ok"]
        blob = json.dumps(status)
        for uid in site.approved_uids + site.held_uids:
            assert uid not in blob  # review ids and counts only: no original UIDs on the socket
        assert [h["study"] for h in status["held"]] == [
            site.review.find_study(uid).id for uid in site.held_uids
        ]
        steps = {row["step"] for row in status["studies"]}
        assert steps <= {"published", "held", "failed-reported"}
        assert ctl.main(["--socket", str(site.socket_path), "status"]) == 0
        assert ctl.main(["--socket", str(site.socket_path), "echo", "research"]) == 0
        assert ctl.request(site.socket_path, "pause", {}).startswith("paused")
        assert ctl.request(site.socket_path, "status", {})["state"] == "paused"
        assert ctl.request(site.socket_path, "resume", {}) == "resumed"
        runs = ctl.request(site.socket_path, "runs", {})
        shown = ctl.request(site.socket_path, "show", {"run": runs[0]["name"]})
        assert shown["overview"][0].startswith("Starting at")
        time.sleep(2.5)  # at least one watchdog interval (WATCHDOG_USEC=2 s → ping every 1 s)
    finally:
        code = daemon.terminate()
    assert code == 0 and daemon.leftovers is False  # workers and forkserver gone too
    assert any("WATCHDOG=1" in m for m in daemon.messages)
    # STATUS= on every state change of the run.
    for phase in ("pulling", "checking", "hooking", "pushing", "writing_back", "done"):
        assert any(
            m.startswith("STATUS=running run_at_") and m.endswith(f": {phase}")
            for m in daemon.messages
        ), phase
    assert any("STOPPING=1" in m for m in daemon.messages)
    assert not site.socket_path.exists()


#: Four studies of 240 small objects: long enough to interrupt each step.
_INTERRUPTIBLE = StudyPlan(
    approved=3,
    approved_with_protocol=1,
    series_per_study=2,
    instances_per_series=120,  # a pull of ~1 s: long enough for a SIGTERM to land inside it
    size=(64, 64),
)
_PER_STUDY = _INTERRUPTIBLE.series_per_study * _INTERRUPTIBLE.instances_per_series


def _kill_and_resume(
    orthanc_factory: OrthancFactory,
    root: Path,
    sockets: Path,
    moment: Callable[[Site], bool],
    what: str,
) -> Site:
    site = make_site(orthanc_factory, root, sockets, _INTERRUPTIBLE)
    first = Daemon(site, sockets)
    first.wait_for(lambda: moment(site), what=what, timeout=180)
    first.kill()
    assert run_state(site) != "done", f"the run finished before the kill ({what})"
    _resume(site, sockets)
    return site


def _terminate_at(site: Site, sockets: Path, moment: Callable[[Site], bool], what: str) -> None:
    """SIGTERM at *moment*: exit 0 within seconds, STOPPING=1, the run left ``stopped``."""
    first = Daemon(site, sockets)
    first.wait_for(lambda: moment(site), what=what, timeout=180)
    started = time.monotonic()
    assert first.terminate() == 0
    assert time.monotonic() - started < 30
    assert any("STOPPING=1" in m for m in first.messages)
    assert run_state(site) == "stopped"


def _resume(site: Site, sockets: Path) -> None:
    second = Daemon(site, sockets)
    try:
        second.wait_for(lambda: run_state(site) == "done", what="the resumed run to finish")
    finally:
        assert second.terminate() == 0


def _assert_same_as_uninterrupted(site: Site) -> None:
    assert len(site.research.studies()) == len(site.approved_uids)
    assert len(site.research.instances()) == site.expected_instances()
    for uid in site.approved_uids:
        row = site.review.find_study(uid)
        assert row.image_published and row.study_uid in site.research.study_instance_uids()
    (run,) = RunDir.list(site.data_dir)
    overview = run.read_lines("overview.txt")
    assert len(overview) == len(set(overview)) == 9, overview  # every line once
    assert run.has("done.txt")
    # One pseudonym per patient, however often the files were processed.
    with sqlite3.connect(site.root / "identity.db") as db:
        patients = db.execute("SELECT COUNT(*) FROM patient").fetchone()[0]
    assert patients == len(site.approved_uids)


def _studies_in(site: Site, state: str) -> int:
    return len(query_state(site, f"SELECT 1 FROM studies WHERE state = '{state}'"))


def _files(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.dcm")) if folder.exists() else 0


def _run_dir(site: Site) -> Path | None:
    runs = RunDir.list(site.data_dir) if site.data_dir.exists() else []
    return runs[0].path if runs else None


def test_kill_during_pull_then_resume(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    def pulling(site: Site) -> bool:
        run = _run_dir(site)
        return (
            run is not None
            and _studies_in(site, "pulling") == 1
            and _files(run / "from_staging") > 20
        )

    site = _kill_and_resume(orthanc_factory, tmp_path / "site", short_dir, pulling, "the pull")
    _assert_same_as_uninterrupted(site)


def test_kill_during_deidentification_then_resume(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    def deidentifying(site: Site) -> bool:
        run = _run_dir(site)
        past_pull = query_state(
            site, "SELECT 1 FROM studies WHERE state NOT IN ('selected', 'pulling', 'held')"
        )
        return (
            run is not None
            and len(past_pull) >= 1
            and _files(run / "to_production") > 0
            and _studies_in(site, "pulling") >= 1
        )

    site = _kill_and_resume(
        orthanc_factory, tmp_path / "site", short_dir, deidentifying, "de-identification"
    )
    _assert_same_as_uninterrupted(site)


def test_kill_during_push_then_resume(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    expected: list[int] = []

    def pushing(site: Site) -> bool:
        if not expected:
            expected.append(site.expected_instances())
        pushing = _studies_in(site, "pushing") >= 1
        return pushing and 0 < len(site.research.instances()) < expected[0]

    site = _kill_and_resume(orthanc_factory, tmp_path / "site", short_dir, pushing, "the push")
    _assert_same_as_uninterrupted(site)
    (run,) = RunDir.list(site.data_dir)
    assert "were already there" in "\n".join(run.read_lines("push_output.txt"))


def test_sigterm_during_the_push_stops_between_files_then_resumes(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    """SIGTERM does not wait for the study being pushed: the push stops between files, the run
    is left stopped, exit 0; the next start finishes it as if nothing had happened."""
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, _INTERRUPTIBLE)

    def first_push(site: Site) -> bool:
        return _studies_in(site, "pushing") >= 1 and 5 <= len(site.research.instances()) <= 40

    _terminate_at(site, short_dir, first_push, "the first study's push")
    # Stopped inside the first studies' pushes, not after them.
    assert _studies_in(site, "pushing") >= 1 and _studies_in(site, "published") == 0
    assert len(site.research.instances()) < _PER_STUDY
    _resume(site, short_dir)
    _assert_same_as_uninterrupted(site)


def test_sigterm_during_a_pull_aborts_the_move_then_resumes(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, _INTERRUPTIBLE)

    def first_pull(site: Site) -> bool:
        run = _run_dir(site)
        pulling = _studies_in(site, "pulling") >= 1
        return run is not None and pulling and 5 <= _files(run / "from_staging") <= 30

    _terminate_at(site, short_dir, first_pull, "the first study's pull")
    # Stopped inside the first studies' moves, not after them.
    states = query_state(site, "SELECT state FROM studies")
    assert _studies_in(site, "pulling") >= 1, states
    run = _run_dir(site)
    assert run is not None
    landed = [_files(folder) for folder in (run / "from_staging").iterdir()]
    assert any(n < _PER_STUDY for n in landed), landed  # a move aborted, not let finish
    assert not site.research.instances()
    _resume(site, short_dir)
    _assert_same_as_uninterrupted(site)


def _children(pid: int) -> list[int]:
    """Processes whose parent is *pid* (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _deid_workers(daemon_pid: int) -> list[int]:
    """The de-identification workers: children of the daemon's multiprocessing forkserver."""
    workers = []
    for child in _children(daemon_pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"forkserver" in cmdline:
            workers += _children(child)
    return workers


def test_a_worker_killed_during_deidentification_costs_nothing(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    """The OOM killer (here: SIGKILL) takes a de-identification worker in the middle of a
    study: the pool is rebuilt, the lost files are done again, and the run ends as if nothing
    had happened, without an operator."""
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, _INTERRUPTIBLE)
    daemon = Daemon(site, short_dir)
    try:

        def deidentifying(site: Site) -> bool:
            run = _run_dir(site)
            return run is not None and _files(run / "to_production") > 5

        daemon.wait_for(lambda: deidentifying(site), what="de-identification", timeout=180)
        workers = _deid_workers(daemon.proc.pid)
        assert workers, "no de-identification worker found"
        os.kill(workers[0], signal.SIGKILL)
        daemon.wait_for(lambda: run_state(site) == "done", what="the run to finish")
    finally:
        assert daemon.terminate() == 0
    assert "a de-identification worker died" in daemon.log_tail(100_000)
    _assert_same_as_uninterrupted(site)


def test_status_shows_the_pull_and_the_push_as_they_progress(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    """An operator asking during a long pull or push sees how far it is, not zeros."""
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, _INTERRUPTIBLE)
    daemon = Daemon(site, short_dir)
    seen: list[dict[str, object]] = []
    try:
        daemon.wait_for(lambda: site.socket_path.exists(), what="the control socket")
        deadline = time.monotonic() + 180
        while run_state(site) != "done" and time.monotonic() < deadline:
            with contextlib.suppress(ctl.ControlError):
                seen += ctl.request(site.socket_path, "status", {})["studies"]
            time.sleep(0.01)
        assert run_state(site) == "done"
    finally:
        assert daemon.terminate() == 0
    pulling = [r for r in seen if r["step"] == "pulling"]
    pushing = [r for r in seen if r["step"] == "pushing"]
    assert any(0 < r["landed"] < r["expected"] for r in pulling), pulling[-5:]  # type: ignore[operator]
    assert {r["expected"] for r in pulling if r["landed"]} <= {_PER_STUDY, _PER_STUDY + 1}
    assert any(0 < r["pushed"] < r["clean"] for r in pushing), pushing[-5:]  # type: ignore[operator]


def _malformed_copy(source: Path, dest: Path, name: str) -> Path:
    """A copy of `source` under a new SOP Instance UID, with sequences nested 40 deep and the
    patient's name at the bottom: a structure our reader refuses (deeper than MAX_NESTING)."""
    ds = dcmread(source)
    item = Dataset()
    item.PersonName = name
    for _ in range(40):
        outer = Dataset()
        outer.RequestAttributesSequence = DicomSequence([item])
        item = outer
    ds.RequestAttributesSequence = item.RequestAttributesSequence
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix="2.25.")
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_a_malformed_object_is_quarantined_and_every_other_study_delivered(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, StudyPlan(approved=2))
    manifest = site.manifests[0]
    victim = manifest.studies[0]
    bad = _malformed_copy(
        victim.instances[0].path, tmp_path / "bad.dcm", manifest.patients[0].patient_name
    )
    site.staging.upload([bad])
    config = site.config_path.read_text().replace('level = "info"', 'level = "debug"')
    site.config_path.write_text(config)
    daemon = Daemon(site, short_dir)
    try:
        daemon.wait_for(lambda: run_state(site) == "done", what="the run to finish")
        status = ctl.request(site.socket_path, "status", {})
    finally:
        assert daemon.terminate() == 0
    # Every study delivered and published, the malformed object's study included.
    assert len(site.research.studies()) == len(site.approved_uids)
    assert len(site.research.instances()) == site.expected_instances()
    for uid in site.approved_uids:
        assert site.review.find_study(uid).image_published
    # The object is quarantined with a reason that says what is wrong, and nothing else is.
    (run,) = RunDir.list(site.data_dir)
    reasons = [json.loads(p.read_text())["reason"] for p in run.quarantine.glob("*.json")]
    assert sorted(reasons) == sorted(
        ["sequences nested too deeply", *(["patient protocol series"] * len(site.protocol_uids))]
    )
    row = next(
        s
        for s in status["studies"]
        if s["study"] == site.review.find_study(victim.study_instance_uid).id
    )
    assert row["quarantined"] == 1 and row["step"] == "published"
    _assert_nothing_planted(site, status)


def _assert_nothing_planted(site: Site, status: dict[str, object]) -> None:
    """No planted identifier in the status reply, state.db or the daemon's (debug) log."""
    dump = "\n".join(
        str(r)
        for table in ("runs", "studies", "files")
        for r in query_state(site, f"SELECT * FROM {table}")
    )
    log = (site.root / "daemon.log").read_bytes()
    assert b'"level": "debug"' in log
    for m in site.manifests:
        for where, blob in (
            ("status", json.dumps(status).encode()),
            ("state.db", dump.encode()),
            ("log", log),
        ):
            assert not m.find_planted(blob, uids=False), where


def test_mutants_in_staging_are_quarantined_or_clean_and_every_study_delivered(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    """Seeded mutants of the approved studies' objects, as many as the staging PACS accepts,
    pulled with the rest by the daemon: every landed file clean without a planted identifier or
    quarantined with a reason, every study published, nothing identifying in status, state.db
    or the log."""
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, StudyPlan(approved=2))
    candidates = [
        m
        for m in mutate(site.manifests[0], tmp_path / "mutants", 56, seed=2024)
        if m.kind not in DEEP_NESTING_KINDS  # Orthanc 1.10 itself dies on those
    ]
    accepted = 0
    for mutant in candidates:
        try:
            site.staging.upload([mutant.path])
            accepted += 1
        except Exception:  # the staging PACS refused it: nothing to pull
            site.staging.studies()  # ... but it must still be up
    print(f"the staging PACS accepted {accepted} of {len(candidates)} mutants")
    assert accepted >= 10, "the staging PACS refused nearly every mutant: the test proves little"
    config = site.config_path.read_text().replace('level = "info"', 'level = "debug"')
    site.config_path.write_text(config)
    daemon = Daemon(site, short_dir)
    try:
        daemon.wait_for(lambda: run_state(site) == "done", what="the run to finish", timeout=240)
        status = ctl.request(site.socket_path, "status", {})
    finally:
        assert daemon.terminate() == 0
    for uid in site.approved_uids:
        assert site.review.find_study(uid).image_published, "a study was not delivered"
    files = query_state(site, "SELECT status, reason FROM files")
    assert {str(s) for s, _ in files} <= {"clean", "duplicate", "quarantined"}
    assert all(r for s, r in files if s == "quarantined"), "a quarantine without a reason"
    landed = query_state(
        site, "SELECT SUM(landed), SUM(clean + quarantined + duplicates) FROM studies"
    )
    assert landed[0][0] == landed[0][1] == len(files)  # nothing lost
    clean = sum(1 for s, _ in files if s == "clean")
    assert len(site.research.instances()) == clean
    assert len(files) > site.expected_instances()  # mutants did land
    for instance in site.research.instances():
        data = site.research.download(instance)
        for m in site.manifests:
            assert not m.find_planted(data, uids=True), "a planted identifier reached research"
    _assert_nothing_planted(site, status)


def test_a_second_daemon_on_the_same_data_folder_exits_2_naming_the_holder(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, StudyPlan(approved=1))
    first = Daemon(site, short_dir)
    try:
        first.wait_for(lambda: run_state(site) == "done", what="the run to finish")
        # Another control socket and port, the same data folder.
        other = tmp_path / "other.toml"
        text = site.config_path.read_text()
        port = load_settings(site.config_path, {}).local.port
        text = text.replace(f"port = {port}\n", f"port = {free_port()}\n", 1)
        text = text.replace(str(site.socket_path), str(short_dir / "other.sock"))
        other.write_text(text)
        for command in ("daemon", "run-once"):
            started = time.monotonic()
            second = subprocess.run(
                [sys.executable, "-m", "anonpipe.cli", command, "-c", str(other)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode == 2, second.stderr
            assert f"pid {first.proc.pid}" in second.stderr and str(site.data_dir) in second.stderr
            assert time.monotonic() - started < 20
        assert run_state(site) == "done"  # the first one's run is untouched
    finally:
        first.kill()  # kill -9: the kernel drops the lock, nothing to clear by hand
    again = subprocess.run(
        [sys.executable, "-m", "anonpipe.cli", "run-once", "-c", str(site.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr


def test_sigterm_during_a_push_to_a_silent_peer_stops_within_10_s(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    """The research PACS takes the C-STOREs and never answers: SIGTERM still ends the daemon in
    seconds (exit 0, run left stopped), not after the DIMSE timeout."""
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, StudyPlan(approved=1))
    release = threading.Event()

    def never_answer(_event: object) -> int:
        release.wait(120)
        return 0x0000

    silent = AE(ae_title=site.research.aet)
    silent.add_supported_context(Verification)
    for sop_class in SOP_CLASS_BY_MODALITY.values():
        silent.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = silent.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, never_answer)]
    )
    assert server is not None
    try:
        text = site.config_path.read_text().replace(
            f"port = {site.research.dicom_port}\n", f"port = {port}\n"
        )
        site.config_path.write_text(text.replace("[local]\n", "[local]\ndimse_timeout = 300\n"))
        daemon = Daemon(site, short_dir)
        try:
            daemon.wait_for(lambda: _studies_in(site, "pushing") >= 1, what="the push to start")
            time.sleep(1.0)  # the first C-STORE is waiting for its answer
            started = time.monotonic()
            assert daemon.terminate() == 0
            assert time.monotonic() - started < 10
        finally:
            if daemon.proc.poll() is None:
                daemon.kill()
        assert run_state(site) == "stopped"
    finally:
        release.set()
        server.shutdown()


def _outage_then_back(
    site: Site, sockets: Path, moment: Callable[[Site], bool], pacs: OrthancServer, what: str
) -> None:
    """Stop *pacs* at *moment* of a daemon run, see the run wait for it, start it again: the
    run then ends exactly as an uninterrupted one."""
    daemon = Daemon(site, sockets)
    try:
        daemon.wait_for(lambda: moment(site), what=what, timeout=180)
        pacs.stop(timeout=0)  # gone at once, as a crash or a cut cable
        daemon.wait_for(lambda: run_state(site) == "stopped", what="the run to wait", timeout=60)
        status = ctl.request(site.socket_path, "status", {})
        assert status["state"].startswith("waiting: waiting for the"), status["state"]
        failed = query_state(site, "SELECT reason FROM studies WHERE state = 'failed'")
        assert all("never found" in str(r) for (r,) in failed), failed  # none for the outage
        pacs.start(same_ports=True)
        daemon.wait_for(lambda: run_state(site) == "done", what="the run to resume", timeout=180)
    finally:
        assert daemon.terminate() == 0
    _assert_same_as_uninterrupted(site)


#: Large studies: a push or pull lasts long enough to lose its PACS in the middle.
_LONG = StudyPlan(approved=2, approved_with_protocol=1, instances_per_series=150, size=(32, 32))


def test_research_stopped_during_the_push_is_waited_for(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, _LONG)

    def pushing(site: Site) -> bool:
        return _studies_in(site, "pushing") == 1 and len(site.research.instances()) >= 1

    _outage_then_back(site, short_dir, pushing, site.research, "the push")


def test_staging_stopped_during_a_pull_is_waited_for(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, _LONG)

    def pulling(site: Site) -> bool:
        run = _run_dir(site)
        return run is not None and 5 <= _files(run / "from_staging") <= 100

    _outage_then_back(site, short_dir, pulling, site.staging, "the first pull")


def test_a_study_that_fails_again_is_backed_off_not_retried_every_poll(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    """The staging PACS cannot deliver (its entry for our AE title points nowhere): the study
    fails, is not written back, and waits a growing interval instead of a new run every poll
    (2 s here); status says when it is tried next."""
    plan = StudyPlan(approved=1, approved_with_protocol=0, rejected_phi=0, conflicting=0)
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, plan)
    site.staging.add_modality("anonpipe", "ANONPIPE", LOOPBACK, free_port())  # nobody there
    daemon = Daemon(site, short_dir)
    try:
        daemon.wait_for(lambda: run_state(site) == "done", what="the first run")
        time.sleep(8)  # four poll intervals
        runs = RunDir.list(site.data_dir)
        status = ctl.request(site.socket_path, "status", {})
        text = ctl.format_status(status)
    finally:
        assert daemon.terminate() == 0
    assert len(runs) == 1, [r.name for r in runs]
    (deferred,) = status["deferred"]
    assert deferred["study"] == site.review.find_study(site.approved_uids[0]).id
    assert deferred["failures"] == 1 and "undeliverable" in deferred["reason"]
    assert "deferred (failed again; tried later)" in text and "next try" in text
    row = site.review.find_study(site.approved_uids[0])
    assert not row.processing_error and not row.image_published


@pytest.fixture
def small_data_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs as the site's data folder (needs root; skipped otherwise)."""
    with small_tmpfs(tmp_path / "site" / "data", "64m") as data:
        yield data


def test_a_full_data_disk_is_a_state_the_run_waits_out(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path, small_data_disk: Path
) -> None:
    """Below the free-space floor the run stops where it is with the reason in status, the
    daemon stays up, and the run completes once space returns; nothing is failed."""
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, StudyPlan(approved=2))
    text = site.config_path.read_text().replace("min_free_mb = 0", "min_free_mb = 16")
    site.config_path.write_text(text)
    filler = small_data_disk / "filler"
    free = os.statvfs(small_data_disk).f_bavail * os.statvfs(small_data_disk).f_frsize
    filler.write_bytes(bytes(free - 8 * 2**20))  # 8 MiB left, below the 16 MiB floor
    daemon = Daemon(site, short_dir)
    try:
        daemon.wait_for(lambda: run_state(site) == "stopped", what="the run to wait for space")
        status = ctl.request(site.socket_path, "status", {})
        assert "waiting for disk space" in status["state"], status["state"]
        assert daemon.proc.poll() is None  # still up
        failed = query_state(site, "SELECT reason FROM studies WHERE state = 'failed'")
        assert all("never found" in str(r) for (r,) in failed), failed  # nothing failed for it
        filler.unlink()
        daemon.wait_for(lambda: run_state(site) == "done", what="the run to complete")
    finally:
        assert daemon.terminate() == 0
    assert len(site.research.instances()) == site.expected_instances()
    for uid in site.approved_uids:
        assert site.review.find_study(uid).image_published
