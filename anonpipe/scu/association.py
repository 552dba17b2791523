"""Opening an association to a peer, with our limits and an error that says what went wrong.

Every client in :mod:`anonpipe.scu` goes through :func:`associate`: one place that applies the
``[local]`` timeouts and PDU size (pynetdicom's ``ae.maximum_pdu_size`` is ignored for requestors,
so it is passed to ``associate`` as well), a connection timeout (pynetdicom has none by default),
and turns "not established" into :class:`PeerUnavailable` naming the peer and the cause. It also
closes a race in pynetdicom's reactor that could leave a request waiting for a response that had
already arrived (:func:`_return_stolen_responses`).

**An abort is an answer.** pynetdicom's ``send_*`` methods wait for the response on a queue for
the whole DIMSE timeout (10 minutes by default), even when the peer has already aborted the
association or closed the connection: its reactor, which notices, is paused while they wait. Our
associations watch for an A-ABORT PDU and the connection closing (pynetdicom's own events, from
its DUL thread) and then wake the waiting request at once (:func:`ended`). The service does the
same to every open association when it stops (:func:`end_open_associations`), so SIGTERM never
waits on a silent peer.

**Sending is paced by the peer.** pynetdicom reads a file being sent in PDU-sized chunks, but
puts every P-DATA on its DUL thread's send queue (unbounded) at once, and that thread sends them
only as fast as the socket takes them: with a peer slower than our disk, a 2 GiB object ended up
in our memory (and stayed there, freed but not given back: RSS +1.1 GB). Our associations let at
most :data:`SEND_QUEUE_BYTES` wait in that queue (:func:`_pace_sends`), never send PDUs longer
than :data:`SEND_PDU_CAP` (a peer allowing "unlimited" made pynetdicom read a whole file as one
PDU), and a sender waiting for room gives up, aborting the association, as soon as it ended, its
network thread died, the service is stopping, or the peer took nothing for the DIMSE timeout.
"""

from __future__ import annotations

import contextlib
import enum
import queue
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from anonpipe import commandset, reactors, tls
from anonpipe.config import LocalSettings
from anonpipe.dimse import Endpoint, set_nodelay

__all__ = [
    "Cause",
    "Ending",
    "PeerUnavailable",
    "SendAborted",
    "associate",
    "describe",
    "end_open_associations",
    "ended",
]

#: At most this many presentation contexts may be proposed in one association (PS3.8 9.3.2).
MAX_CONTEXTS = 128

#: P-DATA bytes allowed to wait in pynetdicom's send queue (its DUL thread drains it as the
#: socket takes them); the thread reading the file waits beyond that (:func:`_pace_sends`).
SEND_QUEUE_BYTES = 4 << 20
#: The longest PDU we send, whatever the peer accepts (pynetdicom reads each one whole).
SEND_PDU_CAP = 1 << 20
#: Seconds between two checks, by a sender waiting for room, that the association still lives.
SEND_WAIT_POLL = 0.1
#: Seconds an abort in the middle of a message may take before the connection is shut down.
ABORT_GRACE = 1.0


class Cause(enum.Enum):
    """Why an exchange with a peer failed, as the caller must act on it."""

    #: The peer could not be reached or did not answer (down, silent, connection lost): wait
    #: for it and try again; nothing about the data is wrong.
    OUTAGE = "outage"
    #: The peer answered no (association rejected or aborted, a failure status): report it.
    REFUSAL = "refusal"
    #: Our side ended it (the service stopping, a file we cannot read).
    LOCAL = "local"


@dataclass(frozen=True, slots=True)
class Ending:
    """Why an association ended under a request, and what kind of failure that is."""

    reason: str
    cause: Cause


class SendAborted(RuntimeError):
    """A message could not be sent whole: the association ended (or the peer stopped taking
    data) in the middle of it; the association is aborted. ``ended(assoc)`` says why."""


