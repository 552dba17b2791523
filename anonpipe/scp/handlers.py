"""The SCP's pynetdicom event handlers: thin, with their dependencies bound as ``args``.

Contracts (one place for each):

- ``EVT_REQUESTED`` → :func:`on_requested`: reject (A-ASSOCIATE-RJ, permanent, service user) any
  association that does not call our AE title or comes from a peer not allowed from its address,
  and (transient, local limit exceeded) an allowed one when all slots are taken.
- ``EVT_CONN_OPEN`` / ``EVT_CONN_CLOSE`` → :class:`~anonpipe.scp.connections.ConnectionGuard`:
  the limits on every connection (time to associate, read timeout, PDU length, per host).
- ``EVT_C_STORE`` → :func:`on_c_store`: answer 0x0000 once the object is under its final name
  in a pull's landing folder (renamed atomically; made durable per study by the pull's caller);
  otherwise a failure status from :class:`~anonpipe.scp.lander.Refused`, 0xA700
  when out of space, 0x0110 for anything unexpected. Never raises.
- ``EVT_C_ECHO``: pynetdicom's default (success), reachable only by allowed peers.
- ``EVT_CONN_CLOSE`` → :func:`on_closed`: an object whose transfer the connection cut is deleted
  from the spool (:func:`~anonpipe.scp.spool.discard_unfinished`); the sender never got a success
  for it.

Logs carry AE titles, addresses and reasons; never UIDs or other header values. Once an object
of a pull landed, the association's lines carry that pull's run, study and step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anonpipe.dimse import Status
from anonpipe.logs import get_logger, share_context
from anonpipe.scp.connections import LIMIT_REACHED, ConnectionGuard
from anonpipe.scp.lander import Lander, Refused, StoreRequest
from anonpipe.scp.landing import Tally
from anonpipe.scp.peers import PeerPolicy
from anonpipe.scp.spool import discard_unfinished, spool_error

__all__ = ["on_c_store", "on_closed", "on_requested"]

log = get_logger(__name__)

#: A-ASSOCIATE-RJ result "rejected-permanent" and source "DICOM UL service-user".
_REJECTED_PERMANENT = 0x01
_SERVICE_USER = 0x01
#: A-ASSOCIATE-RJ rejected-transient, service-provider (presentation), local-limit-exceeded.
_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


def on_requested(event: Any, policy: PeerPolicy, rejections: Tally, guard: ConnectionGuard) -> None:
    """Reject the association unless the peer policy allows it and a slot is free (allowed
    peers' accepted associations only count, :class:`ConnectionGuard`); count the rejection."""
    requestor = event.assoc.requestor
    called = str(requestor.primitive.called_ae_title)
    calling = str(requestor.primitive.calling_ae_title)
    rejection = policy.check(called, calling, str(requestor.address))
    if rejection is None:
        if guard.admit(event.assoc, event.assoc.ae.acse_timeout):
            return
        reason, answer = LIMIT_REACHED, _LIMIT_EXCEEDED
    else:
        guard.rejected(event.assoc)
        reason, answer = rejection.message, (_REJECTED_PERMANENT, _SERVICE_USER, rejection.reason)
    rejections.add(reason)
    log.warning(
        "association rejected",
        reason=reason,
        calling_ae=calling,
        called_ae=called,
        peer_address=str(requestor.address),
    )
    event.assoc.acse.send_reject(*answer)
    # As pynetdicom does after its own rejections: let the DUL send the A-ASSOCIATE-RJ, then stop.
    event.assoc.kill()


def on_c_store(event: Any, lander: Lander) -> int:
    """Land the object (see :meth:`Lander.land`) and return the status to answer."""
    request = event.request
    calling = str(event.assoc.requestor.ae_title)
    try:
        temp_path = Path(event.dataset_path)
    except AttributeError:
        log.error("C-STORE data set not streamed to a file; call configure_transfer() first")
        return int(Status.PROCESSING_FAILURE)
    store = StoreRequest(
        temp_path=temp_path,
        affected_sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
        calling_ae=calling,
        association_id=id(event.assoc),
        move_originator_ae=_text(request.MoveOriginatorApplicationEntityTitle),
        move_originator_message_id=request.MoveOriginatorMessageID,
        write_error=spool_error(request),
        transfer_syntax=_transfer_syntax(event),
    )
    try:
        lander.land(store)
    except Refused as refusal:
        log.warning(
            "object refused",
            reason=refusal.reason,
            status=f"0x{refusal.status:04X}",
            calling_ae=calling,
        )
        return int(refusal.status)
    except OSError as exc:
        log.error("object not stored: filesystem error", error=exc.strerror, calling_ae=calling)
        return int(Status.PROCESSING_FAILURE)
    except Exception:
        log.exception("object not stored: unexpected error", calling_ae=calling)
        return int(Status.PROCESSING_FAILURE)
    finally:
        # The object's pull (if one expects it) is now this thread's log context: the DUL
        # thread reading the association's next PDUs logs as part of it too.
        share_context(getattr(event.assoc, "dul", None))
    return int(Status.SUCCESS)


def _transfer_syntax(event: Any) -> str:
    """The transfer syntax negotiated for the request's presentation context ("" if unknown)."""
    try:
        return str(event.context.transfer_syntax)
    except AttributeError:
        return ""


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip() or None


def on_closed(event: Any) -> None:
    """Delete the partial object an interrupted transfer left in the spool."""
    if discard_unfinished(event.assoc):
        log.warning(
            "connection closed during a transfer: the partial object was discarded",
            calling_ae=str(event.assoc.requestor.ae_title),
            peer_address=str(event.assoc.requestor.address),
        )
