"""DICOM TLS: our SCP and our clients against Orthanc's DICOM TLS and DCMTK's ``+tls`` tools,
with certificates the tests make (tests/harness/tls.py). Every refusal is checked too: no
certificate, a certificate from another authority, a plain connection, TLS 1.1, a host the
certificate does not name; and a silent connection must not hold up anyone's handshake."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pynetdicom.presentation import build_context

from anonpipe.config import ClientTls, LocalSettings, Peer, ResearchSettings, ServerTls
from anonpipe.dimse import VERIFICATION
from anonpipe.scp import LandingRegistry, StorageSCP
from anonpipe.scp.connections import TLS_FAILED
from anonpipe.scu import (
    Cause,
    PeerUnavailable,
    associate,
    echo,
    pull_study,
    push_files,
    verify_studies,
)
from tests.harness.dcmtk import DcmtkError, StoreSCP, echoscu, storescu
from tests.harness.orthanc import OrthancFactory, OrthancServer
from tests.harness.ports import LOOPBACK
from tests.harness.studygen import Manifest
from tests.harness.tls import Identity, TestPki, dcmtk_tls, orthanc_tls
from tests.net.conftest import OUR_AE, start_scp


class Pki:
    """Our CA with certificates for anonpipe, the PACS and a DCMTK tool; a rogue CA beside."""

    def __init__(self, folder: Path) -> None:
        self.ca = TestPki(folder / "ca")
        self.ours = self.ca.issue("anonpipe")
        self.pacs = self.ca.issue("pacs")
        self.tool = self.ca.issue("tool")
        self.rogue_ca = TestPki(folder / "rogue", name="someone else's CA")
        self.rogue = self.rogue_ca.issue("rogue")

    def server(self) -> ServerTls:
        return ServerTls(self.ours.certificate, self.ours.private_key, self.ca.ca)

    def client(self, identity: Identity | None = None) -> ClientTls:
        identity = identity or self.ours
        return ClientTls(self.ca.ca, identity.certificate, identity.private_key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_local(local: LocalSettings, pki: Pki) -> LocalSettings:
    return replace(local, tls=pki.server())


@pytest.fixture
def tls_scp(tls_local: LocalSettings, registry: LandingRegistry) -> Iterator[StorageSCP]:
    peers = [Peer("STAGING", LOOPBACK), Peer("STORESCU", LOOPBACK), Peer("ECHOSCU", LOOPBACK)]
    server = start_scp(tls_local, registry, peers)
    yield server
    server.stop(drain_timeout=5)


def _refused(scp: StorageSCP, run: Callable[[], object]) -> None:
    before = scp.status().rejected_associations.get(TLS_FAILED, 0)
    with pytest.raises(DcmtkError):
        run()
    deadline = time.monotonic() + 10
    while scp.status().rejected_associations.get(TLS_FAILED, 0) == before:
        assert time.monotonic() < deadline, "the refusal was not counted"
        time.sleep(0.02)


def test_our_scp_serves_dcmtk_over_tls_and_refuses_everything_else(
    tls_scp: StorageSCP,
    registry: LandingRegistry,
    pki: Pki,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    port = tls_scp.port
    echoscu(port, called_aet=OUR_AE, tls=dcmtk_tls(pki.tool, pki.ca.ca))
    manifest = study_factory(series_per_study=1, instances_per_series=3)
    with registry.expect(manifest.studies[0].study_instance_uid, tmp_path / "landing") as landing:
        storescu(port, manifest.paths, called_aet=OUR_AE, tls=dcmtk_tls(pki.tool, pki.ca.ca))
        assert landing.landed == 3
    assert len(list((tmp_path / "landing").iterdir())) == 3

    def plain() -> object:
        return echoscu(port, called_aet=OUR_AE, timeout=5)

    def no_certificate() -> object:
        return echoscu(port, called_aet=OUR_AE, timeout=5, tls=dcmtk_tls(None, pki.ca.ca))

    def rogue_certificate() -> object:
        return echoscu(port, called_aet=OUR_AE, timeout=5, tls=dcmtk_tls(pki.rogue, pki.ca.ca))

    for attempt in (plain, no_certificate, rogue_certificate):
        _refused(tls_scp, attempt)
    echoscu(port, called_aet=OUR_AE, tls=dcmtk_tls(pki.tool, pki.ca.ca))  # still serving


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_older_than_1_2_is_refused(tls_scp: StorageSCP, pki: Pki) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(pki.ca.ca)
    client.load_cert_chain(pki.tool.certificate, pki.tool.private_key)
    client.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    client.minimum_version = client.maximum_version = ssl.TLSVersion.TLSv1_1
    with (
        socket.create_connection((LOOPBACK, tls_scp.port), timeout=5) as raw,
        pytest.raises(ssl.SSLError) as caught,
        client.wrap_socket(raw, server_hostname=LOOPBACK),
    ):
        pass
    assert caught.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"  # our answer, not the client's
    echoscu(tls_scp.port, called_aet=OUR_AE, tls=dcmtk_tls(pki.tool, pki.ca.ca))


def test_a_silent_connection_holds_up_no_other_handshake(tls_scp: StorageSCP, pki: Pki) -> None:
    """pynetdicom would do each handshake in its accept loop: one silent peer, nobody else in."""
    with socket.create_connection((LOOPBACK, tls_scp.port)) as silent:
        time.sleep(0.2)
        started = time.monotonic()
        echoscu(tls_scp.port, called_aet=OUR_AE, tls=dcmtk_tls(pki.tool, pki.ca.ca))
        assert time.monotonic() - started < 3
        silent.settimeout(10)
        assert silent.recv(1) == b""  # closed by us once the handshake time ran out
    assert tls_scp.status().rejected_associations.get(TLS_FAILED) == 1


@pytest.fixture
def tls_orthanc(orthanc_factory: OrthancFactory, pki: Pki) -> Callable[[str], OrthancServer]:
    def start(aet: str) -> OrthancServer:
        return orthanc_factory(aet, extra_config=orthanc_tls(pki.pacs, pki.ca.ca))

    return start


def _settings_for(orthanc: OrthancServer, tls: ClientTls) -> ResearchSettings:
    return ResearchSettings(
        ae_title=orthanc.aet,
        host=LOOPBACK,
        port=orthanc.dicom_port,
        connect_timeout=5,
        retries=0,
        retry_backoff=0.0,
        tls=tls,
    )


def test_push_verify_and_echo_over_tls_to_orthanc(
    tls_orthanc: Callable[[str], OrthancServer],
    local: LocalSettings,
    pki: Pki,
    study_factory: Callable[..., Manifest],
) -> None:
    research_orthanc = tls_orthanc("RESEARCH")
    research = _settings_for(research_orthanc, pki.client())
    assert echo(local, research).ok
    manifest = study_factory(series_per_study=2, instances_per_series=3)
    report = push_files(local, research, manifest.paths)
    assert not report.failed and len(report.stored) == 6
    assert len(research_orthanc.instances()) == 6
    (check,) = verify_studies(local, research, report.expected_per_study())
    assert check.ok, check
    assert not echo(local, replace(research, tls=None)).ok  # it speaks TLS only now


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("we do not trust its CA", "certificate verify failed"),
        ("its certificate names another host", "certificate verify failed"),
        ("it does not accept our certificate", "TLS handshake failed"),
        ("we present no certificate", "TLS handshake failed"),
    ],
)
def test_a_tls_refusal_is_an_answer_with_its_reason(
    tls_orthanc: Callable[[str], OrthancServer],
    local: LocalSettings,
    pki: Pki,
    tmp_path: Path,
    case: str,
    expected: str,
) -> None:
    """Reported at once, as a refusal (the certificates must change), never as "is the PACS
    running?"; a host name check that is switched off lets the same certificate through."""
    orthanc = tls_orthanc("RESEARCH")
    good = pki.client()
    tls = {
        "we do not trust its CA": replace(good, ca=pki.rogue_ca.ca),
        "its certificate names another host": good,
        "it does not accept our certificate": pki.client(pki.rogue),
        "we present no certificate": ClientTls(pki.ca.ca),
    }[case]
    research = _settings_for(orthanc, tls)
    if case == "its certificate names another host":
        elsewhere = pki.ca.issue("elsewhere", hosts=("pacs.example.org",))
        orthanc.stop()
        orthanc.extra_config.update(orthanc_tls(elsewhere, pki.ca.ca))
        orthanc.start(same_ports=True)
    started = time.monotonic()
    with (
        pytest.raises(PeerUnavailable) as caught,
        associate(local, research, [build_context(VERIFICATION)]) as assoc,
    ):
        assoc.send_c_echo()
    assert time.monotonic() - started < 5
    assert expected in caught.value.reason and "TLS" in caught.value.reason, caught.value.reason
    assert caught.value.cause is Cause.REFUSAL
    if case == "its certificate names another host":
        assert echo(local, replace(research, tls=replace(tls, check_hostname=False))).ok


