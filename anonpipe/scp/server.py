"""The resident Storage SCP: lifecycle (start, status, drain and stop) around pynetdicom's server.

It accepts every storage SOP class, public, private or unknown to pynetdicom (vendors' private
classes are common in clinical studies), in the transfer syntax the peer proposes first, and
Verification, from allowed peers only; objects land through
:class:`~anonpipe.scp.lander.Lander` into the folders pulls registered in a
:class:`~anonpipe.scp.landing.LandingRegistry`.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt

from anonpipe import commandset, tls
from anonpipe.config import LocalSettings, Peer
from anonpipe.dimse import VERIFICATION, configure_transfer, set_nodelay
from anonpipe.logs import get_logger
from anonpipe.scp import decoding, filemeta, spool
from anonpipe.scp.connections import UNLIMITED_PDU_CAP, ConnectionGuard, close_unassociated
from anonpipe.scp.handlers import on_c_store, on_closed, on_requested
from anonpipe.scp.lander import Lander
from anonpipe.scp.landing import LandingRegistry
from anonpipe.scp.peers import PeerPolicy

__all__ = ["ScpStatus", "StorageSCP"]

log = get_logger(__name__)

#: A connection must send its A-ASSOCIATE-RQ within this many seconds (every DICOM peer does so
#: at once); and a PDU it has started must arrive whole within READ_TIMEOUT seconds.
ASSOCIATE_WITHIN = 5.0
READ_TIMEOUT = 60.0
#: Connections one address may hold open without an association.
PENDING_PER_HOST = 8
#: Connections the kernel queues before we accept them (Linux caps it at somaxconn).
LISTEN_BACKLOG = 128
#: pynetdicom's own limit on concurrent connections (two threads each).
THREAD_BOUND = 256


@dataclass(frozen=True, slots=True)
class ScpStatus:
    """A snapshot for ``anonpipectl status``: listening, load and what was refused, by reason."""

    ae_title: str
    bind: str
    port: int
    listening: bool
    active_associations: int
    expected_studies: int
    landed: int
    refused: dict[str, int]
    rejected_associations: dict[str, int]
    #: Bytes of the objects landed (as received, file meta included), since start.
    bytes_received: int = 0
    #: Associations accepted (allowed peers, a free slot), since start.
    accepted_associations: int = 0


class StorageSCP:
    """Our Storage SCP (``[local]``): ``start()``, then ``stop()`` which drains associations.

    Parameters
    ----------
    local : LocalSettings
        AE title, bind address and port, association limits and timeouts.
    peers : iterable of Peer
        Calling AEs allowed to associate (``Settings.allowed_peers``), each from its host.
    registry : LandingRegistry
        Shared with the pulls: which studies are expected and where they land.
    min_free_bytes : int
        Refuse objects (Out of Resources) that would leave less free space than this.
    spool_dir : Path or None
        Our own folder for objects being received, on the landing filesystem (landing is then
        a rename); spool files a previous process left there are deleted at start. None uses
        ``TMPDIR`` (and sweeps nothing).

    Raises
    ------
    ValueError
        If an allowed peer's host name does not resolve.
    """

    def __init__(
        self,
        local: LocalSettings,
        peers: Iterable[Peer],
        registry: LandingRegistry,
        *,
        min_free_bytes: int = 0,
        spool_dir: Path | None = None,
    ) -> None:
        self.local = local
        self.registry = registry
        self.policy = PeerPolicy(local.ae_title, peers)
        self.lander = Lander(registry, min_free_bytes)
        self.rejections = registry.rejections
        self.guard = ConnectionGuard(
            max_associations=local.max_associations,
            max_pdu_size=local.max_pdu_size,
            associate_within=ASSOCIATE_WITHIN,
            read_timeout=min(local.network_timeout, READ_TIMEOUT),
            pending_per_host=PENDING_PER_HOST,
            on_refusal=self.rejections.add,
            tls_context=tls.server_context(local.tls) if local.tls else None,
        )
        self.spool_dir = spool_dir
        self._server: Any = None
        self._lock = threading.Lock()

    def _application_entity(self) -> Any:
        ae = AE(ae_title=self.local.ae_title)
        # pynetdicom counts every connected socket, associated or not, against its limit: ours
        # (ConnectionGuard.admit) counts allowed peers' accepted associations; its own only
        # bounds the threads.
        ae.maximum_associations = max(THREAD_BOUND, 4 * self.local.max_associations)
        # "0 = unlimited" is not what we accept (ConnectionGuard caps it): advertise the cap, so
        # that a peer that sends whole objects in one PDU when told "unlimited" is not refused.
        ae.maximum_pdu_size = self.local.max_pdu_size or UNLIMITED_PDU_CAP
        ae.acse_timeout = self.local.acse_timeout
        ae.dimse_timeout = self.local.dimse_timeout
        ae.network_timeout = self.local.network_timeout
        # Storage contexts are not listed: pynetdicom's unrestricted storage service (set in
        # start()) accepts any storage-like abstract syntax. Listing ~150 classes by every syntax
        # also cost ~50 ms of CPU per inbound association, the deep copy pynetdicom makes.
        ae.add_supported_context(VERIFICATION)
        return ae

    @property
    def is_listening(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The port we listen on (the configured one; the bound one when configured as 0)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self.local.port

    def start(self) -> None:
        """Bind and serve in background threads; returns once the socket listens.

        Raises
        ------
        OSError
            If the address cannot be bound (for example the port is in use); the message names
            the address.
        """
        with self._lock:
            if self._server is not None:
                return
            configure_transfer()
            commandset.install()  # command sets encoded and decoded without pydicom
            # Process-wide, and only acceptors read it: our only acceptor is this SCP.
            _config.UNRESTRICTED_STORAGE_SERVICE = True
            self._prepare_spool()
            handlers = [
                (evt.EVT_REQUESTED, on_requested, [self.policy, self.rejections, self.guard]),
                (evt.EVT_C_STORE, on_c_store, [self.lander]),
                (evt.EVT_CONN_CLOSE, on_closed),
                (evt.EVT_CONN_CLOSE, self.guard.on_close),
                (evt.EVT_CONN_OPEN, set_nodelay),
                (evt.EVT_CONN_OPEN, self.guard.on_open),
            ]
            ae = self._application_entity()
            address = (self.local.bind, self.local.port)
            try:
                self._server = ae.start_server(address, block=False, evt_handlers=handlers)
                # pynetdicom listens with socketserver's backlog of 5: under a flood of hostile
                # connections the kernel dropped the staging PACS's connects (retried after 1 s).
                self._server.socket.listen(LISTEN_BACKLOG)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot listen on {self.local.bind}:{self.local.port}: {exc.strerror}",
                ) from exc
        log.info(
            "storage scp listening",
            ae_title=self.local.ae_title,
            bind=self.local.bind,
            port=self.port,
            allowed_peers=list(self.policy.allowed_titles),
            tls=self.local.tls is not None,
        )

    def _prepare_spool(self) -> None:
        decoding.install(lambda _assoc: self.lander.refused.add(decoding.MALFORMED_COMMAND))
        filemeta.install()
        floor = self.lander.min_free_bytes
        if self.spool_dir is None:
            spool.install(Path(tempfile.gettempdir()), floor)
            return
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        removed = spool.sweep(self.spool_dir)
        if removed:
            log.warning("unacknowledged partial objects removed", count=removed)
        spool.install(self.spool_dir, floor)

    def active_associations(self) -> int:
        server = self._server
        return 0 if server is None else len(server.active_associations)

    def status(self) -> ScpStatus:
        return ScpStatus(
            ae_title=self.local.ae_title,
            bind=self.local.bind,
            port=self.port,
            listening=self.is_listening,
            active_associations=self.active_associations(),
            expected_studies=len(self.registry),
            landed=sum(self.lander.landed.snapshot().values()),
            refused=self.lander.refused.snapshot(),
            rejected_associations=self.rejections.snapshot(),
            bytes_received=sum(self.lander.landed_bytes.snapshot().values()),
            accepted_associations=self.guard.admitted,
        )

    def stop(self, drain_timeout: float = 30.0) -> int:
        """Stop accepting, let active associations finish for up to *drain_timeout* seconds, then
        abort the rest. Returns how many had to be aborted.

        pynetdicom's ``shutdown()`` closes the listening socket but leaves associations running;
        waiting for them here is what makes a stop lose nothing that was being received.
        """
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return 0
        server.shutdown()
        deadline = time.monotonic() + drain_timeout
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = list(server.active_associations)
        for assoc in leftover:
            if assoc.is_established:
                assoc.abort()
            else:  # a connection that never associated: nothing to abort, close it
                close_unassociated(assoc)
        if leftover:
            log.warning("associations aborted at stop", count=len(leftover))
        log.info("storage scp stopped", ae_title=self.local.ae_title)
        return len(leftover)
