"""C-FIND (Study Root): how many series and instances a PACS holds for one study.

Used before a pull (what to expect from staging) and after a push (what research confirms).
Study-level identifiers carry the Study Instance UID only: Orthanc matches on Accession Number
instead when that key is present at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.presentation import build_context

from anonpipe.config import LocalSettings
from anonpipe.dimse import STUDY_ROOT_FIND, Endpoint, is_valid_uid, status_category
from anonpipe.logs import share_context
from anonpipe.scu.association import Cause, associate, describe

__all__ = ["QueryFailed", "StudyCount", "count_study", "list_instances"]

_MODEL = STUDY_ROOT_FIND


class QueryFailed(RuntimeError):
    """The peer answered the C-FIND with a failure (a refusal), or stopped answering (an
    outage): ``cause``."""

    def __init__(self, message: str, cause: Cause) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True, slots=True)
class StudyCount:
    """What a PACS holds for one study (``series`` is None when the PACS did not say)."""

    instances: int
    series: int | None


def count_study(local: LocalSettings, peer: Endpoint, study_uid: str) -> StudyCount | None:
    """The study's instance (and series) count on *peer*, or None when it has no such study.

    Asks for Number of Study Related Instances / Series; a PACS that leaves them empty is asked
    again at IMAGE level and the instances are counted. A PACS that files one study under
    several patients (Orthanc does when objects of the study disagree on Patient ID) answers one
    match per patient: their counts are summed, as a C-MOVE of the study sends them all.

    Raises
    ------
    PeerUnavailable
        If no association could be made.
    QueryFailed
        If the peer answered with a failure status or not at all.
    """
    _check_uid(study_uid)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.NumberOfStudyRelatedSeries = None
    query.NumberOfStudyRelatedInstances = None
    matches = list(_find(local, peer, query))
    if not matches:
        return None
    counts = [_as_int(m.get("NumberOfStudyRelatedInstances")) for m in matches]
    series_counts = [_as_int(m.get("NumberOfStudyRelatedSeries")) for m in matches]
    if any(count is None for count in counts):
        instances = len(list_instances(local, peer, study_uid))
    else:
        instances = sum(count for count in counts if count is not None)
    series = None if None in series_counts else sum(c for c in series_counts if c is not None)
    return StudyCount(instances, series)


def list_instances(local: LocalSettings, peer: Endpoint, study_uid: str) -> set[str]:
    """The SOP Instance UIDs *peer* holds for the study (IMAGE-level C-FIND)."""
    _check_uid(study_uid)
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = None
    query.SOPInstanceUID = None
    return {
        str(match.SOPInstanceUID)
        for match in _find(local, peer, query)
        if match.get("SOPInstanceUID")
    }


def _find(local: LocalSettings, peer: Endpoint, query: Dataset) -> Iterator[Dataset]:
    with associate(local, peer, [build_context(_MODEL)]) as assoc:
        # pynetdicom's threads serving the association log with our fields
        share_context(assoc, getattr(assoc, "dul", None))
        responses = list(assoc.send_c_find(query, _MODEL))
    for status, identifier in responses:
        code = status.get("Status") if status else None
        if code is None:
            raise QueryFailed(
                f"{describe(peer)}: C-FIND got no response (timeout or abort)", Cause.OUTAGE
            )
        category = status_category(int(code))
        if category == "pending" and identifier is not None:
            yield identifier
        elif category not in ("success", "pending"):
            raise QueryFailed(
                f"{describe(peer)}: C-FIND answered status 0x{int(code):04X}", Cause.REFUSAL
            )


def _as_int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_uid(study_uid: str) -> None:
    if not is_valid_uid(study_uid):
        raise ValueError("study_uid is not a valid UID (digits and dots, at most 64)")
