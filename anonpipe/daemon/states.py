"""The states of a run and of its studies, and what each kind of study failure means.

State names are the strings stored in state.db and shown by ``anonpipectl status``: they are
:class:`~enum.StrEnum` members, so a stored value reads back as the member and compares equal to
its text. What happens after a study fails is decided by its :class:`Failure` (data: whether it is
written back to the review DB), never by the wording of the reason an operator reads.
"""

from __future__ import annotations

from enum import Enum, StrEnum

__all__ = ["RUN_PHASES", "Failure", "RunState", "StepMark", "StudyState"]


class RunState(StrEnum):
    """Where a run is. The phases come in :data:`RUN_PHASES` order; ``stopped`` (pause,
    shutdown, a PACS or the disk to wait for) and ``failed`` are resumable by ``restart-run``.

    With a per-study hook the studies flow through their own steps side by side, and the run's
    phase is that of its least advanced study: ``pulling`` while any study is still to be
    pulled, ``pushing`` while any is still to be pushed.
    """

    SELECTING = "selecting"
    PULLING = "pulling"
    CHECKING = "checking"
    HOOKING = "hooking"
    PUSHING = "pushing"
    WRITING_BACK = "writing_back"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """Done or failed: nothing resumes it without an operator."""
        return self in (RunState.DONE, RunState.FAILED)


#: The run's phases in order (a resumed run continues at its first unfinished one).
RUN_PHASES: tuple[RunState, ...] = (
    RunState.SELECTING,
    RunState.PULLING,
    RunState.CHECKING,
    RunState.HOOKING,
    RunState.PUSHING,
    RunState.WRITING_BACK,
    RunState.DONE,
)


class StudyState(StrEnum):
    """Where one study of a run is, in order; ``held`` and the failures end it early."""

    SELECTED = "selected"
    PULLING = "pulling"
    DEIDENTIFIED = "deidentified"
    #: Its per-study hook ran (a per-run hook moves every study at once, from deidentified).
    HOOKED = "hooked"
    PUSHING = "pushing"
    VERIFIED = "verified"
    PUBLISHED = "published"
    PRACTICED = "practiced"
    HELD = "held"
    FAILED = "failed"
    #: Failed, and the failure was written back to the review DB.
    FAILED_REPORTED = "failed-reported"

    @property
    def rank(self) -> int:
        """How far along the study is (a resumed study never goes back): for progress."""
        return _RANK[self]

    @property
    def to_pull(self) -> bool:
        return self in (StudyState.SELECTED, StudyState.PULLING)

    @property
    def to_push(self) -> bool:
        """De-identified (and hooked) but not yet in the research PACS for good."""
        return self in (StudyState.DEIDENTIFIED, StudyState.HOOKED, StudyState.PUSHING)


class StepMark(StrEnum):
    """A moment inside one study state that the state store records beside the state changes
    (table ``study_steps``), so that the parts of a step can be timed apart. Not a state: a
    study is never *in* a mark."""

    #: Its C-MOVE ended (``pulling``): from here the files that landed are de-identified.
    MOVED = "moved"
    #: Its push ended (``pushing``): from here the research PACS is asked what it holds.
    VERIFYING = "verifying"


_RANK = {
    StudyState.HELD: 0,
    StudyState.SELECTED: 0,
    StudyState.PULLING: 1,
    StudyState.DEIDENTIFIED: 2,
    StudyState.HOOKED: 3,
    StudyState.PRACTICED: 4,
    StudyState.PUSHING: 4,
    StudyState.FAILED: 5,
    StudyState.VERIFIED: 5,
    StudyState.PUBLISHED: 6,
    StudyState.FAILED_REPORTED: 6,
}


class Failure(Enum):
    """Why a study failed, and whether an operator in the review app must see it.

    A reported failure is written back (``processing_error``) and the study is not picked again;
    an unreported one is the staging PACS's passing trouble: the study waits out a back-off and
    is tried again in a later run.
    """

    NEVER_FOUND = ("never found", True, True)
    ALL_QUARANTINED = ("every file quarantined", True, True)
    PUSH_REFUSED = ("push failed", True, False)
    VERIFICATION = ("verification failed", True, False)
    PULL_INCOMPLETE = ("pull incomplete", False, True)
    STAGING_REFUSED = ("staging PACS unavailable", False, True)

    def __init__(self, label: str, reported: bool, before_hook: bool) -> None:
        self.label = label
        #: Written back to the review DB (and then never retried by anonpipe).
        self.reported = reported
        #: Failed before the study reached its hook.
        self.before_hook = before_hook
