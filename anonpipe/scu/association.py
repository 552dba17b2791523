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
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext

from anonpipe import tls
from anonpipe.config import LocalSettings
from anonpipe.dimse import Endpoint, set_nodelay

__all__ = [
    "Cause",
    "Ending",
    "PeerUnavailable",
    "associate",
    "describe",
    "end_open_associations",
    "ended",
]

#: At most this many presentation contexts may be proposed in one association (PS3.8 9.3.2).
MAX_CONTEXTS = 128


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
            (evt.EVT_PDU_RECV, _on_pdu),
            (evt.EVT_CONN_CLOSE, _on_close),
        ],
    )
    if not assoc.is_established:
        if handshake.error is not None:
            raise PeerUnavailable(peer, _tls_failure(handshake.error), Cause.REFUSAL)
        raise PeerUnavailable(peer, *_failure_reason(assoc, peer, bool(connected)))
    _return_stolen_responses(assoc)
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
        why = ending.reason if ending else "association aborted by the peer"
        return (
            f"{why}; no presentation context accepted, or our AE title not allowed there?",
            Cause.REFUSAL,
        )
    return f"no association response within {assoc.acse_timeout:g} s", Cause.OUTAGE


#: A-ASSOCIATE-RJ result "rejected-transient".
_REJECTED_TRANSIENT = 0x02
