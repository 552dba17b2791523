"""DICOM TLS (PS3.15 Annex B.1, the BCP 195 profile): the SSL contexts of our SCP and clients.

pynetdicom takes a ready :class:`ssl.SSLContext`; building it from the configuration, and
saying clearly why a handshake failed, is ours. Two things pynetdicom does not do for us:

- **Our SCP does the handshake in the connection's own thread.** Given a context, pynetdicom's
  server would complete each TLS handshake in its accept loop, so one connection that sends
  nothing would stop every other from being accepted. :func:`accept` wraps the socket in
  ``EVT_CONN_OPEN`` instead (a per-connection thread) with a time limit.
- **Clients keep the reason of a failed handshake.** pynetdicom reports any failure to connect
  alike; :class:`HandshakeRecord` keeps the TLS error so that "certificate verify failed" is
  not reported as "is the PACS running?".
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anonpipe.config import ClientTls, ServerTls

__all__ = [
    "HandshakeRecord",
    "TlsConfigError",
    "accept",
    "client_context",
    "describe_error",
    "server_context",
]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


def _context(purpose: ssl.Purpose, ca: Any, min_version: str) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = _VERSIONS[min_version]
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"ca {ca} holds no usable CA certificate (PEM): {describe_error(exc)}"
        ) from None
    return context


def _load_identity(context: ssl.SSLContext, certificate: Any, private_key: Any) -> None:
    try:
        context.load_cert_chain(certificate, private_key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"certificate {certificate} and private_key {private_key} cannot be used together "
            f"(PEM, the key of that certificate, not encrypted): {describe_error(exc)}"
        ) from None


def server_context(settings: ServerTls) -> ssl.SSLContext:
    """The context of our SCP: our certificate, the CAs we accept peers' certificates from."""
    context = _context(ssl.Purpose.CLIENT_AUTH, settings.ca, settings.min_version)
    _load_identity(context, settings.certificate, settings.private_key)
    context.verify_mode = (
        ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
    )
    return context


def client_context(settings: ClientTls, record: HandshakeRecord | None = None) -> ssl.SSLContext:
    """A context to connect to one PACS; a new one per association when `record` is given."""
    context = _context(ssl.Purpose.SERVER_AUTH, settings.ca, settings.min_version)
    context.check_hostname = settings.check_hostname
    if settings.certificate is not None:
        _load_identity(context, settings.certificate, settings.private_key)
    if record is not None:
        context.sslsocket_class = record.socket_class()
    return context


def describe_error(exc: BaseException) -> str:
    """A TLS failure in words, without the library's noise (e.g. ``certificate verify failed:
    unable to get local issuer certificate``, ``tlsv13 alert certificate required``)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


class HandshakeRecord:
    """Keeps the first TLS error of one client connection (handshake or a later read)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def socket_class(self) -> type[ssl.SSLSocket]:
        record = self

        class RecordingSocket(ssl.SSLSocket):
            def do_handshake(self, block: bool = False) -> None:
                try:
                    super().do_handshake(block)
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    record.error = record.error or exc
                    raise

            def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
                try:
                    return super().recv(buflen, flags)
                except ssl.SSLError as exc:  # TLS 1.3: the server's verdict comes after ours
                    record.error = record.error or exc
                    raise

        return RecordingSocket


def accept(context: ssl.SSLContext, assoc: Any, within: float) -> str | None:
    """Wrap `assoc`'s accepted socket in TLS and do the handshake, waiting at most `within`
    seconds; returns why it failed, or None. Runs in the connection's own thread."""
    transport = assoc.dul.socket
    transport.socket.settimeout(within)
    try:
        transport.socket = context.wrap_socket(
            transport.socket, server_side=True, do_handshake_on_connect=False
        )
        transport.socket.do_handshake()
    except (OSError, ValueError) as exc:
        return "TLS handshake timed out" if isinstance(exc, TimeoutError) else describe_error(exc)
    return None
