"""The web pages and /metrics of the real daemon, during and after a run over the planted corpus.

The daemon runs as systemd runs it (:class:`tests.harness.daemon.Daemon`) against real staging
and research Orthanc servers; every page reachable from ``/`` is crawled and searched for every
identifier planted in the studies, every original UID and every accession number.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.harness.daemon import Daemon, make_site, query_state, run_state
from tests.harness.deployment import Site, StudyPlan
from tests.harness.orthanc import OrthancFactory
from tests.harness.ports import LOOPBACK
from tests.web.site import (
    Crawl,
    crawl,
    enable_web,
    fetch,
    forbidden_strings,
    listening_ports,
    metrics,
)

pytestmark = pytest.mark.timeout(300)

#: Four studies of 80 small objects (one with a protocol series, quarantined), one held back,
#: one rejected, one missing from staging: long enough to look at while it runs.
PLAN = StudyPlan(
    approved=3,
    approved_with_protocol=1,
    series_per_study=2,
    instances_per_series=40,
    size=(64, 64),
)

_IN_FLIGHT = "SELECT count(*) FROM studies WHERE state IN ('pulling', 'deidentified', 'hooked')"


def in_flight(site: Site) -> bool:
    """Whether a study of the run is past its selection and not yet in its push."""
    rows = query_state(site, _IN_FLIGHT)
    return bool(rows) and int(str(rows[0][0])) > 0


def _leaks(pages: Crawl, forbidden: set[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for url, (_status, _kind, body) in pages.pages.items():
        text = body.decode("utf-8", "replace")
        hits = sorted(token for token in forbidden if token in text)
        if hits:
            found[url] = hits[:5]
    return found


def _expected_quarantined(site: Site) -> int:
    return sum(
        len(series.instances)
        for manifest in site.manifests
        for study in manifest.studies
        if study.study_instance_uid in site.approved_uids
        for series in study.series
        if series.is_protocol
    )


def _fact(page: str, name: str) -> str:
    """The value of *name* in a page's list of facts (``<dt>name</dt><dd>value</dd>``)."""
    return page.split(f"<dt>{name}</dt><dd>", 1)[1].split("</dd>", 1)[0]


def _check_crawl(pages: Crawl, forbidden: set[str]) -> None:
    assert {"/", "/runs", "/quarantine", "/metrics"} <= pages.paths()
    assert any(p.startswith("/runs/run_at_") for p in pages.paths())
    assert any(p.startswith("/quarantine/run_at_") for p in pages.paths())
    broken = {url: status for url, (status, _k, _b) in pages.pages.items() if status != 200}
    assert not broken
    for url, (_status, kind, body) in pages.pages.items():
        if kind.startswith("text/html"):
            assert b"<script" not in body, url
    assert not _leaks(pages, forbidden)


