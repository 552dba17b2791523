"""``anonpipectl`` against the real daemon (a subprocess, real Orthanc servers): every command's
readable and ``--json`` output and exit code, a closed pipe, a pause kept across a restart, and
no original identifier in any reply."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from anonpipe import ctl
from anonpipe.daemon.states import RunState, StudyState
from anonpipe.daemon.status import RunDetail, RunSummary, ServiceState, StatusReport
from tests.harness.daemon import Daemon, make_site, query_state, run_state
from tests.harness.deployment import Site, StudyPlan
from tests.harness.orthanc import OrthancFactory
from tests.harness.shell import shell

pytestmark = pytest.mark.timeout(300)


def _ctl(site: Site, *argv: str) -> subprocess.CompletedProcess[str]:
    """``anonpipectl -c CONFIG ARGV…`` as an operator runs it, in a shell."""
    return shell(f"anonpipectl -c {site.config_path} {' '.join(argv)}", site.root)


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert (done.returncode, done.stderr) == (ctl.EXIT_OK, ""), (done.args, done.stderr)
    return done.stdout


def _assert_no_identifier(site: Site, text: str) -> None:
    for uid in site.approved_uids + site.held_uids + site.rejected_uids:
        assert uid not in text
    for manifest in site.manifests:
        assert not manifest.find_planted(text.encode(), uids=False)


def test_every_command_reads_well_and_as_json(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, StudyPlan())
    daemon = Daemon(site, short_dir)
    try:
        daemon.wait_for(lambda: run_state(site) == "done", what="the run to finish")
        daemon.wait_for(lambda: "idle" in _ctl(site, "status").stdout, what="idle")

        text = _ok(_ctl(site, "status"))
        report = StatusReport.from_json(json.loads(_ok(_ctl(site, "status", "--json"))))
        assert report.service is ServiceState.IDLE and not report.paused
        assert report.run is not None and report.run.state is RunState.DONE
        assert text.splitlines()[0] == "state     idle"
        assert f"run       {report.run.name}: done" in text
        assert "staging   STAGING@" in text and "research  RESEARCH@" in text
        published = [s for s in report.studies if s.step is StudyState.PUBLISHED]
        assert published and all(s.cleaned_study_uid and s.verified == s.clean for s in published)
        for study in report.studies:
            assert any(
                line.split()[:2] == [str(study.study), study.step] for line in text.split("\n")
            )
        assert [r.name for r in report.runs] == [report.run.name]

        runs_text = _ok(_ctl(site, "runs"))
        runs = [RunSummary.from_json(r) for r in json.loads(_ok(_ctl(site, "runs", "--json")))]
        assert runs == [report.run]
        assert runs_text.splitlines()[1].split()[:2] == [report.run.name, "done"]

        shown_text = _ok(_ctl(site, "show", report.run.name))
        shown = RunDetail.from_json(json.loads(_ok(_ctl(site, "show", report.run.name, "--json"))))
        assert shown.studies == report.studies and shown.overview[0].startswith("Starting at")
        assert shown_text.startswith(f"run       {report.run.name}: done\n")
        assert f"  {shown.overview[0]}" in shown_text.splitlines()

        missing = _ctl(site, "show", "run_at_0")
        assert (
            missing.returncode == ctl.EXIT_FAILURE and "no run named 'run_at_0'" in missing.stderr
        )
        done = _ctl(site, "restart-run")
        assert done.returncode == ctl.EXIT_FAILURE and "is done; nothing to restart" in done.stderr

        assert _ok(_ctl(site, "echo", "research")).startswith("research: RESEARCH@")
        echoed = json.loads(_ok(_ctl(site, "echo", "staging", "--json")))
        assert echoed["ok"] is True and echoed["peer"].startswith("STAGING@")
        assert _ok(_ctl(site, "poll")) == "polling the review database now\n"
        assert json.loads(_ok(_ctl(site, "poll", "--json"))) == "polling the review database now"

        assert _ok(_ctl(site, "pause")).startswith("paused: ")
        paused = _ok(_ctl(site, "status"))
        assert paused.splitlines()[0] == "state     paused"
        assert paused.splitlines()[1].startswith("paused    since ")
        assert json.loads(_ok(_ctl(site, "resume", "--json"))) == "resumed"
        assert _ok(_ctl(site, "status")).splitlines()[0] == "state     idle"

        # A reader that closes the pipe: no traceback, anonpipectl's own exit code.
        for reader in ("head -1", "true"):
            piped = shell(f"anonpipectl -c {site.config_path} status | {reader}", site.root)
            assert (piped.returncode, piped.stderr) == (0, ""), reader
        piped = shell(f"anonpipectl -c {site.config_path} status | head -1", site.root)
        assert piped.stdout == "state     idle\n"

        everything = "\n".join(
            _ctl(site, *argv).stdout
            for argv in (["status"], ["status", "--json"], ["runs", "--json"])
        )
        _assert_no_identifier(site, everything + shown_text + json.dumps(shown.to_json()))
    finally:
        assert daemon.terminate() == 0
    gone = _ctl(site, "status")
    assert gone.returncode == ctl.EXIT_UNREACHABLE and "no control socket" in gone.stderr


def test_a_pause_is_kept_across_a_restart_until_resume(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, StudyPlan(approved=1))
    daemon = Daemon(site, short_dir)
    try:
        daemon.wait_for(lambda: run_state(site) == "done", what="the run to finish")
        _ok(_ctl(site, "pause"))
    finally:
        assert daemon.terminate() == 0
    assert query_state(site, "SELECT name, value FROM flags") == [("paused", "operator")]

    daemon = Daemon(site, short_dir)
    try:
        daemon.wait_for(lambda: site.socket_path.exists(), what="the control socket")
        daemon.wait_for(
            lambda: any("READY=1" in m for m in daemon.read_notifications()), what="READY=1"
        )
        ready = next(m for m in daemon.messages if "READY=1" in m)
        assert "STATUS=paused" in ready
        report = StatusReport.from_json(json.loads(_ok(_ctl(site, "status", "--json"))))
        assert report.service is ServiceState.PAUSED and report.paused and report.paused_since
        assert _ok(_ctl(site, "resume")) == "resumed\n"
        assert query_state(site, "SELECT name FROM flags") == []
        daemon.wait_for(lambda: "idle" in _ctl(site, "status").stdout, what="idle")
    finally:
        assert daemon.terminate() == 0

    daemon = Daemon(site, short_dir)  # resumed for good: not paused after another restart
    try:
        daemon.wait_for(lambda: site.socket_path.exists(), what="the control socket")
        daemon.wait_for(lambda: _ctl(site, "status").returncode == 0, what="an answer")
        assert not json.loads(_ok(_ctl(site, "status", "--json")))["paused"]
    finally:
        assert daemon.terminate() == 0
