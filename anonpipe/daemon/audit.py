"""What the audit trail says: every line anonpipe writes into a run directory, in one place.

overview.txt keeps the old pipeline's exact wording (operators and their scripts read it); the
other files (pull_output.txt, anonymize_output.txt, push_output.txt, post_anon_output.txt) have
one tab-separated line per study and per file that went wrong. The failure reasons stored in
state.db, shown by status and written back to the review DB are built here too. Nothing here
takes a patient's data: review ids, counts, cleaned UIDs, reasons made by anonpipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

__all__ = [
    "FinishedPush",
    "PulledStudy",
    "all_quarantined",
    "anonymized",
    "comments_lines",
    "duplicates_written_once",
    "file_not_clean",
    "finished_at",
    "held_back",
    "hook_failed",
    "hooked",
    "identity_line",
    "identity_notes",
    "never_found",
    "not_pulled",
    "protocol_missing",
    "protocol_summary",
    "pull_incomplete",
    "pull_refused",
    "pull_waiting",
    "push_completed",
    "push_file_failed",
    "push_refused",
    "push_waiting",
    "pushed",
    "received",
    "staging_unavailable",
    "starting",
    "study_report",
    "valid_reviewed",
    "verification_failed",
    "verified",
]

_LINE_BREAKS = ("\n", "\r")


def starting(at: datetime) -> str:
    """``Starting at 2013-05-03 08:00``."""
    return f"Starting at {at:%Y-%m-%d %H:%M}"


def valid_reviewed(studies: int) -> str:
    """``100 valid reviewed studies. Please review comments.txt``."""
    return f"{studies} valid reviewed studies. Please review comments.txt"


def held_back(studies: int) -> str:
    """``2 studies held back: their reviews conflict, see comments.txt`` (new in anonpipe)."""
    return f"{studies} studies held back: their reviews conflict, see comments.txt"


def received(files: int, studies: int) -> str:
    """``Received 23948 files containing 100 studies``."""
    return f"Received {files} files containing {studies} studies"


def not_pulled(studies: int) -> str:
    """``1 studies could not be pulled, see pull_output.txt`` (new in anonpipe)."""
    return f"{studies} studies could not be pulled, see pull_output.txt"


def protocol_summary(marked: int, found: int) -> str:
    """``1 studies marked as having a protocol series, 1 studies found with ...``."""
    return (
        f"{marked} studies marked as having a protocol series, "
        f"{found} studies found with protocol series during anonymization."
    )


def protocol_missing(missing: int) -> str:
    """``1 studies marked as having a protocol series but not found, see '...'.``."""
    return (
        f"{missing} studies marked as having a protocol series but not found, "
        "see 'missing_protocol_studies.txt'."
    )


def hooked(files: int, studies: int) -> str:
    """``22755 files containing 96 studies were successfully hooked up to an encounter.``."""
    return (
        f"{files} files containing {studies} studies were successfully hooked up to an encounter."
    )


def hook_failed(reason: str) -> str:
    """``The post-anonymization hook failed: HookError: …`` (the run stops; its output file is
    left to the hook run that succeeds, after ``restart-run``)."""
    return f"The post-anonymization hook failed: {reason}"


def push_completed(at: datetime) -> str:
    """``Push completed at 2013-05-03 15:15``."""
    return f"Push completed at {at:%Y-%m-%d %H:%M}"


def pushed(studies: int) -> str:
    """``96 studies marked as pushed``."""
    return f"{studies} studies marked as pushed"


# --------------------------------------------------------------------------- comments.txt


def comments_lines(entries: Iterable[tuple[str, Sequence[str], str | None]]) -> list[str]:
    """The lines of comments.txt: each study UID, then its reviewers' comments.

    Parameters
    ----------
    entries : iterable of (str, sequence of str, str or None)
        Study Instance UID, reviewer comments, and the reason the study is held back (None if it
        is not).

    Returns
    -------
    list of str
        Per study: the UID (``<uid>\\tHELD BACK: <reason>`` for a held study), then every line
        of every comment prefixed by a tab. Empty comments are left out; a reason's line breaks
        become spaces.

    Raises
    ------
    ValueError
        For a UID holding a tab or a line break (it would break the file's layout).
    """
    lines: list[str] = []
    for uid, comments, held in entries:
        if any(c in uid for c in ("\t", *_LINE_BREAKS)):
            raise ValueError("a study UID in comments.txt may not contain a tab or a line break")
        lines.append(uid if held is None else f"{uid}\tHELD BACK: {' '.join(held.splitlines())}")
        for comment in comments:
            lines.extend(f"\t{part}" for part in comment.splitlines())
    return lines


def finished_at(at: datetime) -> str:
    """done.txt: ``Finished at 2013-05-03 15:20``."""
    return f"Finished at {at:%Y-%m-%d %H:%M}"


# ---------------------------------------------------------------------------- pull_output.txt


def pull_waiting(review_id: int, why: str) -> str:
    """The staging PACS is down or silent: the study waits (left ``pulling``)."""
    return f"{review_id}\twaiting: {why}"


def pull_refused(review_id: int, why: str) -> str:
    """The staging PACS refused the query or the move: the study failed this run."""
    return f"{review_id}\tnot pulled: {why}"


@dataclasses.dataclass(frozen=True, slots=True)
class PulledStudy:
    """How a study's C-MOVE ended (the counts the staging PACS reported and what landed)."""

    review_id: int
    status: str
    expected: int | None
    completed: int
    failed: int
    landed: int
    detail: str = ""

    def line(self) -> str:
        """``<id>\\t<status>\\texpected N\\tcompleted N\\tfailed N\\tlanded N[\\t<detail>]``."""
        return (
            f"{self.review_id}\t{self.status}\texpected {self.expected}"
            f"\tcompleted {self.completed}\tfailed {self.failed}\tlanded {self.landed}"
            + (f"\t{self.detail}" if self.detail else "")
        )


# ------------------------------------------------------------------------ anonymize_output.txt


def file_not_clean(review_id: int, status: str, output: str | None, reason: str | None) -> str:
    """One quarantined (or otherwise not clean) file: its status, quarantine name and reason."""
    return f"{review_id}\t{status}\t{output or '-'}\t{reason}"


def duplicates_written_once(review_id: int, files: int) -> str:
    return (
        f"{review_id}\tduplicate\t{files} files repeated an object already written (same SOP"
        " Instance UID and content): written once"
    )


def identity_line(review_id: int, notes: str) -> str:
    return f"{review_id}\tpatient identity\t{notes}"


def anonymized(review_id: int, files: int, clean: int, quarantined: int, duplicates: int) -> str:
    """``<review id>\\tN files: N clean, N quarantined[, N duplicates]``."""
    return f"{review_id}\t{files} files: {clean} clean, {quarantined} quarantined" + (
        f", {duplicates} duplicates" if duplicates else ""
    )


def identity_notes(disagreements: Mapping[str, int]) -> str | None:
    """The note on objects of one study that name their patient differently, or None.

    Attribute names and counts only: the values are the patient's identity.
    """
    if not disagreements:
        return None
    listed = ", ".join(f"{name} ({count} files)" for name, count in sorted(disagreements.items()))
    return (
        "objects differ from the study's first object in "
        f"{listed}; all got the study's pseudonyms (check the staging PACS's patient records)"
    )


# ----------------------------------------------------------------------------- push_output.txt


def push_waiting(study_uid: str, unsent: int, files: int, why: str) -> str:
    """The research PACS is down or silent: the study waits (left ``pushing``)."""
    return f"{study_uid}\twaiting\t{unsent} of {files} files not stored yet: {why}"


def push_file_failed(study_uid: str, name: str, error: str) -> str:
    return f"{study_uid}\tfailed\t{name}\t{error}"


@dataclasses.dataclass(frozen=True, slots=True)
class FinishedPush:
    """A study's push as it ended: how many files are in the research PACS, of how many."""

    study_uid: str
    pushed: int
    files: int
    already: int

    @property
    def prefix(self) -> str:
        """The line's start, the same whatever a resumed push found already there."""
        return f"{self.study_uid}\t{self.pushed} of {self.files} files in the research PACS"

    def line(self) -> str:
        return f"{self.prefix} ({self.already} were already there)"


def verified(study_uid: str, found: int | None, files: int, state: str) -> str:
    return f"{study_uid}\tverified: {found} of {files}\t{state}"


# ------------------------------------------------- failure reasons (state.db, status, review DB)


def never_found() -> str:
    return "never found in the staging PACS"


def pull_incomplete(status: str, detail: str) -> str:
    return f"pull {status}: {detail}"


def staging_unavailable(why: str) -> str:
    return f"staging PACS unavailable: {why}"


def all_quarantined(reasons: Iterable[tuple[str, int]]) -> str:
    """``every file was quarantined (3 residual PHI, 1 not DICOM)``, most frequent first."""
    listed = ", ".join(f"{n} {why}" for why, n in reasons)
    return f"every file was quarantined ({listed})"


def push_refused(unsent: int, files: int, why: str) -> str:
    return f"push failed after retries: {unsent} of {files} files not stored ({why})"


def verification_failed(found: int | None, files: int, error: str) -> str:
    return f"verification failed: the research PACS holds {found} of {files} instances" + (
        f": {error}" if error else ""
    )


# ------------------------------------------------------------------- post_anon_output.txt


def study_report(
    study_uid: str, series: int, images: int, modality: str | None, sop_class: str | None
) -> str:
    """The default hook's line per study: ``<uid>\\tN series\\tN images\\t<modality>\\t<class>``."""
    return f"{study_uid}\t{series} series\t{images} images\t{modality or ''}\t{sop_class or ''}"