class PeerUnavailable(ConnectionError):
    """No association with the peer: refused, rejected, aborted or timed out (``cause``)."""

    def __init__(self, peer: Endpoint, reason: str, cause: Cause = Cause.OUTAGE) -> None:
        super().__init__(f"{describe(peer)}: {reason}")
        self.peer_ae = peer.ae_title
        self.reason = reason
        self.cause = cause


def describe(peer: Endpoint) -> str:
    """``AE@host:port``, how peers are named in messages and logs."""
    return f"{peer.ae_title}@{peer.host}:{peer.port}"


@contextmanager
def associate(
    local: LocalSettings,
    peer: Endpoint,
    contexts: Sequence[PresentationContext],
) -> Iterator[Any]:
    """``with associate(local, peer, contexts) as assoc:`` an established association, released
    (or aborted, on error) at the end.

    Parameters
    ----------
    local : LocalSettings
        Our AE title (the calling AE), timeouts and maximum PDU size.
    peer : Endpoint
        The called AE: title, host, port and connection timeout.
    contexts : sequence of PresentationContext
        The contexts to propose (at most 128).

    Raises
    ------
    PeerUnavailable
        If the association could not be established; the message says why.
    ValueError
        If more than 128 contexts are proposed.
    """
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts proposed; at most 128 allowed")
    commandset.install()  # command sets encoded and decoded without pydicom (idempotent)
    ae = AE(ae_title=local.ae_title)
    ae.acse_timeout = local.acse_timeout
    ae.dimse_timeout = local.dimse_timeout
    ae.network_timeout = local.network_timeout
    ae.connection_timeout = peer.connect_timeout
    ae.maximum_pdu_size = local.max_pdu_size
    ae.requested_contexts = list(contexts)
    connected: list[bool] = []
    handshake = tls.HandshakeRecord()
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        max_pdu=local.max_pdu_size,
        tls_args=(tls.client_context(peer.tls, handshake), peer.host) if peer.tls else None,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, lambda _event: connected.append(True)),
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_CONN_OPEN, reactors.on_open),
            (evt.EVT_PDU_RECV, _on_pdu),
            (evt.EVT_CONN_CLOSE, _on_close),
        ],
    )
    if not assoc.is_established:
        if handshake.error is not None:
            raise PeerUnavailable(peer, _tls_failure(handshake.error), Cause.REFUSAL)
        raise PeerUnavailable(peer, *_failure_reason(assoc, peer, bool(connected)))
    _return_stolen_responses(assoc)
    _pace_sends(assoc)
    with _OPEN_LOCK:
        _OPEN.add(assoc)
    try:
        yield assoc
    except BaseException:
        if assoc.is_established:
            assoc.abort()
        raise
    finally:
        with _OPEN_LOCK:
            _OPEN.discard(assoc)
    if assoc.is_established:
        setattr(assoc, _RELEASING, True)
        assoc.release()


#: The associations of this process that are open now (see :func:`end_open_associations`).
_OPEN: set[Any] = set()
_OPEN_LOCK = threading.Lock()
_ENDED = "_anonpipe_ended"
_RELEASING = "_anonpipe_releasing"


def ended(assoc: Any) -> Ending | None:
    """Why the association ended under a request (aborted, closed, stopped), or None."""
    ending: Ending | None = getattr(assoc, _ENDED, None)
    return ending


def _end(assoc: Any, reason: str, cause: Cause) -> None:
    """Record the first reason and wake a request waiting for its response (it then gets
    none, at once, instead of after the DIMSE timeout)."""
    if getattr(assoc, _ENDED, None) is None:
        setattr(assoc, _ENDED, Ending(reason, cause))
    assoc.dimse.msg_queue.put((None, None))


#: A-ABORT source 0: the peer's application aborted (the reason field is not significant then).
_ABORT_BY_USER = 0


