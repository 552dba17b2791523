"""End to end: review DB and staging Orthanc → anonpipe → research Orthanc, audit, write-back."""

from __future__ import annotations

import datetime
import hashlib
import io
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from anonpipe import cli
from anonpipe.anon.identity import IdentityStore, load_or_create_key
from anonpipe.config import load_settings
from anonpipe.daemon.rundir import RunDir
from tests.harness.deployment import OUR_AE, Site, StudyPlan, build_site, write_config
from tests.harness.logcheck import birth_dates_in, json_records, run_lines, unfollowable
from tests.harness.orthanc import OrthancFactory
from tests.harness.ports import LOOPBACK
from tests.harness.postgres import PostgresServer
from tests.harness.tls import TestPki, orthanc_tls

pytestmark = pytest.mark.timeout(300)


def _site(
    orthanc_factory: OrthancFactory, tmp_path: Path, postgres: PostgresServer | None = None
) -> Site:
    staging = orthanc_factory("STAGING")
    research = orthanc_factory("RESEARCH")
    socket_dir = Path(tempfile.mkdtemp(prefix="anonpipe-", dir="/tmp"))
    built, _port = build_site(
        tmp_path / "site",
        staging,
        research,
        socket_path=socket_dir / "control.sock",
        postgres=postgres,
    )
    return built


