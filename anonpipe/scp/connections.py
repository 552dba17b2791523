"""Limits on every connection to our SCP, before and after it becomes an association.

pynetdicom gives each accepted socket two threads and counts it against
``maximum_associations`` from the moment it connects, whoever it is; it reads a PDU's whole
length into memory before any check; and a socket that sends half a PDU blocks its reader for
good (accepted sockets have no timeout). So anyone who can reach the port could take every slot
(the staging PACS's C-MOVE sub-associations were then refused, and every pull blamed the staging
PACS), hold them for as long as they like, or make us buffer gigabytes. :class:`ConnectionGuard`
is bound to ``EVT_CONN_OPEN``, ``EVT_REQUESTED`` and ``EVT_CONN_CLOSE`` and answers each of
those with a limit:

- a connection must send its A-ASSOCIATE-RQ within ``associate_within`` seconds (pynetdicom's
  ARTIM timer and ACSE wait, shortened for this connection until it is admitted), and a PDU it
  starts must arrive whole within that time before the association and ``read_timeout``
  seconds after it (a socket timeout), else the connection is closed;
- a PDU longer than what we accept is refused without reading it (the connection is closed):
  1 MiB before the association (an A-ASSOCIATE-RQ), our maximum PDU size after it (16 MiB when
  none is configured);
- at most ``pending_per_host`` connections from one address may wait without an association;
  more are closed at once;
- the association limit counts *accepted* associations of allowed peers only (checked after
  the peer policy, in :meth:`admit`), so connections that never associate, and rejected ones,
  never take an allowed peer's slot;
- a connection's threads wait for work instead of polling every millisecond
  (:mod:`anonpipe.reactors`; pynetdicom's DUL thread busy-polls each socket: 130 idle
  connections kept a core busy and slowed everything else the daemon does);
- once an association has ended (aborted, rejected, released), a few more reads, then the
  connection is closed: pynetdicom would read and log garbage until the peer stops;
- with DICOM TLS, the handshake is done here, in the connection's own thread and within
  ``associate_within`` seconds (:func:`anonpipe.tls.accept`); a failed one closes the connection.
"""

from __future__ import annotations

import contextlib
import errno
import ssl
import threading
from collections import Counter
from typing import Any

from anonpipe import reactors, tls
from anonpipe.logs import get_logger

__all__ = ["ConnectionGuard", "close_unassociated"]

log = get_logger(__name__)

#: The longest PDU accepted before an association exists: an A-ASSOCIATE-RQ with 128 contexts
#: and a user identity is far below.
PRE_ASSOCIATION_PDU = 1 << 20
#: The longest PDU accepted when no maximum PDU size is configured (0 advertises "no limit").
UNLIMITED_PDU_CAP = 16 << 20
#: PDU header (type, reserved, length) and PDV item headers around the data we accepted.
_PDU_SLACK = 1024

# Reasons counted in the SCP's status (rejected associations / closed connections).
TOO_MANY_PENDING = "too many connections without an association from one address"
TOO_LONG = "PDU longer than we accept"
LIMIT_REACHED = "association limit reached"
TLS_FAILED = "TLS handshake failed"

#: Socket reads (two per PDU: header, then body) allowed once an association has ended and
#: pynetdicom waits for the connection to close (state Sta13).
READS_AFTER_THE_END = 8


def close_unassociated(assoc: Any) -> None:
    """Close a connection that has not sent its A-ASSOCIATE-RQ, without waiting for it.

    As if its ARTIM timer had expired (PS3.8 Evt18: pynetdicom closes the transport); there is
    no association to abort, and pynetdicom's ``kill()`` would wait for that timer.
    """
    if assoc.dul.state_machine.current_state in ("Sta1", "Sta2"):
        assoc.dul.event_queue.put("Evt18")


def _dead(assoc: Any) -> bool:
    """Whether one of the association's threads has ended (started ones only).

    The association's thread starts its DUL thread itself, a moment after it starts: until
    then the DUL is not started, not dead (judging it dead freed a waiting connection's count).
    """
    return any(t.ident is not None and not t.is_alive() for t in (assoc, assoc.dul))


class _PduLimit(OSError):
    """Raised from a socket read to make pynetdicom close the connection (as for a reset)."""


