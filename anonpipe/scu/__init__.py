"""DICOM clients: C-ECHO, C-FIND, the C-MOVE pull (with arrival accounting) and the C-STORE push.

Knows DICOM networking and files; nothing of de-identification. The pull counts arrivals through
the SCP's :class:`~anonpipe.scp.LandingRegistry`, its only link to :mod:`anonpipe.scp`.
"""

from anonpipe.scu.association import (
    Cause,
    PeerUnavailable,
    associate,
    describe,
    end_open_associations,
)
from anonpipe.scu.echo import EchoResult, echo, remote_peers
from anonpipe.scu.find import QueryFailed, StudyCount, count_study, list_instances
from anonpipe.scu.move import MisrouteError, MisrouteGuard, PullBlocked, PullResult, pull_study
from anonpipe.scu.store import (
    FileResult,
    PushItem,
    PushReport,
    StudyVerification,
    push_files,
    push_items,
    push_tree,
    read_item,
    verify_studies,
)

__all__ = [
    "Cause",
    "EchoResult",
    "FileResult",
    "MisrouteError",
    "MisrouteGuard",
    "PeerUnavailable",
    "PullBlocked",
    "PullResult",
    "PushItem",
    "PushReport",
    "QueryFailed",
    "StudyCount",
    "StudyVerification",
    "associate",
    "count_study",
    "describe",
    "echo",
    "end_open_associations",
    "list_instances",
    "pull_study",
    "push_files",
    "push_items",
    "push_tree",
    "read_item",
    "remote_peers",
    "verify_studies",
]