def test_every_page_during_and_after_a_run_shows_no_identifier_and_metrics_match(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, PLAN)
    base = enable_web(site)
    forbidden = forbidden_strings(site)
    daemon = Daemon(site, short_dir)
    try:
        daemon.wait_for(lambda: in_flight(site), what="a study in flight")
        during = crawl(base)
        assert "running run_at_" in during.body("/")
        _check_crawl(during, forbidden)

        daemon.wait_for(lambda: run_state(site) == "done", what="the run to finish")
        after = crawl(base)
        _check_crawl(after, forbidden)
        now = after.body("/")
        review_ids = [site.review.find_study(uid).id for uid in site.approved_uids]
        for review_id in review_ids:
            assert f'<td class="n">{review_id}</td><td>published</td>' in now
        held = site.review.find_study(site.held_uids[0]).id
        assert "Held studies" in now and f"<td>{held}</td>" in now
        (run,) = query_state(site, "SELECT name FROM runs")
        run_page = after.body(f"/runs/{run[0]}")
        assert "Starting at" in run_page and "overview.txt" in run_page
        quarantine = after.body(f"/quarantine/{run[0]}")
        quarantined = _expected_quarantined(site)
        assert f"{quarantined} quarantined files" in quarantine
        assert "patient protocol series" in quarantine

        samples = metrics(base)
        names = " ".join(samples)
        assert not any(token in names for token in forbidden)
        for labels_by_value in samples.values():
            for labels in labels_by_value:
                assert not any(t in value for _k, value in labels for t in forbidden)

        def one(name: str, **labels: str) -> float:
            return samples[name][tuple(sorted(labels.items()))]

        assert one("anonpipe_latest_run_studies", state="published") == len(site.approved_uids)
        assert one("anonpipe_studies", state="published") == len(site.approved_uids)
        assert one("anonpipe_held_studies") == len(site.held_uids)
        assert one("anonpipe_held_study_since_timestamp_seconds", study=str(held)) > 0
        pushed = len(site.research.instances())
        assert pushed == site.expected_instances()
        assert one("anonpipe_files_total", outcome="pushed") == pushed
        assert one("anonpipe_files_total", outcome="clean") == pushed
        assert one("anonpipe_files_total", outcome="quarantined") == quarantined
        assert one("anonpipe_quarantined_files_total", reason="patient protocol series") == (
            quarantined
        )
        assert one("anonpipe_study_failures_total", failure="NEVER_FOUND", reported="true") == len(
            site.missing_uids
        )
        assert one("anonpipe_runs", state="done") == 1
        assert one("anonpipe_run_duration_seconds_count") == 1
        assert one("anonpipe_last_successful_run_timestamp_seconds") > time.time() - 600
        assert one("anonpipe_peer_up", peer="staging") == 1
        assert one("anonpipe_peer_up", peer="research") == 1
        assert one("anonpipe_scp_listening") == 1
        assert one("anonpipe_scp_objects_landed_total") == pushed + quarantined
        assert one("anonpipe_misroute_latched") == 0
        assert one("anonpipe_service_state", state="idle") == 1

        # Bytes: what was pushed is the clean outputs the research PACS holds, as written; what
        # the SCP received is what landed in the run's from_staging folder.
        (run_path,) = query_state(site, "SELECT path FROM runs")
        outputs = query_state(site, "SELECT output, size FROM files WHERE pushed = 1")
        assert len(outputs) == pushed
        on_disk = sum(Path(str(output)).stat().st_size for output, _size in outputs)
        assert [size for _output, size in outputs if size is None] == []
        assert sum(int(str(size)) for _output, size in outputs) == on_disk
        assert one("anonpipe_bytes_pushed_total") == on_disk
        landed = [f for f in (Path(str(run_path[0])) / "from_staging").rglob("*") if f.is_file()]
        assert len(landed) == pushed + quarantined
        received = sum(f.stat().st_size for f in landed)
        assert received > 0 and one("anonpipe_scp_bytes_received_total") == received
        assert one("anonpipe_scp_associations_accepted_total") >= 1
        assert _fact(run_page, "bytes pushed").endswith(f"({on_disk} bytes)")
        assert _fact(now, "bytes received").endswith(f"({received} bytes)")
        assert int(_fact(now, "associations accepted")) >= 1

        # Study times: each study at its end (published, or failed and reported) has its total;
        # each went through the steps it finished, and only those.
        published, missing = len(site.approved_uids), len(site.missing_uids)
        assert one("anonpipe_study_duration_seconds_count") == published + missing
        assert one("anonpipe_study_duration_seconds_sum") > 0

        def steps(step: str) -> float:
            return one("anonpipe_study_step_duration_seconds_count", step=step)

        # Never found: pulled (the C-MOVE found nothing), failed, reported.
        for step in ("pull", "deidentify", "writeback"):
            assert steps(step) == published + missing, step
        for step in ("hook", "push", "verify"):  # the default hook is per study
            assert steps(step) == published, step
        longest = max(
            one("anonpipe_study_step_duration_seconds_sum", step=step)
            for step in ("pull", "deidentify", "hook", "push", "verify", "writeback")
        )
        assert 0 < longest <= one("anonpipe_study_duration_seconds_sum")
        assert "<h2>Study step times</h2><table>" in run_page

        # Read-only: nothing but GET (and HEAD) is answered.
        request = f"POST / HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Length: 0\r\n\r\n"
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request.encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 405")
        status, _kind, body = fetch(base + "/runs/run_at_1")
        assert status == 404 and b"No run named" in body
        status, _kind, _body = fetch(base + "/nothing-here")
        assert status == 404
    finally:
        code = daemon.terminate()
    assert code == 0
    with pytest.raises(OSError):  # stopped with the daemon
        socket.create_connection((LOOPBACK, int(base.rsplit(":", 1)[1])), timeout=2).close()


def test_without_web_nothing_listens_but_the_storage_scp(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, StudyPlan(approved=1))
    assert "[web]" not in site.config_path.read_text()
    daemon = Daemon(site, short_dir)
    try:
        daemon.wait_for(
            lambda: any("READY=1" in m for m in daemon.read_notifications()), what="READY=1"
        )
        scp_port = int(
            next(
                line.split("=")[1]
                for line in site.config_path.read_text().splitlines()
                if line.startswith("port = ")
            )
        )
        assert listening_ports(daemon.proc.pid) == {scp_port}
    finally:
        assert daemon.terminate() == 0


def test_a_web_port_in_use_stops_start_up_naming_the_key(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, StudyPlan(approved=1))
    base = enable_web(site)
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as taken:
        taken.bind((LOOPBACK, port))
        taken.listen()
        daemon = Daemon(site, short_dir)
        code = daemon.proc.wait(60)
        daemon.close()
    log = (site.root / "daemon.log").read_text()
    assert code == 1
    assert f"web.bind: cannot listen on {LOOPBACK}:{port}" in log
    assert str(site.config_path) in log
