"""Shared pytest fixtures: real Orthanc servers, generated studies, review databases.

See :mod:`tests.harness` for the classes behind them; benchmarks use those classes directly.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from anonpipe import logs
from tests.harness.orthanc import OrthancFactory, OrthancServer, wait_for_stopped
from tests.harness.postgres import PostgresServer
from tests.harness.reviewdb import DEFAULT_PREFIX, ReviewDB
from tests.harness.studygen import Manifest, generate

_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember whether the test body failed, so fixtures can add diagnostics at teardown."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture(scope="session", autouse=True)
def _reap_orthanc_servers() -> Iterator[None]:
    """Wait at the end of the session for servers stopped in the background (no leaks)."""
    yield
    wait_for_stopped()


@pytest.fixture
def orthanc_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OrthancFactory]:
    """Start Orthanc servers: ``orthanc_factory(aet, modalities={...}, **options)``.

    Every server started through it is stopped at teardown, also when the test failed; then
    the tail of each server's log is printed (shown under "Captured stdout teardown"). Working
    directories stay under pytest's temporary directory for post-mortems.
    """
    factory = OrthancFactory(tmp_path_factory.mktemp("orthanc"))
    try:
        yield factory
    finally:
        if request.node.stash.get(_CALL_FAILED, False):
            for server in factory:
                print(f"----- {server!r} log tail ({server.log_path}) -----")
                print(server.log_tail())
        # Orthanc 1.10 takes ~3.5 s to exit cleanly: SIGTERM now, reap in the background.
        factory.stop_all(wait=False)


@pytest.fixture
def staging_orthanc(orthanc_factory: OrthancFactory) -> OrthancServer:
    """An empty Orthanc with AE title STAGING (peers to be added with ``add_modality``)."""
    return orthanc_factory("STAGING")


@pytest.fixture
def research_orthanc(orthanc_factory: OrthancFactory) -> OrthancServer:
    """An empty Orthanc with AE title RESEARCH."""
    return orthanc_factory("RESEARCH")


@pytest.fixture
def study_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Manifest]:
    """Generate studies: ``study_factory(**generate_kwargs) -> Manifest``.

    Each call writes to a new directory. Unless a seed is given, the seed derives from the
    test's id and the call number: reproducible, and different between calls and tests (so two
    data sets never share UIDs in one PACS).
    """
    calls = 0
    base = zlib.crc32(request.node.nodeid.encode()) * 1000

    def make(**kwargs: Any) -> Manifest:
        nonlocal calls
        calls += 1
        kwargs.setdefault("seed", base + calls)
        return generate(tmp_path_factory.mktemp("studies"), **kwargs)

    return make


@pytest.fixture
def review_db(tmp_path: Path) -> ReviewDB:
    """An empty django-dicom-review database (prefix ``dicom_staging_``) in ``tmp_path``."""
    return ReviewDB.create(tmp_path / "review.db")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (Debian ``postgresql``), started once on first use and stopped
    at the end of the session, also after failures; its folder is removed then."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def review_db_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., ReviewDB]]:
    """Empty review databases: ``review_db_factory("sqlite" | "postgresql", prefix=...)``.

    SQLite files go to ``tmp_path``; PostgreSQL databases to :func:`postgres_server` (started
    only when a test asks for one) and are dropped at teardown.
    """
    made: list[ReviewDB] = []

    def make(backend: str, prefix: str = DEFAULT_PREFIX) -> ReviewDB:
        if backend == "postgresql":
            server: PostgresServer = request.getfixturevalue("postgres_server")
            db = ReviewDB.create_postgresql(server, prefix)
        elif backend == "sqlite":
            name = "review.db" if not made else f"review-{len(made)}.db"
            db = ReviewDB.create(tmp_path / name, prefix)
        else:
            raise ValueError(f"backend must be 'sqlite' or 'postgresql', got {backend!r}")
        made.append(db)
        return db

    yield make
    for db in made:
        if db.postgresql:
            db.drop()


def _reset_logging() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == "anonpipe":
            root.removeHandler(handler)
    logging.captureWarnings(False)
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _isolate_logging() -> Iterator[None]:
    """Commands under test configure logging onto pytest's captured streams, which close after
    the test: remove that set-up so a later test does not log into a closed stream."""
    yield
    _reset_logging()


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Logging configured at debug, JSON into a buffer; restored afterwards."""
    buffer = io.StringIO()
    logs.configure_logging("debug", "json", stream=buffer, environ={})
    yield buffer
    _reset_logging()


@pytest.fixture(autouse=True)
def _restore_pynetdicom_globals() -> Iterator[None]:
    """Undo process-wide switches a test's SCP or push set (chunked transfer, unrestricted
    storage, the spool file)."""
    from pynetdicom import _config, dimse_messages

    flags = (
        _config.STORE_RECV_CHUNKED_DATASET,
        _config.STORE_SEND_CHUNKED_DATASET,
        _config.UNRESTRICTED_STORAGE_SERVICE,
    )
    spool_factory = dimse_messages.NamedTemporaryFile  # type: ignore[attr-defined]
    yield
    (
        _config.STORE_RECV_CHUNKED_DATASET,
        _config.STORE_SEND_CHUNKED_DATASET,
        _config.UNRESTRICTED_STORAGE_SERVICE,
    ) = flags
    dimse_messages.NamedTemporaryFile = spool_factory  # type: ignore[attr-defined]
