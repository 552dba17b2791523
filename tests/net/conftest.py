"""Fixtures for the networking tests: our Storage SCP on a free port, staging and research peers."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from anonpipe.config import LocalSettings, Peer, ResearchSettings, StagingSettings
from anonpipe.scp import LandingRegistry, StorageSCP
from tests.harness.orthanc import OrthancServer
from tests.harness.ports import LOOPBACK, free_port

OUR_AE = "ANONPIPE"


@pytest.fixture(autouse=True)
def _tmpdir_beside_landing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom streams received objects to TMPDIR; keep it on the landing filesystem."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(incoming))


@pytest.fixture
def local() -> LocalSettings:
    """Our AE on a free loopback port, short timeouts, no free-space floor."""
    return LocalSettings(
        ae_title=OUR_AE,
        bind=LOOPBACK,
        port=free_port(),
        acse_timeout=10,
        dimse_timeout=30,
        network_timeout=30,
        min_free_mb=0,
    )


@pytest.fixture
def registry() -> LandingRegistry:
    return LandingRegistry()


def start_scp(
    local: LocalSettings, registry: LandingRegistry, peers: list[Peer], **kwargs: Any
) -> StorageSCP:
    scp = StorageSCP(local, peers, registry, **kwargs)
    scp.start()
    return scp


@pytest.fixture
def scp(local: LocalSettings, registry: LandingRegistry) -> Iterator[StorageSCP]:
    """Our running SCP, accepting STAGING and STORESCU (DCMTK's default) from 127.0.0.1."""
    peers = [Peer("STAGING", LOOPBACK), Peer("STORESCU", LOOPBACK), Peer("PYSCU", LOOPBACK)]
    server = start_scp(local, registry, peers)
    yield server
    server.stop(drain_timeout=5)


@pytest.fixture
def staging(staging_orthanc: OrthancServer, local: LocalSettings) -> StagingSettings:
    """Settings for the staging Orthanc, which knows our AE title at our SCP's address."""
    staging_orthanc.add_modality("anonpipe", OUR_AE, LOOPBACK, local.port)
    return StagingSettings(
        ae_title=staging_orthanc.aet,
        host=LOOPBACK,
        port=staging_orthanc.dicom_port,
        connect_timeout=5,
    )


@pytest.fixture
def research(research_orthanc: OrthancServer) -> ResearchSettings:
    """Settings for the research Orthanc; retries without waiting."""
    return ResearchSettings(
        ae_title=research_orthanc.aet,
        host=LOOPBACK,
        port=research_orthanc.dicom_port,
        connect_timeout=5,
        retries=2,
        retry_backoff=0.0,
    )


def down_peer(settings: ResearchSettings) -> ResearchSettings:
    """The same peer on a port where nothing listens."""
    return replace(settings, port=free_port())
