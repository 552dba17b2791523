"""A malformed DIMSE command ends its association, not pynetdicom's network thread.

pynetdicom decodes each command set inside its DUL thread. A C-STORE request without an
Affected SOP Instance UID (or another command it cannot use) raised there: the thread died with a
raw traceback, the peer never got an answer and waited out its own timeout, and the spool file
pynetdicom had just opened stayed until the next restart. :func:`install` wraps
``DIMSEMessage.decode_msg`` (pynetdicom 3.0) once per process, like :mod:`anonpipe.scp.spool`'s
swap: an exception while decoding deletes that message's spool file, aborts the association (the
peer gets an A-ABORT at once) and is reported through the installed callback, without values.
Our requestor associations go through the same decoder: a malformed response aborts them too,
which their waiting request then reports (:func:`anonpipe.scu.association.ended`).

pynetdicom's upper-layer state machine likewise raises ``InvalidEventError`` inside its network
thread when a hostile peer's PDUs arrive in an order PS3.8 does not allow (an A-ASSOCIATE-RQ in
the middle of an association, data after an A-RELEASE): the thread died with a raw traceback
and left the connection open. The same :func:`install` makes such an event close that
connection instead (as PS3.8's "invalid event" actions do), so its association ends cleanly.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anonpipe.logs import get_logger
from anonpipe.scp.spool import SpoolFile

__all__ = ["MALFORMED_COMMAND", "install"]

log = get_logger(__name__)

#: The reason counted (``anonpipectl status``, refused) for such an association.
MALFORMED_COMMAND = "malformed DIMSE command: association aborted"


def _ignore(_assoc: Any) -> None:
    """The callback until :func:`install` sets one."""


_lock = threading.Lock()
_on_malformed: Callable[[Any], None] = _ignore
_installed = False


def install(on_malformed: Callable[[Any], None]) -> None:
    """Guard pynetdicom's command decoding; `on_malformed(assoc)` is told of each case."""
    global _on_malformed, _installed
    from pynetdicom.dimse_messages import DIMSEMessage

    with _lock:
        _on_malformed = on_malformed
        if _installed:
            return
        decode = DIMSEMessage.decode_msg

        def guarded(message: Any, primitive: Any, assoc: Any = None) -> bool:
            try:
                return bool(decode(message, primitive, assoc))
            except Exception as exc:  # a peer's bytes: any type at all
                _drop(message, assoc, exc)
                return False

        setattr(DIMSEMessage, "decode_msg", guarded)  # noqa: B010
        _guard_state_machine()
        _installed = True


def _guard_state_machine() -> None:
    from pynetdicom.fsm import StateMachine

    act = StateMachine.do_action

    def do_action(machine: Any, event: str) -> None:
        try:
            act(machine, event)
        except Exception as exc:  # InvalidEventError, or a hostile PDU's ValueError (context 0)
            dul = machine.dul
            log.warning(
                "DICOM event the state machine cannot take; connection closed",
                dicom_event=event,
                state=machine.current_state,
                error=type(exc).__name__,
            )
            dul.kill_dul()
            socket = getattr(dul, "socket", None)
            if socket is not None:
                with contextlib.suppress(Exception):
                    socket.close()

    setattr(StateMachine, "do_action", do_action)  # noqa: B010


def _drop(message: Any, assoc: Any, exc: Exception) -> None:
    spool = getattr(message, "_data_set_file", None)
    if isinstance(spool, SpoolFile):
        spool.close()
        Path(spool.name).unlink(missing_ok=True)
    message._data_set_file = None
    peer = getattr(getattr(assoc, "requestor", None), "ae_title", None)
    log.warning("malformed DIMSE command; association aborted", error=type(exc).__name__, peer=peer)
    if assoc is None:
        return
    _on_malformed(assoc)
    # We are in pynetdicom's DUL thread, which abort() waits for: abort from another thread.
    threading.Thread(target=assoc.abort, name="abort-malformed", daemon=True).start()
