"""Opening an association to a peer, with our limits and an error that says what went wrong.

Every client in :mod:`anonpipe.scu` goes through :func:`associate`: one place that applies the
``[local]`` timeouts and PDU size (pynetdicom's ``ae.maximum_pdu_size`` is ignored for requestors,
so it is passed to ``associate`` as well), a connection timeout (pynetdicom has none by default),
and turns "not established" into :class:`PeerUnavailable` naming the peer and the cause. It also
closes a race in pynetdicom's reactor that could leave a request waiting for a response that had
already arrived (:func:`_return_stolen_responses`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext

from anonpipe.config import LocalSettings
from anonpipe.dimse import Endpoint, set_nodelay

__all__ = ["PeerUnavailable", "associate", "describe"]

#: At most this many presentation contexts may be proposed in one association (PS3.8 9.3.2).
MAX_CONTEXTS = 128


class PeerUnavailable(ConnectionError):
    """No association with the peer: refused, rejected, aborted or timed out."""

    def __init__(self, peer: Endpoint, reason: str) -> None:
        super().__init__(f"{describe(peer)}: {reason}")
        self.peer_ae = peer.ae_title
        self.reason = reason


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
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        max_pdu=local.max_pdu_size,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, lambda _event: connected.append(True)),
            (evt.EVT_CONN_OPEN, set_nodelay),
        ],
    )
    if not assoc.is_established:
        raise PeerUnavailable(peer, _failure_reason(assoc, peer, bool(connected)))
    _return_stolen_responses(assoc)
    try:
        yield assoc
    except BaseException:
        if assoc.is_established:
            assoc.abort()
        raise
    if assoc.is_established:
        assoc.release()


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


def _failure_reason(assoc: Any, peer: Endpoint, connected: bool) -> str:
    if not connected:
        return (
            f"no connection (refused, or no answer within {peer.connect_timeout:g} s); "
            "is the PACS running and its host and port right?"
        )
    if assoc.is_rejected:
        primitive = getattr(assoc.acceptor, "primitive", None)
        if primitive is not None:
            return (
                f"association rejected ({primitive.result_str}, {primitive.source_str}: "
                f"{primitive.reason_str}); check that it knows our AE title"
            )
        return "association rejected; check that it knows our AE title"
    if assoc.is_aborted:
        return "association aborted by the peer (no presentation context accepted?)"
    return f"no association response within {assoc.acse_timeout:g} s"
