"""The service in-process: a failed run restarted by the operator, a research PACS that is down,
and a misroute that stops pulling until an operator resumes."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from anonpipe import cli
from anonpipe.config import load_settings
from anonpipe.ctl import format_status
from anonpipe.daemon.commands import Commands
from anonpipe.daemon.pipeline import PushProgress
from anonpipe.daemon.rundir import RunDir
from anonpipe.daemon.service import Service
from anonpipe.daemon.state import RunRecord
from anonpipe.daemon.states import RunState, StudyState
from anonpipe.daemon.status import (
    PeerStatus,
    ServiceState,
    StatusReport,
    StudyStatus,
    build_status,
)
from anonpipe.hooks import registry
from tests.harness.dcmtk import StoreSCP
from tests.harness.deployment import OUR_AE, Site, StudyPlan, build_site, write_config
from tests.harness.orthanc import OrthancFactory
from tests.harness.ports import LOOPBACK

pytestmark = pytest.mark.timeout(300)

SMALL = StudyPlan(
    approved=2, approved_with_protocol=0, rejected_phi=0, conflicting=1, missing_from_staging=0
)


@pytest.fixture
def site(orthanc_factory: OrthancFactory, tmp_path: Path) -> Iterator[Site]:
    socket_dir = Path(tempfile.mkdtemp(prefix="ap-", dir="/tmp"))
    built, _port = build_site(
        tmp_path / "site",
        orthanc_factory("STAGING"),
        orthanc_factory("RESEARCH"),
        SMALL,
        socket_path=socket_dir / "ctl.sock",
    )
    yield built


def _local_port(site: Site) -> int:
    return load_settings(site.config_path, {}).local.port


def test_failed_run_resumes_with_restart_run(site: Site) -> None:
    bad = site.root / "bad_hook.py"
    bad.write_text(
        "from anonpipe.hooks import registry\n\n\n"
        "def explode(run_dir, overview, practice):\n"
        "    raise RuntimeError('encounter table unreachable')\n\n\n"
        "registry.register(explode, name='explode')\n"
    )
    write_config(site, _local_port(site), post_anon_hook="explode", hook_files=[str(bad)])
    settings = load_settings(site.config_path, {})

    async def scenario() -> tuple[str | None, str | None, str]:
        service = Service(settings)
        await service.start(control=False)
        try:
            await service._cycle()
            failed = (await service.store.runs())[-1]
            assert service.pipeline is not None
            service.pipeline.hook = registry.get("default")  # the operator fixed the hook
            message = await Commands(service).restart_run({})
            await service._cycle()
            done = (await service.store.runs())[-1]
            return failed.state + ": " + (failed.error or ""), done.state, message
        finally:
            await service.stop()

    failed, done, message = asyncio.run(scenario())
    assert failed is not None and failed.startswith("failed: HookError")
    assert "encounter table unreachable" in failed
    assert "will resume" in message and done == "done"
    assert len(site.research.instances()) == site.expected_instances()
    (run,) = RunDir.list(site.data_dir)
    # The failure is in the overview once; the output is the working hook's (it used to be
    # skipped after restart-run: the failure line stood as its output).
    failures = [line for line in run.read_lines("overview.txt") if "hook failed" in line]
    assert len(failures) == 1 and "encounter table unreachable" in failures[0], failures
    output = run.read_lines("post_anon_output.txt")
    assert output and not any("failed" in line for line in output), output


def test_research_down_is_waited_out_not_written_back(site: Site) -> None:
    """An outage is not a refusal: with research down the run stops after the push's retries
    (exit 1), nothing is written back, and the same run completes once research is back."""
    site.research.stop()
    assert cli.main(["run-once", "-c", str(site.config_path)]) == 1
    for uid in site.approved_uids:
        row = site.review.find_study(uid)
        assert not row.image_published and not row.processing_error
    (run,) = RunDir.list(site.data_dir)
    push = "\n".join(run.read_lines("push_output.txt"))
    assert "waiting" in push and "no connection" in push
    assert not run.has("done.txt")
    site.research.start(same_ports=True)
    assert cli.main(["run-once", "-c", str(site.config_path)]) == 0
    assert RunDir.list(site.data_dir) == [run]  # the same run, resumed
    for uid in site.approved_uids:
        row = site.review.find_study(uid)
        assert row.image_published and not row.processing_error
    assert len(site.research.instances()) == site.expected_instances()
    overview = run.read_lines("overview.txt")
    assert len(overview) == len(set(overview))  # every line once


def test_a_research_pacs_that_aborts_our_stores_is_answered_in_seconds(site: Site) -> None:
    """Our AE title not allowed to store: Orthanc aborts at the C-STORE. The push retries with
    its backoff and the studies are written back with the reason, in seconds, not after a DIMSE
    timeout per attempt."""
    site.research.stop()
    site.research.extra_config = {"DicomAlwaysAllowStore": False}
    site.research.start(same_ports=True)
    config = site.config_path.read_text().replace("[local]\n", "[local]\ndimse_timeout = 300\n")
    site.config_path.write_text(config)
    started = time.monotonic()
    assert cli.main(["run-once", "-c", str(site.config_path)]) == 0
    assert time.monotonic() - started < 90
    for uid in site.approved_uids:
        row = site.review.find_study(uid)
        assert not row.image_published and row.processing_error
        message = row.processing_error_msg or ""
        assert message.startswith("push failed after retries") and "aborted by the peer" in message
    (run,) = RunDir.list(site.data_dir)
    assert "aborted by the peer" in "\n".join(run.read_lines("push_output.txt"))
    assert not site.research.instances()


def test_scheduler_waits_for_a_research_pacs_that_is_down(
    site: Site, log_output: io.StringIO
) -> None:
    """The daemon does not start a run it could only fail: nothing pulled, nothing written back,
    status says what it waits for; once the PACS answers, the next cycle runs."""
    settings = load_settings(site.config_path, {})
    site.research.stop()

    async def scenario() -> tuple[list[RunRecord], str, ServiceState, dict[str, PeerStatus], str]:
        service = Service(settings)
        await service.start(control=False)
        try:
            await service._cycle()
            await service._cycle()  # still down: waits again, says it once
            runs_while_down = list(await service.store.runs())
            status = await build_status(service)
            site.research.start(same_ports=True)
            await service._cycle()
            final = (await service.store.runs())[-1]
            return runs_while_down, status.state, status.service, status.peers, final.state
        finally:
            await service.stop()

    runs, state, kind, peers, final = asyncio.run(scenario())
    assert runs == []
    assert kind is ServiceState.WAITING
    assert state.startswith("waiting: research PACS RESEARCH@127.0.0.1:")
    assert "unreachable: no connection" in state
    assert state.endswith(f"(asking again every {settings.review.poll_interval:g} s)")
    assert peers["research"].ok is False and peers["staging"].ok is True
    assert peers["research"].down_since is not None and peers["research"].next_check is not None
    assert peers["staging"].down_since is None and peers["staging"].checked is not None
    assert final == "done"
    events = [json.loads(line)["event"] for line in log_output.getvalue().splitlines()]
    assert events.count("peer unreachable; no run started or resumed") == 1
    assert events.count("peers reachable again; runs go on") == 1
    assert len(site.research.instances()) == site.expected_instances()
    for uid in site.approved_uids:
        row = site.review.find_study(uid)
        assert row.image_published and not row.processing_error


def test_misroute_blocks_pulls_until_resume(site: Site, tmp_path: Path) -> None:
    settings = load_settings(site.config_path, {})

    async def scenario(wrong: StoreSCP) -> tuple[str, str | None, bool, str, bool]:
        service = Service(settings)
        await service.start(control=False)
        try:
            site.staging.add_modality("anonpipe", OUR_AE, LOOPBACK, wrong.port)
            await service._cycle()
            status = await build_status(service)
            blocked_state = status.state
            assert status.service is ServiceState.BLOCKED and status.misroute
            await service._cycle()  # does nothing while blocked
            runs = await service.store.runs()
            site.staging.add_modality("anonpipe", OUR_AE, LOOPBACK, settings.local.port)
            resumed = await Commands(service).resume({})
            await service.store.set_run_state(runs[-1].name, RunState.STOPPED)  # restart-run
            await service._cycle()
            final = (await service.store.runs())[-1]
            return blocked_state, runs[-1].error, service.paused, resumed, final.state == "done"
        finally:
            await service.stop()

    with StoreSCP(tmp_path / "elsewhere", aet=OUR_AE) as wrong:
        blocked, error, paused, resumed, done = asyncio.run(scenario(wrong))
    assert blocked == "blocked: misroute detected, pulls stopped"
    assert error is not None and error.startswith("misroute:")
    assert "misroute guard cleared" in resumed and not paused and done
    assert len(site.research.instances()) == site.expected_instances()


def _run_once(site: Site, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["run-once", "-c", str(site.config_path)])
    return code, capsys.readouterr().err


def test_start_up_problems_stop_with_a_clear_message(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _local_port(site)
    write_config(site, port, post_anon_hook="linker")
    code, err = _run_once(site, capsys)
    assert code == 2 and "unknown post_anon_hook 'linker'" in err and "default" in err

    write_config(site, port)
    site.review.path.rename(site.root / "moved.db")
    code, err = _run_once(site, capsys)
    assert code == 2 and "not found" in err and "[review] database" in err
    (site.root / "moved.db").rename(site.review.path)

    with socket.socket() as busy:
        busy.bind((LOOPBACK, port))
        busy.listen()
        code, err = _run_once(site, capsys)
    assert code == 1 and f"cannot listen on {LOOPBACK}:{port}" in err
    assert site.research.instances() == []


def test_a_pause_survives_a_restart_until_resume(site: Site) -> None:
    """``pause`` is kept in the state store: a restarted service starts paused, starts no run,
    and says since when; ``resume`` clears it for good."""
    settings = load_settings(site.config_path, {})

    async def paused_then_restarted() -> tuple[str, str | None, bool, str, list[RunRecord]]:
        first = Service(settings)
        await first.start(control=False)
        try:
            said = await Commands(first).pause({})
        finally:
            await first.stop()
        second = Service(settings)
        await second.start(control=False)
        try:
            await second._cycle()  # paused: no run starts
            status = await build_status(second)
            runs = await second.store.runs()
            resumed = await Commands(second).resume({})
            return said, status.paused_since, status.paused, status.state + " " + resumed, runs
        finally:
            await second.stop()

    said, since, paused, states, runs = asyncio.run(paused_then_restarted())
    assert said.startswith("paused") and "kept until resume" in said
    assert paused and since is not None and states == "paused resumed" and runs == []

    async def after_resume() -> tuple[bool, str | None, str]:
        third = Service(settings)
        await third.start(control=False)
        try:
            await third._cycle()
            status = await build_status(third)
            return status.paused, status.paused_since, status.run.state if status.run else ""
        finally:
            await third.stop()

    assert asyncio.run(after_resume()) == (False, None, "done")
    assert len(site.research.instances()) == site.expected_instances()


def test_status_shows_the_retries_and_last_abort_of_a_push(site: Site) -> None:
    """Research aborts our stores: while a study is in its push, status says how many times
    it was retried so far and why; once the study has failed, the reason says it and the
    push's record is gone."""
    site.research.stop()
    site.research.extra_config = {"DicomAlwaysAllowStore": False}
    site.research.start(same_ports=True)
    settings = load_settings(site.config_path, {})

    async def scenario() -> tuple[list[StudyStatus], StatusReport]:
        service = Service(settings)
        await service.start(control=False)
        seen: list[StudyStatus] = []
        try:
            cycle = asyncio.create_task(service._cycle())
            while not cycle.done():
                report = await build_status(service)
                seen += [s for s in report.studies if s.step is StudyState.PUSHING]
                await asyncio.sleep(0.02)
            await cycle
            after = await build_status(service)
            assert service.pipeline is not None and service.pipeline.pushing == {}
            return seen, after
        finally:
            await service.stop()

    seen, after = asyncio.run(scenario())
    retried = [s for s in seen if s.retries >= 1]
    assert retried, seen[-3:]
    assert all("aborted by the peer" in (s.push_error or "") for s in retried)
    assert max(s.retries for s in seen) == settings.research.retries  # every round counted
    for study in after.studies:
        if study.step is not StudyState.HELD:
            assert study.step is StudyState.FAILED_REPORTED and study.retries == 0
            assert study.reason and "aborted by the peer" in study.reason
    text = format_status(StatusReport.from_json(json.loads(json.dumps(after.to_json()))))
    assert "failed-reported" in text


def test_the_push_line_of_status(site: Site) -> None:
    """What ``anonpipectl status`` prints of a study in its push, from a real report."""
    settings = load_settings(site.config_path, {})

    async def scenario() -> str:
        service = Service(settings)
        await service.start(control=False)
        try:
            await service._cycle()
            assert service.pipeline is not None
            report = await build_status(service)
            study = next(s for s in report.studies if s.step is StudyState.PUBLISHED)
            assert study.verified == study.clean and study.cleaned_study_uid
            # As the study was during its push, after a round failed and was retried.
            progress = PushProgress()
            progress.begin(1)
            progress.failed("status 0xA700", retrying=True)
            progress.stored_one()
            service.pipeline.pushing[study.study] = progress
            await service.store.update_study(
                report.run.name if report.run else "", study.study, state=StudyState.PUSHING
            )
            return format_status(await build_status(service))
        finally:
            await service.stop()

    text = asyncio.run(scenario())
    assert "in their push:" in text
    assert ", 1 retry, last refusal or abort: status 0xA700" in text
