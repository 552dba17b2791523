"""DIMSE basics shared by the Storage SCP (:mod:`anonpipe.scp`) and the clients (:mod:`~.scu`).

Names follow the standard (PS3.7 Annex C): a status is a 16-bit code, and what a code means is
data here, read by both sides, so the SCP answers and the clients judge answers the same way.
"""

from __future__ import annotations

import contextlib
import enum
import re
import socket
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from anonpipe.config import ClientTls

__all__ = [
    "STUDY_ROOT_FIND",
    "STUDY_ROOT_MOVE",
    "VERIFICATION",
    "Endpoint",
    "Status",
    "configure_transfer",
    "is_valid_uid",
    "set_nodelay",
    "status_category",
]


#: SOP classes by UID (pynetdicom builds its named ones at run time, out of a type checker's view).
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


class Status(enum.IntEnum):
    """The status codes we answer with or test for (PS3.7 C.4.2 and Annex C)."""

    SUCCESS = 0x0000
    #: A general processing failure, for errors nobody foresaw.
    PROCESSING_FAILURE = 0x0110
    #: The calling AE may not store this object (we use it for unsolicited objects).
    REFUSED_NOT_AUTHORIZED = 0x0124
    #: Storage out of resources (disk full or below the configured free-space floor).
    OUT_OF_RESOURCES = 0xA700
    #: C-MOVE: the move destination is unknown to the peer.
    MOVE_DESTINATION_UNKNOWN = 0xA801
    #: The data set does not match the SOP class / request (for example SOP Instance UID differs).
    DATASET_MISMATCH = 0xA900
    #: Cannot understand: an unreadable header or a UID that is not a UID.
    CANNOT_UNDERSTAND = 0xC000
    CANCEL = 0xFE00
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    #: C-MOVE: finished, but some sub-operations failed or had warnings.
    WARNING_SUBOPERATIONS = 0xB000


def status_category(status: int) -> str:
    """Classify a DIMSE status: ``success``, ``warning``, ``pending``, ``cancel`` or ``failure``.

    PS3.7 Annex C: 0x0000 success; 0xFF00/0xFF01 pending; 0xFE00 cancel; 0x0001 and 0xBxxx
    warning (0x0107 and 0x0116 too); everything else is a failure.
    """
    if status == 0x0000:
        return "success"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


#: A UID as it may appear in a file name: digit groups separated by dots, at most 64 characters.
#: Leading zeros are tolerated (some modalities emit them); ``..``, ``/`` and everything else
#: that could steer a path are not.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*\Z")


def is_valid_uid(value: object) -> bool:
    """Whether *value* is safe to use as a UID, and so as a file name component."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.match(value) is not None


class Endpoint(Protocol):
    """A remote AE we associate with; ``[staging]`` and ``[research]`` settings are endpoints."""

    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def tls(self) -> ClientTls | None: ...


def set_nodelay(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler: switch Nagle off on the association's socket.

    pynetdicom never sets ``TCP_NODELAY``; without it each C-STORE waits on Nagle and delayed
    ACKs (measured: push 58 → 141 objects/s into Orthanc over loopback).
    """
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def configure_transfer() -> None:
    """Stream C-STORE data sets between files and the network instead of memory.

    pynetdicom's switches are process-wide, so they are set here, once, by whoever starts the
    SCP or a push. Receiving: each data set is written to a temporary file (``TMPDIR``) as its
    fragments arrive, so a 1 GB object never sits in memory; the SCP renames that file into
    place. Sending: a file's data set is read in chunks and sent as encoded, never decoded.
    """
    from pynetdicom import _config

    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
