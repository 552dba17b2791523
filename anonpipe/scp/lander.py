"""Land one received object: check it, then move its file into the expecting pull's folder.

pynetdicom has already streamed the object, preamble and file meta included, into a temporary
file (see :func:`anonpipe.dimse.configure_transfer`). Landing reads only the UIDs it needs from
the first bytes of that file (:mod:`anonpipe.scp.uids`; pydicom only when that cannot tell),
refuses what must not enter a run, and otherwise renames the file atomically to
``<landing folder>/<SOP Instance UID>.dcm`` before the caller answers success: a torn file never
appears under its final name. Nothing is fsynced per object (an object lost to a power cut is
pulled again from the staging PACS); the pull's caller makes the whole landing folder durable
once per study (:func:`anonpipe.durable.sync_folder`). The data set is never decoded and never
held in memory.

Every refusal is a :class:`Refused` carrying the status to answer; the handler turns it into
the response in one place.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from pathlib import Path

from anonpipe.dimse import Status, is_valid_uid
from anonpipe.durable import free_bytes, move_file
from anonpipe.headers import read_header, text_value
from anonpipe.scp.landing import Arrival, Landing, LandingRegistry, Tally
from anonpipe.scp.spool import BelowFloor
from anonpipe.scp.uids import read_head, scan

__all__ = ["Lander", "Refused", "StoreRequest"]

#: Read from each header; the data set is not parsed past Series Instance UID.
_UIDS = {
    "sop_class": "SOPClassUID",
    "sop": "SOPInstanceUID",
    "study": "StudyInstanceUID",
    "series": "SeriesInstanceUID",
}
BELOW_FLOOR = "landing filesystem below its free-space floor"
#: Errors that mean "no space left": answered with Out of Resources, not a crash.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class Refused(Exception):
    """The object is not stored: answer *status*; *reason* is short, fixed text (no PHI)."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """What the SCP knows about one C-STORE before looking inside the object."""

    temp_path: Path
    affected_sop_instance_uid: str
    calling_ae: str
    association_id: int
    move_originator_ae: str | None = None
    move_originator_message_id: int | None = None
    #: Set when writing the spool file failed (a full disk): the object is incomplete.
    write_error: OSError | None = None
    #: The negotiated transfer syntax of the data set ("" when unknown: pydicom reads it).
    transfer_syntax: str = ""


class Lander:
    """Lands objects for the pulls registered in *registry*; counts what it did.

    Parameters
    ----------
    registry : LandingRegistry
        The studies currently expected.
    min_free_bytes : int
        Refuse with Out of Resources when the landing filesystem would have less than this free
        after the object: a full disk must not be discovered by the de-identifier or the audit.
    """

    def __init__(self, registry: LandingRegistry, min_free_bytes: int = 0) -> None:
        self.registry = registry
        self.min_free_bytes = min_free_bytes
        self.landed = Tally()
        #: Bytes of the objects landed (files as received, file meta included), by calling AE.
        self.landed_bytes = Tally()
        self.refused = Tally()

    def land(self, request: StoreRequest) -> Arrival:
        """Check and land the object in ``request.temp_path``; return where it went.

        Raises
        ------
        Refused
            With the status to answer; nothing was stored.
        OSError
            If the filesystem failed; nothing was stored (out-of-space errors become
            :class:`Refused` with Out of Resources).
        """
        landing: Landing | None = None
        try:
            below_floor = isinstance(request.write_error, BelowFloor)
            if request.write_error is not None and not below_floor:
                raise request.write_error
            if below_floor:  # the spool kept the header: count it against its study
                with contextlib.suppress(Refused):
                    uids = _read_uids(request.temp_path, request.transfer_syntax)
                    study_uid = uids.get("study", "")
                    landing = self.registry.get(study_uid) if is_valid_uid(study_uid) else None
                if landing is not None:
                    landing.adopt_log_context()
                raise Refused(Status.OUT_OF_RESOURCES, BELOW_FLOOR)
            uids = _read_uids(request.temp_path, request.transfer_syntax)
            study_uid = uids.get("study", "")
            if not is_valid_uid(study_uid):
                raise Refused(Status.CANNOT_UNDERSTAND, "Study Instance UID is not a valid UID")
            landing = self.registry.get(study_uid)
            if landing is None:
                raise Refused(Status.REFUSED_NOT_AUTHORIZED, "unsolicited: no pull expects it")
            landing.adopt_log_context()
            arrival = self._move_into(landing, request, uids)
        except Refused as refusal:
            if landing is not None:
                landing.record_refusal()
            self.refused.add(refusal.reason)
            raise
        except OSError as exc:
            if landing is not None:
                landing.record_refusal()
            reason = "no space left on the landing filesystem" if exc.errno in _NO_SPACE else ""
            self.refused.add(reason or "filesystem error")
            if reason:
                raise Refused(Status.OUT_OF_RESOURCES, reason) from exc
            raise
        self.landed.add(request.calling_ae)
        self.landed_bytes.add(request.calling_ae, arrival.size)
        landing.record(arrival, request.association_id)
        return arrival

    def _move_into(self, landing: Landing, request: StoreRequest, uids: dict[str, str]) -> Arrival:
        sop_uid = uids.get("sop", "")
        series_uid = uids.get("series", "")
        if not (is_valid_uid(sop_uid) and is_valid_uid(series_uid)):
            raise Refused(Status.CANNOT_UNDERSTAND, "SOP or Series Instance UID is not a valid UID")
        if sop_uid != request.affected_sop_instance_uid.strip():
            raise Refused(Status.DATASET_MISMATCH, "SOP Instance UID differs from the request")
        size = request.temp_path.stat().st_size
        if self.min_free_bytes and free_bytes(landing.directory) - size < self.min_free_bytes:
            raise Refused(Status.OUT_OF_RESOURCES, BELOW_FLOOR)
        dest = landing.directory / f"{sop_uid}.dcm"
        # Atomic, not fsynced: the runner syncs the landing folder once per study.
        move_file(request.temp_path, dest, flush=False)
        return Arrival(
            path=dest,
            study_uid=landing.study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=uids.get("sop_class", ""),
            size=size,
            calling_ae=request.calling_ae,
            move_originator_ae=request.move_originator_ae,
            move_originator_message_id=request.move_originator_message_id,
        )


def _read_uids(path: Path, transfer_syntax: str = "") -> dict[str, str]:
    """The four UIDs of the header, as text; only the header is read.

    From the file's first bytes when :func:`~anonpipe.scp.uids.scan` can tell, else by pydicom.
    """
    if transfer_syntax:
        try:
            scanned = scan(read_head(path), transfer_syntax)
        except OSError:
            scanned = None
        if scanned is not None:
            return scanned
    header = read_header(path, list(_UIDS.values()))
    if header is None:
        raise Refused(Status.CANNOT_UNDERSTAND, "unreadable header")
    found = {name: text_value(header, keyword) for name, keyword in _UIDS.items()}
    return {name: value for name, value in found.items() if value is not None}
