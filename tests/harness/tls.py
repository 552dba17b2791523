"""Throwaway certificates for DICOM TLS tests, made by the ``openssl`` command-line tool.

:class:`TestPki` is one certificate authority in a folder; :meth:`TestPki.issue` signs a
certificate for a name, valid for ``127.0.0.1`` and ``localhost`` (or the hosts given), usable
as a server and as a client certificate. Two authorities make the "certificate from someone
else" cases. :func:`orthanc_tls` and :func:`dcmtk_tls` give the matching Orthanc configuration
keys and DCMTK options.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Identity", "TestPki", "dcmtk_tls", "orthanc_tls"]


@dataclass(frozen=True, slots=True)
class Identity:
    """A certificate and its private key (PEM files)."""

    certificate: Path
    private_key: Path


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl not found: install the Debian package 'openssl'")
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


class TestPki:
    """A certificate authority in `folder` (created), with its own name."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path, name: str = "anonpipe test CA") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = folder / "ca.crt"
        self._ca_key = folder / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(self._ca_key), "-out", str(self.ca), "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        self._ca_key.chmod(0o600)

    def issue(self, name: str, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> Identity:
        """A certificate for `name`, signed by this authority, naming `hosts` (IPs or DNS)."""
        key, request, cert = (self.folder / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        extensions = self.folder / f"{name}.ext"
        names = ",".join(f"{'IP' if h[0].isdigit() else 'DNS'}:{h}" for h in hosts)
        extensions.write_text(
            f"subjectAltName={names}\nextendedKeyUsage=serverAuth,clientAuth\n", encoding="ascii"
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request),
            "-subj", f"/CN={name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(self.ca), "-CAkey",
            str(self._ca_key), "-CAcreateserial", "-days", "2", "-out", str(cert),
            "-extfile", str(extensions),
        )  # fmt: skip
        key.chmod(0o600)
        return Identity(cert, key)


def orthanc_tls(identity: Identity, trusted: Path, *, require_peer: bool = True) -> dict[str, Any]:
    """Orthanc 1.10's configuration keys for DICOM TLS on its SCP and SCU (``UseDicomTls`` on a
    modality makes its outgoing associations to that modality TLS)."""
    return {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(identity.certificate),
        "DicomTlsPrivateKey": str(identity.private_key),
        "DicomTlsTrustedCertificates": str(trusted),
        "DicomTlsRemoteCertificateRequired": require_peer,
    }


def dcmtk_tls(identity: Identity | None, trusted: Path) -> list[str]:
    """DCMTK options (echoscu, storescu, storescp): TLS with `identity` (None: anonymous TLS,
    no certificate of ours), trusting the certificates in `trusted`."""
    own = ["+tls", str(identity.private_key), str(identity.certificate)] if identity else ["+tla"]
    return [*own, "+cf", str(trusted)]