def _on_pdu(event: Any) -> None:
    pdu = event.pdu
    if isinstance(pdu, A_ABORT_RQ):
        if pdu.source == _ABORT_BY_USER:
            why = "aborted by the peer's application"
        else:
            why = f"aborted by the peer's DICOM stack ({pdu.reason_str})"
        _end(event.assoc, why, Cause.REFUSAL)


def _on_close(event: Any) -> None:
    if not getattr(event.assoc, _RELEASING, False):
        _end(event.assoc, "the peer closed the connection", Cause.OUTAGE)


def end_open_associations(reason: str) -> int:
    """End every association this process has open: each request waiting on one gets no
    response, at once, and reports `reason` (e.g. the service is stopping). Returns how many.

    Thread-safe (it only records and wakes; the waiting thread aborts its own association).
    """
    with _OPEN_LOCK:
        open_now = list(_OPEN)
    for assoc in open_now:
        _end(assoc, reason, Cause.LOCAL)
    return len(open_now)


def _return_stolen_responses(assoc: Any) -> None:
    """Give a response that pynetdicom's reactor thread took back to the request waiting for it.

    pynetdicom's ``send_*`` methods pause the association's reactor before sending, but the pause
    is checked through a flag the reactor also sets on every loop, so the reactor can slip past it
    and take the response off the queue; it then logs "Received unexpected C-STORE service
    message" and drops it, and the request waits the whole DIMSE timeout (10 minutes by default)
    for nothing. Seen on a loaded machine during a push. While a request waits (the reactor's
    checkpoint is cleared) a response that is not a request goes back on the queue instead.
    """
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not assoc._reactor_checkpoint.is_set():
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request


