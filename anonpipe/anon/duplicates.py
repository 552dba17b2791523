"""One output per SOP Instance UID in a batch or a run, judged where outcomes are collected.

Workers write in parallel, so the engine alone cannot say which of two inputs with the same SOP
Instance UID came first; the caller, which sees outcomes in a stable order, can. The engine never
overwrites an output (an identical one is reported ``duplicate``, a different one quarantined);
this judge then makes exactly one outcome per output ``clean`` (the first reported: also when a
redone file finds its own earlier output), marks the rest ``duplicate``, and quarantines an
object whose SOP Instance UID was already written under another study or series.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from anonpipe.anon.deidentify import DUPLICATE_SOP, Outcome, quarantine

__all__ = ["Duplicates"]


class Duplicates:
    """Judge outcomes in the order they are reported (see the module docstring).

    Parameters
    ----------
    quarantine_dir
        Where an object that reuses another's SOP Instance UID goes.
    written
        Outputs already counted clean (a resumed run's), by cleaned SOP Instance UID.
    """

    def __init__(self, quarantine_dir: Path, written: Mapping[str, Path] | None = None) -> None:
        self.quarantine_dir = quarantine_dir
        self._written: dict[str, Path] = dict(written or {})

    def judge(self, outcome: Outcome) -> Outcome:
        """The outcome as the batch counts it."""
        sop, output = outcome.sop_instance_uid, outcome.output
        if outcome.status not in ("clean", "duplicate") or sop is None or output is None:
            return outcome
        first = self._written.get(sop)
        if first is None:
            self._written[sop] = output
            return dataclasses.replace(outcome, status="clean")
        if first == output:
            return dataclasses.replace(outcome, status="duplicate")
        output.unlink(missing_ok=True)  # ours, written under another study or series
        return quarantine(
            outcome.source,
            self.quarantine_dir,
            DUPLICATE_SOP,
            "another object with this SOP Instance UID was written first",
            outcome.original_study_uid,
        )
