"""The status pages in a real browser with JavaScript off: Debian's chromium driven by Playwright.

Playwright is told to use ``/usr/bin/chromium`` (``apt-get install chromium``; scripts/setup.sh
installs it); it never downloads a browser of its own. Screenshots of every page, during and
after the run, are kept in ``$ANONPIPE_ARTEFACTS`` (or the test's temporary folder) and their
folder is printed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.daemon import Daemon, make_site, query_state, run_state
from tests.harness.orthanc import OrthancFactory
from tests.web.site import enable_web
from tests.web.test_web_daemon import PLAN, _expected_quarantined, in_flight

pytestmark = pytest.mark.timeout(300)

CHROMIUM = Path("/usr/bin/chromium")

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def artefacts(tmp_path: Path) -> Iterator[Path]:
    """Where screenshots go: ``$ANONPIPE_ARTEFACTS/web`` if set, else the test's tmp_path."""
    root = os.environ.get("ANONPIPE_ARTEFACTS")
    folder = Path(root) / "web" if root else tmp_path / "artefacts"
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    print(f"screenshots of the status pages: {folder}")


@pytest.mark.skipif(
    not CHROMIUM.exists() or shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium)",
)
def test_pages_in_chromium_without_javascript_show_the_studies_and_counts(
    orthanc_factory: OrthancFactory, tmp_path: Path, short_dir: Path, artefacts: Path
) -> None:
    site = make_site(orthanc_factory, tmp_path / "site", short_dir, PLAN)
    base = enable_web(site)
    review_ids = [site.review.find_study(uid).id for uid in site.approved_uids]
    held = site.review.find_study(site.held_uids[0]).id
    daemon = Daemon(site, short_dir)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            context = browser.new_context(
                java_script_enabled=False, viewport={"width": 1400, "height": 900}
            )
            page = context.new_page()

            def visit(path: str, shot: str) -> str:
                response = page.goto(base + path)
                assert response is not None and response.status == 200, path
                page.screenshot(path=str(artefacts / f"{shot}.png"), full_page=True)
                return str(page.inner_text("main"))

            daemon.wait_for(lambda: in_flight(site), what="a study in flight")
            text = visit("/", "now-during")
            assert "running run_at_" in text
            studies = page.locator("main table").first
            assert studies.locator("tbody tr").count() >= len(review_ids)
            (run,) = query_state(site, "SELECT name FROM runs")
            name = str(run[0])
            for path, shot in (
                ("/runs", "runs-during"),
                (f"/runs/{name}", "run-during"),
                ("/quarantine", "quarantine-during"),
                (f"/quarantine/{name}", "quarantine-run-during"),
            ):
                visit(path, shot)

            daemon.wait_for(lambda: run_state(site) == "done", what="the run to finish")
            text = visit("/", "now")
            assert "idle" in text
            rows = page.locator("main table").first.locator("tbody tr")
            table = {
                cells[0]: cells
                for cells in (
                    rows.nth(i).locator("td").all_inner_texts() for i in range(rows.count())
                )
            }
            for review_id in review_ids:
                cells = table[str(review_id)]
                # published; landed > 0; every clean object pushed and verified
                assert cells[1] == "published", cells
                assert int(cells[3]) > 0 and cells[7] == cells[4] == cells[8], cells
            assert table[str(held)][1] == "held"
            assert page.get_by_text("reachable").count() >= 1

            text = visit("/runs", "runs")
            assert name in text and "done" in text
            # files/s, run durations, study durations by step, quarantine reasons
            assert page.locator("svg.chart").count() == 4
            assert page.locator("svg.chart title", has_text="Study durations by step").count()
            pushed = len(site.research.instances())
            text = visit(f"/runs/{name}", "run")
            assert "Starting at" in text and f"pushed\n{pushed}" in text
            assert "Study step times" in text and "writeback" in text

            quarantined = _expected_quarantined(site)
            text = visit("/quarantine", "quarantine")
            assert f"patient protocol series: {quarantined}" in text
            text = visit(f"/quarantine/{name}", "quarantine-run")
            assert f"{quarantined} quarantined files" in text
            assert page.locator("main table").nth(1).locator("tbody tr").count() == quarantined
            browser.close()
    finally:
        assert daemon.terminate() == 0
    assert (artefacts / "now.png").stat().st_size > 0