@pytest.fixture
def site(orthanc_factory: OrthancFactory, tmp_path: Path) -> Iterator[Site]:
    yield _site(orthanc_factory, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def site_on_each_backend(
    request: pytest.FixtureRequest, orthanc_factory: OrthancFactory, tmp_path: Path
) -> Iterator[Site]:
    """The site with its review DB on SQLite, then on the test PostgreSQL server."""
    postgres = request.getfixturevalue("postgres_server") if request.param == "postgresql" else None
    built = _site(orthanc_factory, tmp_path, postgres)
    yield built
    if built.review.postgresql:
        built.review.drop()


def _only_run(site: Site) -> RunDir:
    (run,) = RunDir.list(site.data_dir)
    return run


def test_run_once_delivers_exactly_the_approved_studies(site_on_each_backend: Site) -> None:
    site = site_on_each_backend
    assert cli.main(["run-once", "-c", str(site.config_path)]) == 0

    research = site.research
    # Exactly the approved studies arrived (as new UIDs), with every clean instance.
    assert len(research.studies()) == len(site.approved_uids)
    assert len(research.instances()) == site.expected_instances()
    for instance_id in research.instances():
        data = research.download(instance_id)
        for manifest in site.manifests:
            leaked = manifest.find_planted(data, uids=True)
            assert not leaked, f"planted identifiers reached research: {sorted(leaked)[:3]}"
        ds = dcmread(__import__("io").BytesIO(data), stop_before_pixels=True)
        assert "protocol" not in str(ds.get("SeriesDescription", "")).lower()

    # Review DB written back: approved published with the cleaned UID, others untouched.
    published_uids = set(research.study_instance_uids())
    for uid in site.approved_uids:
        row = site.review.find_study(uid)
        assert row.image_published and row.pub_date is not None
        assert row.study_uid in published_uids
        assert row.total_images and row.number_of_series and row.modality in ("CT", "MR")
    for uid in site.rejected_uids + site.held_uids:
        row = site.review.find_study(uid)
        assert not row.image_published and not row.processing_error
    for uid in site.missing_uids:
        row = site.review.find_study(uid)
        assert row.processing_error and "never found" in (row.processing_error_msg or "")

    # The audit trail, as the old pipeline wrote it.
    run = _only_run(site)
    for name in (
        "overview.txt",
        "comments.txt",
        "studies_to_retrieve.txt",
        "pull_output.txt",
        "anonymize_output.txt",
        "post_anon_output.txt",
        "push_output.txt",
        "reviewed_protocol_studies.txt",
        "found_protocol_studies.txt",
        "missing_protocol_studies.txt",
        "done.txt",
    ):
        assert run.has(name), name
    overview = run.read_lines("overview.txt")
    approved = len(site.approved_uids) + len(site.missing_uids)
    assert overview[0].startswith("Starting at ")
    assert overview[1:] == [
        f"{approved} valid reviewed studies. Please review comments.txt",
        f"{len(site.held_uids)} studies held back: their reviews conflict, see comments.txt",
        f"Received {_landed(run)} files containing {len(site.approved_uids)} studies",
        f"{len(site.missing_uids)} studies could not be pulled, see pull_output.txt",
        "1 studies marked as having a protocol series, 1 studies found with protocol series "
        "during anonymization.",
        f"{site.expected_instances()} files containing {len(site.approved_uids)} studies were "
        "successfully hooked up to an encounter.",
        overview[7],
        f"{len(site.approved_uids)} studies marked as pushed",
    ]
    assert overview[7].startswith("Push completed at ")
    assert run.read_lines("found_protocol_studies.txt") == site.protocol_uids
    assert run.read_lines("reviewed_protocol_studies.txt") == site.protocol_uids
    assert run.read_lines("missing_protocol_studies.txt") == []
    comments = "\n".join(run.read_lines("comments.txt"))
    for uid in site.held_uids:
        assert f"{uid}\tHELD BACK: reviews conflict" in comments
    quarantined = [p for p in run.quarantine.iterdir() if p.suffix == ".dcm"]
    assert len(quarantined) == len(site.protocol_uids)  # one protocol instance per study
    assert "patient protocol series" in "\n".join(run.read_lines("anonymize_output.txt"))

    # A second run finds nothing to do and changes nothing.
    before = len(research.instances())
    assert cli.main(["run-once", "-c", str(site.config_path)]) == 0
    assert len(RunDir.list(site.data_dir)) == 1 and len(research.instances()) == before


def _landed(run: RunDir) -> int:
    return sum(1 for _ in run.from_staging.rglob("*.dcm"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_practice_run_pushes_nothing_and_changes_no_database(site_on_each_backend: Site) -> None:
    site = site_on_each_backend
    review_before = site.review.fingerprint()  # the file, or every row and its version (xmin)
    identity = site.root / "identity.db"
    assert cli.main(["run-once", "-c", str(site.config_path), "--practice"]) == 0
    assert site.research.instances() == []
    assert site.review.fingerprint() == review_before
    assert not identity.exists() and not (site.root / "anon.key").exists()
    run = _only_run(site)
    assert run.has("post_anon_output_practice.txt") and not run.has("post_anon_output.txt")
    assert run.has("done.txt") and not run.has("push_output.txt")
    assert not list(run.path.glob(".practice-identity.db*"))
    assert any(run.to_production.rglob("*.dcm"))  # it did de-identify


def test_practice_run_leaves_an_existing_identity_store_untouched(site: Site) -> None:
    key = load_or_create_key(site.root / "anon.key")
    store = IdentityStore(site.root / "identity.db", key)
    known = store.patient("SOMEONE-ELSE")  # an identity.db with history
    store.commit()
    store.close()
    before = {p.name: _digest(p) for p in site.root.glob("identity.db*")}
    assert cli.main(["run-once", "-c", str(site.config_path), "--practice"]) == 0
    assert {p.name: _digest(p) for p in site.root.glob("identity.db*")} == before
    reopened = IdentityStore(site.root / "identity.db", key, readonly=True)
    assert reopened.patient("SOMEONE-ELSE") == known
    reopened.close()
    assert site.research.instances() == []


def test_no_push_stops_after_the_hook_and_max_limits_the_run(site: Site) -> None:
    review_before = _digest(site.review.path)
    assert cli.main(["run-once", "-c", str(site.config_path), "--no-push", "--max", "2"]) == 0
    assert site.research.instances() == []
    assert _digest(site.review.path) == review_before  # nothing published, nothing written back
    run = _only_run(site)
    assert len(run.read_lines("studies_to_retrieve.txt")) == 2
    assert (
        run.read_lines("overview.txt")[1] == "2 valid reviewed studies. Please review comments.txt"
    )
    assert run.has("post_anon_output.txt") and run.has("done.txt")
    assert not run.has("push_output.txt")
    assert (site.root / "identity.db").exists()  # a real run: the pseudonyms are kept


def test_reviews_written_during_a_run_neither_block_nor_get_lost(
    site_on_each_backend: Site,
) -> None:
    """The review app stays in use during a run: another connection keeps adding reviewed
    studies, second reviews of the studies in the run and edits of their impressions. None of
    its writes waits on anonpipe, none is lost or overwritten by the write-back, and the run
    delivers exactly what it would have delivered alone."""
    site = site_on_each_backend
    db = site.review
    in_run = [db.find_study(uid).id for uid in site.approved_uids]
    running = threading.Event()
    finished = threading.Event()
    added: list[int] = []
    seconds: list[float] = []
    impressions: dict[int, str] = {}

    def reviewer() -> None:
        running.wait()
        n = 0
        while not finished.is_set():
            started = time.monotonic()
            added.append(db.add_rejected_phi(f"2.25.777{n:05d}", comment=f"new {n}"))
            study = in_run[n % len(in_run)]
            db.add_review(study, user_id=100 + n, comment=f"second look {n}")
            impressions[study] = f"impression {n}"
            db.update_study(study, impression=impressions[study])
            seconds.append(time.monotonic() - started)
            n += 1
            finished.wait(0.02)  # a busy review app, not a benchmark

    thread = threading.Thread(target=reviewer)
    thread.start()
    try:
        running.set()
        assert cli.main(["run-once", "-c", str(site.config_path)]) == 0
    finally:
        finished.set()
        thread.join()

    assert len(seconds) >= 10, f"only {len(seconds)} writes during the run: no overlap to test"
    assert max(seconds) < 2.0, f"a reviewer's write waited {max(seconds):.1f} s"
    for study_id in added:  # every reviewed study the app added is there, untouched
        row = db.get_study(study_id)
        assert not row.image_published and not row.processing_error
        assert [r.has_phi for r in db.reviews(study_id)] == [True]
    for study_id, impression in impressions.items():  # the write-back kept the app's edits
        assert db.get_study(study_id).impression == impression
        assert len(db.reviews(study_id)) >= 2
    published_uids = set(site.research.study_instance_uids())
    for study_id in in_run:
        row = db.get_study(study_id)
        assert row.image_published and row.study_uid in published_uids
    assert len(site.research.studies()) == len(site.approved_uids)
    assert len(site.research.instances()) == site.expected_instances()


def test_a_whole_run_at_debug_level_logs_no_identifier_and_every_line_names_its_run(
    site: Site, capfd: pytest.CaptureFixture[str]
) -> None:
    """At debug level, as JSON: no planted identifier (names, IDs, accession numbers, original
    UIDs, birth dates) in any line; every line logged during the run, by any thread, names the
    run; every line of a study's step names its review id and the step."""
    config = site.config_path.read_text().replace('level = "info"', 'level = "debug"')
    site.config_path.write_text(config)
    assert cli.main(["run-once", "-c", str(site.config_path)]) == 0
    out, err = capfd.readouterr()
    logged = out + err
    assert '"event": "pull finished"' in logged and '"level": "debug"' in logged, (
        "the run's debug log was not captured, so the test proves nothing"
    )
    for manifest in site.manifests:
        leaked = manifest.find_planted(logged.encode(), uids=True)
        assert not leaked, f"{len(leaked)} planted identifiers or UIDs reached the log"
        births = birth_dates_in(logged, {p.birth_date for p in manifest.patients})
        assert not births, f"{len(births)} planted birth dates reached the log"
    for uid in site.missing_uids:
        assert uid not in logged

    run = _only_run(site).name
    review_ids = {site.review.find_study(uid).id for uid in site.approved_uids + site.missing_uids}
    records = run_lines(json_records(logged), run)
    assert len(records) > 100 and records[-1]["event"] == "run done"
    problems = unfollowable(records, run, review_ids)
    assert not problems, f"{len(problems)} lines cannot be followed: {problems[:5]}"
    # The lines an operator follows a study by, each with its study and step.
    for event, step in (
        ("pull finished", "pull"),
        ("push finished", "push"),
        ("push verified", "verify"),
        ("review_marked_published", "writeback"),
    ):
        lines = [r for r in records if r["event"] == event]
        assert lines and all(r.get("step") == step for r in lines), (event, lines[:1])
        assert {r["study"] for r in lines} <= review_ids
    assert {r["study"] for r in records if r["event"] == "pull finished"} == {
        site.review.find_study(uid).id for uid in site.approved_uids
    }
    # pynetdicom's own threads carry them too: the responses its DUL threads read (C-FIND and
    # C-MOVE of the pull, C-FIND of the verification), the objects our SCP's threads received.
    threaded = [r for r in records if r["logger"] == "pynetdicom.dsutils" and "study" in r]
    assert {r["step"] for r in threaded} >= {"pull", "verify"}


def test_varying_issuers_never_split_a_study_or_a_patient(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    """Issuer of Patient ID absent, reformatted or with text from object to object: the research
    PACS holds exactly the studies sent, one pseudonymous patient per patient, all published."""
    staging, research = orthanc_factory("STAGING"), orthanc_factory("RESEARCH")
    plan = StudyPlan(
        approved=2,
        approved_with_protocol=0,
        rejected_phi=0,
        conflicting=0,
        missing_from_staging=0,
        studies_per_patient=2,
        instances_per_series=4,
        issuer_variants=True,
    )
    socket_dir = Path(tempfile.mkdtemp(prefix="anonpipe-", dir="/tmp"))
    site, _ = build_site(
        tmp_path / "site", staging, research, plan, socket_path=socket_dir / "control.sock"
    )
    assert cli.main(["run-once", "-c", str(site.config_path)]) == 0

    (manifest,) = site.manifests
    assert len(site.approved_uids) == 4
    assert len(research.studies()) == 4  # no study split into per-issuer studies
    assert len(research.instances()) == site.expected_instances()
    headers = [
        dcmread(io.BytesIO(research.download(i)), stop_before_pixels=True)
        for i in research.instances()
    ]
    by_study: dict[str, set[str]] = {}
    for ds in headers:
        by_study.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.PatientID))
    assert all(len(ids) == 1 for ids in by_study.values()), by_study
    assert len({pid for ids in by_study.values() for pid in ids}) == 2  # one per patient
    for uid in site.approved_uids:
        row = site.review.find_study(uid)
        assert row.image_published and not row.processing_error

    # One date offset per patient across its studies: intervals between studies are kept.
    dates = {str(ds.StudyInstanceUID): (str(ds.PatientID), str(ds.StudyDate)) for ds in headers}
    originals = {s.study_instance_uid: s for s in manifest.studies}
    with IdentityStore(
        site.root / "identity.db", load_or_create_key(site.root / "anon.key")
    ) as ids:
        for original_uid, study in originals.items():
            cleaned_uid = ids.uid(original_uid, "studyuid")
            patient, shifted = dates[cleaned_uid]
            source = dcmread(study.instances[0].path, stop_before_pixels=True)
            offset = _days(str(source.StudyDate), shifted)
            same_patient = [
                dcmread(s.instances[0].path, stop_before_pixels=True)
                for s in manifest.studies
                if dates[ids.uid(s.study_instance_uid, "studyuid")][0] == patient
            ]
            assert len(same_patient) == 2
            for other in same_patient:
                other_shifted = dates[ids.uid(str(other.StudyInstanceUID), "studyuid")][1]
                assert _days(str(other.StudyDate), other_shifted) == offset

    # The disagreement is reported, without values.
    run = _only_run(site)
    notes = [line for line in run.read_lines("anonymize_output.txt") if "patient identity" in line]
    assert notes and all("Issuer of Patient ID" in line for line in notes)
    for line in run.read_lines("anonymize_output.txt"):
        assert not manifest.find_planted(line.encode(), uids=True)


def _days(before: str, after: str) -> int:
    def parse(text: str) -> datetime.date:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))

    return (parse(after) - parse(before)).days


