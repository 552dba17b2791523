"""``anonpipe check-config`` as a pre-flight: what start-up refuses (exit 2), and ``--live``
against real peers: Orthanc servers, review databases in the django-dicom-review schema
(SQLite and PostgreSQL), identity stores made by anonpipe or not, keys that match or not, a full
data folder, a PACS that is down. Each live check is one line, OK or PROBLEM with the fix."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from anonpipe.anon.identity import IdentityStore, load_or_create_key
from anonpipe.cli import main
from tests.harness.orthanc import OrthancFactory, OrthancServer
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.reviewdb import ReviewDB

OTHER_KEY = bytes(range(32))


def _config(
    directory: Path,
    *,
    review: str,
    staging_port: int,
    research_port: int,
    extra: str = "",
    pipeline: str = "",
) -> Path:
    path = directory / "anonpipe.toml"
    path.write_text(
        f'[local]\nae_title = "ANONPIPE"\nbind = "{LOOPBACK}"\nport = {free_port()}\n'
        "min_free_mb = 1\n"
        f'[staging]\nhost = "{LOOPBACK}"\nport = {staging_port}\nconnect_timeout = 3\n'
        f'[research]\nhost = "{LOOPBACK}"\nport = {research_port}\nconnect_timeout = 3\n'
        f'[review]\ndatabase = "{review}"\n'
        f'[pipeline]\ndata_dir = "{directory / "data"}"\n{pipeline}'
        f'[anon]\nidentity_db = "{directory / "identity.db"}"\n'
        f'key_file = "{directory / "anon.key"}"\n'
        f'[control]\nsocket = "{directory / "control.sock"}"\n{extra}',
        encoding="utf-8",
    )
    return path


def _offline(directory: Path, **kwargs: str) -> Path:
    """A configuration whose PACS are nowhere (ports nobody listens on)."""
    return _config(
        directory,
        review=str(directory / "review.db"),
        staging_port=free_port(),
        research_port=free_port(),
        **kwargs,
    )


def _live(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str]]:
    """Run ``check-config --live``; the exit code and each live line by its subject."""
    code = main(["check-config", "-c", str(config), "--live"])
    out = capsys.readouterr().out
    live = out.split("# live checks\n", 1)[1].splitlines()
    lines: dict[str, str] = {}
    for line in live:
        verdict, _, rest = line.partition(" ")
        subject = rest.strip().split(":", 1)[0]
        lines[subject] = f"{verdict} {rest.strip()}"
    return code, lines


def _identity(directory: Path, key: bytes | None = None) -> None:
    """An identity.db made by anonpipe with `key` (default: the configured key file's)."""
    made_with = key if key is not None else load_or_create_key(directory / "anon.key")
    IdentityStore(directory / "identity.db", made_with).close()


# -- what start-up refuses: exit 2 ---------------------------------------------------------------


def test_an_unknown_hook_exits_2_listing_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _offline(tmp_path, pipeline='post_anon_hook = "linker"\n')
    assert main(["check-config", "-c", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"{config}: pipeline.post_anon_hook: unknown post_anon_hook")
    assert "known: default, none;" in captured.err and "entry-point group anonpipe.hooks" in (
        captured.err
    )
    assert main(["check-config", "-c", str(config), "--live"]) == 2  # before connecting


def test_a_hook_from_a_hook_file_is_known(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hook_file = tmp_path / "site.py"
    hook_file.write_text(
        "from anonpipe.hooks import registry\n"
        "@registry.register(name='link')\n"
        "def link(run_dir, overview, practice):\n"
        "    return ''\n"
    )
    pipeline = f'post_anon_hook = "link"\nhook_files = ["{hook_file}"]\n'
    assert main(["check-config", "-c", str(_offline(tmp_path, pipeline=pipeline))]) == 0
    capsys.readouterr()
    misnamed = f'post_anon_hook = "links"\nhook_files = ["{hook_file}"]\n'
    assert main(["check-config", "-c", str(_offline(tmp_path, pipeline=misnamed))]) == 2
    assert "known: default, none, link;" in capsys.readouterr().err


def test_a_hook_file_that_fails_to_load_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hook_file = tmp_path / "broken.py"
    hook_file.write_text("raise ImportError('no such module: site_linker')\n")
    pipeline = f'hook_files = ["{hook_file}"]\n'
    assert main(["check-config", "-c", str(_offline(tmp_path, pipeline=pipeline))]) == 2
    err = capsys.readouterr().err
    assert "pipeline.hook_files: cannot load hook file" in err and str(hook_file) in err


# -- live checks ----------------------------------------------------------------------------------


@pytest.fixture
def pacs(orthanc_factory: OrthancFactory) -> tuple[OrthancServer, OrthancServer]:
    """Staging and research Orthanc, started side by side."""
    return orthanc_factory("STAGING"), orthanc_factory("RESEARCH")


def test_everything_answers_every_check_ok_exit_0(
    tmp_path: Path,
    pacs: tuple[OrthancServer, OrthancServer],
    review_db: ReviewDB,
    capsys: pytest.CaptureFixture[str],
) -> None:
    staging, research = pacs
    _identity(tmp_path)
    config = _config(
        tmp_path,
        review=review_db.database,
        staging_port=staging.dicom_port,
        research_port=research.dicom_port,
    )
    code, lines = _live(config, capsys)
    assert list(lines) == [
        "review database",
        "identity store",
        "data folder",
        "staging PACS",
        "research PACS",
    ]
    assert all(line.startswith("OK ") for line in lines.values()), lines
    assert code == 0
    assert (
        f"STAGING@127.0.0.1:{staging.dicom_port}: answered C-ECHO from ANONPIPE"
        in (lines["staging PACS"])
    )
    assert "made by anonpipe, with the key in" in lines["identity store"]


def test_each_failure_is_a_problem_line_with_its_fix_exit_1(
    tmp_path: Path, orthanc_factory: OrthancFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Research down, a store another key wrote, a database of another schema, a full disk."""
    staging = orthanc_factory("STAGING")
    review = tmp_path / "other.db"
    with sqlite3.connect(review) as db:
        db.execute("CREATE TABLE auth_user (id INTEGER PRIMARY KEY)")
    _identity(tmp_path, OTHER_KEY)
    load_or_create_key(tmp_path / "anon.key")  # a new key beside the old store
    down = free_port()
    config = _config(
        tmp_path,
        review=str(review),
        staging_port=staging.dicom_port,
        research_port=down,
        extra="",
    )
    text = config.read_text().replace("min_free_mb = 1\n", "min_free_mb = 1000000000\n")
    config.write_text(text)
    code, lines = _live(config, capsys)
    assert code == 1
    assert lines["staging PACS"].startswith("OK ")
    problems = {k: v for k, v in lines.items() if v.startswith("PROBLEM ")}
    assert set(problems) == {"review database", "identity store", "data folder", "research PACS"}
    assert all(" → " in line or "restore" in line for line in problems.values()), problems
    assert "has no table dicom_staging_radiologystudy" in problems["review database"]
    assert "table_prefix" in problems["review database"].split(" → ")[1]
    assert "different pseudonym key" in problems["identity store"]
    assert "restore the key file" in problems["identity store"]
    assert "min_free_mb = 1000000000" in problems["data folder"]
    assert "clean-data" in problems["data folder"]
    assert f"RESEARCH@127.0.0.1:{down}: C-ECHO failed: no connection" in problems["research PACS"]
    assert "check [research] ae_title, host and port" in problems["research PACS"]


def test_the_review_database_unreachable_or_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    url = f"postgresql://anon@{LOOPBACK}:{port}/review"
    code, lines = _live(_offline(tmp_path), capsys)
    assert code == 1
    assert "not found" in lines["review database"]
    config = _config(tmp_path, review=url, staging_port=free_port(), research_port=free_port())
    code, lines = _live(config, capsys)
    line = lines["review database"]
    assert line.startswith(f"PROBLEM review database: review database {url}: cannot connect")
    assert "pg_hba.conf" in line and "is PostgreSQL" not in line.split(" → ")[0]


def test_a_postgresql_review_database_is_checked_ok(
    tmp_path: Path,
    review_db_factory: Callable[..., ReviewDB],
    capsys: pytest.CaptureFixture[str],
) -> None:
    review = review_db_factory("postgresql")
    config = _config(
        tmp_path, review=review.database, staging_port=free_port(), research_port=free_port()
    )
    code, lines = _live(config, capsys)
    assert code == 1  # the PACS are down
    assert lines["review database"].startswith("OK "), lines["review database"]


def test_identity_store_states(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing yet: OK (created at the first run). A key without its store: a problem (known
    patients' date offsets lost). A store without its key: a problem (restore the key)."""
    config = _offline(tmp_path)
    _, lines = _live(config, capsys)
    assert (
        lines["identity store"].startswith("OK ")
        and "created at the first run" in (lines["identity store"])
    )
    load_or_create_key(tmp_path / "anon.key")
    _, lines = _live(config, capsys)
    assert (
        lines["identity store"].startswith("PROBLEM ")
        and "identity.db from a backup" in (lines["identity store"])
    )
    (tmp_path / "anon.key").unlink()
    _identity(tmp_path, OTHER_KEY)
    _, lines = _live(config, capsys)
    assert "key file" in lines["identity store"] and "not found" in lines["identity store"]
    assert "restore the key file from a backup" in lines["identity store"]


def test_a_foreign_identity_db_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(tmp_path / "identity.db") as db:  # the old pipeline's shape
        db.execute("CREATE TABLE patient (original TEXT, cleaned TEXT)")
    config = _offline(tmp_path)
    assert main(["check-config", "-c", str(config), "--live"]) == 2
    err = capsys.readouterr().err
    assert "anon.identity_db" in err and "anonpipe import-identity" in err


def test_a_pacs_that_refuses_our_ae_title(
    tmp_path: Path,
    orthanc_factory: OrthancFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    strict = {"DicomAlwaysAllowEcho": False, "DicomCheckCalledAet": True}
    research = orthanc_factory("RESEARCH", extra_config=strict)
    config = _config(
        tmp_path,
        review=str(tmp_path / "review.db"),
        staging_port=free_port(),
        research_port=research.dicom_port,
    )
    _, lines = _live(config, capsys)
    line = lines["research PACS"]
    assert line.startswith("PROBLEM ") and "C-ECHO failed" in line, line
    assert "no connection" not in line  # it answered: the fix is to make it accept us
    assert "accepts associations from our AE title ANONPIPE" in line


# -- the daemon checks the key at start-up -------------------------------------------------------


@pytest.mark.parametrize("key_file", ["another", "absent"])
def test_the_daemon_refuses_a_key_that_did_not_make_identity_db(
    tmp_path: Path, review_db: ReviewDB, key_file: str
) -> None:
    _identity(tmp_path, OTHER_KEY)
    if key_file == "another":
        load_or_create_key(tmp_path / "anon.key")
    before = (tmp_path / "identity.db").read_bytes()
    config = _config(
        tmp_path, review=review_db.database, staging_port=free_port(), research_port=free_port()
    )
    done = subprocess.run(
        [sys.executable, "-m", "anonpipe.cli", "daemon", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "anonpipe daemon: cannot start: " in done.stderr
    assert ("different pseudonym key" if key_file == "another" else "not found") in done.stderr
    assert (tmp_path / "identity.db").read_bytes() == before
    assert not (tmp_path / "data" / "state.db").exists()  # stopped before anything opened


def test_anonymize_refuses_a_store_without_its_key_and_creates_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _identity(tmp_path, OTHER_KEY)
    (tmp_path / "src").mkdir()
    config = _offline(tmp_path)
    assert main(["anonymize", "-c", str(config), str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "key file" in capsys.readouterr().err
    assert not (tmp_path / "anon.key").exists()