class ConnectionGuard:
    """The limits of one SCP; see the module docstring. Thread-safe (pynetdicom's threads)."""

    def __init__(
        self,
        *,
        max_associations: int,
        max_pdu_size: int,
        associate_within: float,
        read_timeout: float,
        pending_per_host: int,
        on_refusal: Any = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.max_associations = max_associations
        self.max_pdu = (max_pdu_size or UNLIMITED_PDU_CAP) + _PDU_SLACK
        self.associate_within = associate_within
        self.read_timeout = read_timeout
        self.pending_per_host = pending_per_host
        self._on_refusal = on_refusal or (lambda _reason: None)
        self.tls_context = tls_context
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        #: connections without an association yet: id -> (host, association)
        self._waiting: dict[int, tuple[str, Any]] = {}
        self._accepted: dict[int, Any] = {}
        self._admitted = 0

    # -- EVT_CONN_OPEN ------------------------------------------------------------------------

    def on_open(self, event: Any) -> None:
        assoc = event.assoc
        if not assoc.is_acceptor:
            return
        host = str(event.address[0])
        with self._lock:
            for gone in [a for _, a in self._waiting.values() if _dead(a)]:
                self._leave_pending(gone)  # its threads died without a close event
            self._pending[host] += 1
            self._waiting[id(assoc)] = (host, assoc)
            crowded = self._pending[host] > self.pending_per_host
        # Until it associates: ARTIM (the DUL) and the ACSE wait (the association's thread).
        reactors.install(assoc)
        assoc.acse_timeout = self.associate_within
        self._read_timeout(assoc, self.associate_within)
        self._limit_reads(assoc)
        if crowded:
            self._refuse(TOO_MANY_PENDING, host)
            close_unassociated(assoc)
            return
        if self.tls_context is not None:
            failure = tls.accept(self.tls_context, assoc, self.associate_within)
            if failure is not None:
                self._refuse(TLS_FAILED, host, tls_error=failure)
                close_unassociated(assoc)

    @staticmethod
    def _read_timeout(assoc: Any, seconds: float) -> None:
        raw = getattr(assoc.dul.socket, "socket", None)
        if raw is not None:
            raw.settimeout(seconds)

    def _limit_reads(self, assoc: Any) -> None:
        socket = assoc.dul.socket
        read = socket.recv

        ended_reads = 0

        def recv(nr_bytes: int) -> bytearray:
            nonlocal ended_reads
            if assoc.dul.state_machine.current_state == "Sta13":
                # The association is over (aborted, rejected or released) and pynetdicom waits
                # for the close, but reads on, a 6-byte "PDU" at a time, with an ERROR record
                # for each unknown one: 6,000 zero bytes, even before any association, made
                # 1,000 records. A few reads let a peer's A-ABORT or A-RELEASE-RP in; then
                # the connection is closed (14 records in all for those 6,000 bytes).
                ended_reads += 1
                if ended_reads > READS_AFTER_THE_END:
                    raise _PduLimit(errno.ECONNABORTED, "data after the association ended")
            limit = self.max_pdu if assoc.is_established else PRE_ASSOCIATION_PDU
            if nr_bytes > limit:
                self._refuse(TOO_LONG, str(getattr(assoc.requestor, "address", "")))
                raise _PduLimit(errno.EMSGSIZE, f"PDU of {nr_bytes} bytes refused")
            data: bytearray = read(nr_bytes)
            return data

        socket.recv = recv

    # -- EVT_REQUESTED (after the peer policy) ------------------------------------------------

    def admit(self, assoc: Any, acse_timeout: float) -> bool:
        """Count `assoc` (an allowed peer's) as accepted, or False when the limit is reached.

        An admitted association gets back the configured `acse_timeout` and the longer read
        timeout.
        """
        key = id(assoc)
        with self._lock:
            self._leave_pending(assoc)
            dead = self._prune()
            admitted = len(self._accepted) < self.max_associations
            if admitted:
                self._accepted[key] = assoc
                self._admitted += 1
        for gone in dead:  # outside the lock: closing triggers on_close
            with contextlib.suppress(Exception):
                gone.dul.socket.close()
        if not admitted:
            return False
        assoc.acse_timeout = acse_timeout
        self._read_timeout(assoc, self.read_timeout)
        return True

    def rejected(self, assoc: Any) -> None:
        """`assoc` was rejected by the peer policy: it no longer waits."""
        with self._lock:
            self._leave_pending(assoc)

    # -- EVT_CONN_CLOSE -----------------------------------------------------------------------

    def on_close(self, event: Any) -> None:
        with self._lock:
            self._leave_pending(event.assoc)
            self._accepted.pop(id(event.assoc), None)

    def _prune(self) -> list[Any]:
        """Forget accepted associations whose threads died without closing their connection
        (pynetdicom's state machine can raise in its network thread on hostile PDUs, and then
        no ``EVT_CONN_CLOSE`` comes): they must not hold a slot for good. Returns them."""
        dead = [a for a in self._accepted.values() if _dead(a)]
        for assoc in dead:
            self._accepted.pop(id(assoc), None)
        return dead

    def _leave_pending(self, assoc: Any) -> None:
        waiting = self._waiting.pop(id(assoc), None)
        if waiting is not None:
            host = waiting[0]
            self._pending[host] -= 1
            if self._pending[host] <= 0:
                del self._pending[host]

    def _refuse(self, reason: str, host: str, **detail: str) -> None:
        log.warning("connection closed", reason=reason, peer_address=host, **detail)
        self._on_refusal(reason)

    @property
    def admitted(self) -> int:
        """Associations admitted since start (allowed peers that found a free slot)."""
        with self._lock:
            return self._admitted

    @property
    def accepted(self) -> int:
        """Accepted associations holding a slot now (dead ones are let go first)."""
        with self._lock:
            dead = self._prune()
            count = len(self._accepted)
        for gone in dead:
            with contextlib.suppress(Exception):
                gone.dul.socket.close()
        return count