def test_run_once_over_dicom_tls_everywhere(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    """Staging and research speak only DICOM TLS, and so does our SCP (the C-MOVE comes back
    over TLS): the run delivers and writes back exactly as over plain TCP."""
    pki = TestPki(tmp_path / "pki")
    ours, pacs = pki.issue("anonpipe"), pki.issue("pacs")
    tls_config = orthanc_tls(pacs, pki.ca)
    staging = orthanc_factory("STAGING", extra_config=tls_config)
    research = orthanc_factory("RESEARCH", extra_config=tls_config)
    socket_dir = Path(tempfile.mkdtemp(prefix="anonpipe-", dir="/tmp"))
    plan = StudyPlan(approved=2, approved_with_protocol=0, rejected_phi=0, conflicting=0)
    site, port = build_site(
        tmp_path / "site", staging, research, plan, socket_path=socket_dir / "control.sock"
    )
    staging.add_modality("anonpipe", OUR_AE, LOOPBACK, port, tls=True)
    identity = f'certificate = "{ours.certificate}"\nprivate_key = "{ours.private_key}"\n'
    with site.config_path.open("a", encoding="utf-8") as config:
        config.write(f'\n[local.tls]\n{identity}ca = "{pki.ca}"\n')
        for peer in ("staging", "research"):
            config.write(f'\n[{peer}.tls]\nca = "{pki.ca}"\n{identity}')

    assert cli.main(["run-once", "-c", str(site.config_path)]) == 0

    assert len(research.studies()) == len(site.approved_uids)
    assert len(research.instances()) == site.expected_instances()
    for uid in site.approved_uids:
        row = site.review.find_study(uid)
        assert row.image_published and row.study_uid in research.study_instance_uids()


def _config_with_hook(site: Site, body: str, name: str, **pipeline: object) -> None:
    hook = site.root / f"{name}.py"
    hook.write_text(body)
    port = load_settings(site.config_path, {}).local.port
    write_config(site, port, post_anon_hook=name, hook_files=[str(hook)], **pipeline)


def test_a_per_run_hook_runs_once_between_every_pull_and_every_push(site: Site) -> None:
    """The old hook contract: called once, when every study is de-identified and before any
    push (it may link them all at once)."""
    _config_with_hook(
        site,
        "from anonpipe.hooks import registry\n\n\n"
        "def census(run_dir, overview, practice):\n"
        "    studies = sorted(p.name for p in (run_dir / 'to_production').iterdir())\n"
        "    pushed = (run_dir / 'push_output.txt').exists()\n"
        "    overview.write(f'census saw {len(studies)} studies\\n')\n"
        "    return f'studies {len(studies)} pushed-before {pushed}'\n\n\n"
        "registry.register(census, name='census')\n",
        "census",
    )
    assert cli.main(["run-once", "-c", str(site.config_path)]) == 0
    run = _only_run(site)
    assert run.read_lines("post_anon_output.txt") == [
        f"studies {len(site.approved_uids)} pushed-before False"
    ]
    overview = run.read_lines("overview.txt")
    assert overview.count(f"census saw {len(site.approved_uids)} studies") == 1
    assert not any("hooked up to an encounter" in line for line in overview)
    assert len(site.research.instances()) == site.expected_instances()


def test_a_per_study_hook_lets_a_push_overlap_the_next_pull(site: Site) -> None:
    """A per-study hook is called once per study as soon as it is de-identified; studies flow
    side by side, so a later study is de-identified after an earlier one was pushed."""
    _config_with_hook(
        site,
        "from anonpipe.hooks import per_study, registry\n\n\n"
        "@per_study\n"
        "def each(study, practice):\n"
        "    pushed = (study.run_dir / 'push_output.txt').exists()\n"
        "    files = sum(1 for _ in study.folder.rglob('*.dcm'))\n"
        "    return f'{study.study_uid}\\t{study.files}\\t{files}\\tpushed-before {pushed}'\n\n\n"
        "registry.register(each, name='each')\n",
        "each",
        studies_in_flight=2,
    )
    assert cli.main(["run-once", "-c", str(site.config_path)]) == 0
    run = _only_run(site)
    lines = [line.split("\t") for line in run.read_lines("post_anon_output.txt")]
    published = {site.review.find_study(uid).study_uid for uid in site.approved_uids}
    assert {uid for uid, *_ in lines} == published  # once per study, each published
    assert all(files == on_disk for _uid, files, on_disk, _pushed in lines)
    assert any(pushed == "pushed-before True" for *_, pushed in lines), lines
    total = sum(int(files) for _uid, files, *_ in lines)
    assert (
        run.read_lines("overview.txt").count(
            f"{total} files containing {len(lines)} studies were successfully hooked up to an"
            " encounter."
        )
        == 1
    )
    assert len(site.research.instances()) == site.expected_instances()