def _pace_sends(assoc: Any) -> None:
    """Bound what pynetdicom may queue for sending on *assoc* (see the module docstring).

    pynetdicom's DIMSE layer hands each P-DATA to ``assoc.dul.send_pdu``, which puts it on the
    unbounded ``dul.to_provider_queue``; the DUL thread takes them off one by one (each ``get``
    notifies the queue's ``not_full`` condition) as it sends them. Our ``send_pdu`` waits while
    the queue holds :data:`SEND_QUEUE_BYTES` of P-DATA or more; other primitives (release,
    abort) never wait. The peer's maximum PDU length is capped first (:data:`SEND_PDU_CAP`):
    it sizes the chunks pynetdicom reads, and so the queue's depth.
    """
    _cap_send_pdu(assoc)
    dul = assoc.dul
    send = dul.send_pdu
    pending: queue.Queue[Any] = dul.to_provider_queue
    depth = max(2, SEND_QUEUE_BYTES // (assoc.dimse.maximum_pdu_size or SEND_PDU_CAP))

    def send_pdu(primitive: Any) -> None:
        if isinstance(primitive, P_DATA) and len(pending.queue) >= depth:
            _wait_for_room(assoc, pending, depth)
        send(primitive)

    dul.send_pdu = send_pdu


def _cap_send_pdu(assoc: Any) -> None:
    """Send PDUs of at most :data:`SEND_PDU_CAP` bytes (0, "unlimited", included).

    The negotiated value is only read by pynetdicom's DIMSE layer to size what it sends; a PDU
    shorter than the peer's maximum is always allowed (PS3.8 D.1).
    """
    for item in assoc.acceptor.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max = item.maximum_length_received
            if not peer_max or peer_max > SEND_PDU_CAP:
                item.maximum_length_received = SEND_PDU_CAP


def _wait_for_room(assoc: Any, pending: queue.Queue[Any], depth: int) -> None:
    """Wait until *pending* is down to half of *depth* primitives (then the reader fills it
    again in one go, rather than waking for every PDU sent); raise :class:`SendAborted` (the
    association aborted) if it ended or the peer took nothing for the DIMSE timeout."""
    patience = assoc.dimse_timeout
    ending: Ending | None = None
    with pending.not_full:  # pending.qsize() would take this same (non-reentrant) lock
        size = len(pending.queue)
        progress = time.monotonic()
        while size > depth // 2:
            ending = _send_blocked_by(assoc)
            if ending is not None:
                break
            pending.not_full.wait(SEND_WAIT_POLL)
            now = time.monotonic()
            if len(pending.queue) < size:
                progress = now
            elif patience is not None and now - progress > patience:
                ending = Ending(
                    f"the peer took no data for {patience:g} s while we sent", Cause.OUTAGE
                )
                break
            size = len(pending.queue)
        if ending is not None:
            # The rest of the message will never be wanted. Only the head may stay: the DUL
            # thread may have seen it and be about to take it (its get would fail on nothing).
            for _ in range(len(pending.queue) - 1):
                pending.queue.pop()
    if ending is None:
        return
    _end(assoc, ending.reason, ending.cause)
    _abort_mid_message(assoc)
    raise SendAborted(ending.reason)


def _abort_mid_message(assoc: Any) -> None:
    """Abort *assoc*, whose DUL thread may be stuck sending to a peer that takes nothing.

    Half a message can only be followed by an A-ABORT. pynetdicom's ``abort()`` waits for its
    DUL thread to finish, which never happens while that thread is blocked in a send: if the
    abort is not done within :data:`ABORT_GRACE` seconds, the socket is shut down under it (the
    send then fails, and pynetdicom winds up as for a connection reset).
    """
    if not assoc.is_established:
        assoc._reactor_checkpoint.set()  # pynetdicom paused it for the request: let it wind up
        return
    watchdog = threading.Timer(ABORT_GRACE, _shut_down, [assoc])
    watchdog.daemon = True
    watchdog.start()
    try:
        assoc.abort()
    finally:
        watchdog.cancel()


def _shut_down(assoc: Any) -> None:
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _send_blocked_by(assoc: Any) -> Ending | None:
    """Why nothing more will leave *assoc*'s send queue, or None while it may."""
    ending = ended(assoc)
    if ending is not None:
        return ending
    if assoc.is_aborted or not assoc.is_established:
        return Ending("the association ended while we sent", Cause.OUTAGE)
    if not assoc.dul.is_alive():
        return Ending("the connection was lost while we sent", Cause.OUTAGE)
    return None


def _tls_failure(error: BaseException) -> str:
    """A failed TLS handshake: the certificates or the PACS's TLS settings must change."""
    return (
        f"TLS handshake failed ({tls.describe_error(error)}); check the tls certificate, key "
        "and ca of this PACS in the configuration, and that it speaks DICOM TLS on this port"
    )


def _failure_reason(assoc: Any, peer: Endpoint, connected: bool) -> tuple[str, Cause]:
    if not connected:
        return (
            f"no connection (refused, or no answer within {peer.connect_timeout:g} s); "
            "is the PACS running and its host and port right?",
            Cause.OUTAGE,
        )
    if assoc.is_rejected:
        primitive = getattr(assoc.acceptor, "primitive", None)
        if primitive is not None:
            # A transient rejection (e.g. its association limit) is the peer being busy.
            cause = Cause.OUTAGE if primitive.result == _REJECTED_TRANSIENT else Cause.REFUSAL
            return (
                f"association rejected ({primitive.result_str}, {primitive.source_str}: "
                f"{primitive.reason_str}); check that it knows our AE title",
                cause,
            )
        return "association rejected; check that it knows our AE title", Cause.REFUSAL
    if assoc.is_aborted:
        ending = ended(assoc)
        if ending is not None and ending.cause is Cause.OUTAGE:
            # Closed without an answer (e.g. the PACS stopping while we asked): wait for it.
            return f"{ending.reason} before answering the association request", Cause.OUTAGE
        why = ending.reason if ending else "association aborted by the peer"
        return (
            f"{why}; no presentation context accepted, or our AE title not allowed there?",
            Cause.REFUSAL,
        )
    return f"no association response within {assoc.acse_timeout:g} s", Cause.OUTAGE


#: A-ASSOCIATE-RJ result "rejected-transient".
_REJECTED_TRANSIENT = 0x02