def test_pull_over_tls_from_orthanc_into_our_tls_scp(
    tls_orthanc: Callable[[str], OrthancServer],
    tls_scp: StorageSCP,
    tls_local: LocalSettings,
    registry: LandingRegistry,
    pki: Pki,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
) -> None:
    """C-FIND and C-MOVE to staging over TLS, and its sub-associations to our SCP over TLS."""
    staging_orthanc = tls_orthanc("STAGING")
    staging_orthanc.add_modality("anonpipe", OUR_AE, LOOPBACK, tls_scp.port, tls=True)
    manifest = study_factory(series_per_study=2, instances_per_series=4)
    staging_orthanc.upload(manifest.paths)
    staging = _settings_for(staging_orthanc, pki.client())
    study_uid = manifest.studies[0].study_instance_uid
    result = pull_study(tls_local, staging, registry, study_uid, tmp_path / "landing")
    assert result.status == "complete", result.detail
    assert result.landed == 8
    assert len(list((tmp_path / "landing").iterdir())) == 8


def test_push_over_tls_to_dcmtk_storescp(
    local: LocalSettings, pki: Pki, study_factory: Callable[..., Manifest], tmp_path: Path
) -> None:
    manifest = study_factory(series_per_study=1, instances_per_series=4)
    with StoreSCP(
        tmp_path / "received", aet="RESEARCH", tls=dcmtk_tls(pki.pacs, pki.ca.ca)
    ) as storescp:
        research = ResearchSettings(
            ae_title="RESEARCH", host=LOOPBACK, port=storescp.port, tls=pki.client()
        )
        report = push_files(local, research, manifest.paths)
        assert not report.failed and len(report.stored) == 4
        assert len(storescp.received()) == 4
