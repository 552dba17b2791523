"""Read a daemon's JSON log as records and judge whether its lines can be followed: every line of
a run names the run, a line of a study's step names the study (its review id) and the step.

The judge is the tests' own: it knows the field names the README documents (``run``, ``study``,
``step``) and nothing of how anonpipe binds them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from typing import Any

__all__ = [
    "STUDY_STEPS",
    "birth_dates_in",
    "json_records",
    "run_lines",
    "unfollowable",
]

#: The steps of a study; a line naming one of them must name the study too, and the reverse.
STUDY_STEPS = frozenset({"pull", "deidentify", "hook", "push", "verify", "writeback"})
#: The run's own steps (no study).
RUN_STEPS = frozenset({"select", "check", "hook", "finish"})

Record = dict[str, Any]


def json_records(text: str) -> list[Record]:
    """Every JSON object line of *text* (a command's own printed lines are skipped)."""
    records: list[Record] = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def run_lines(records: list[Record], run: str) -> list[Record]:
    """The lines logged during *run*: from its first line to its ``run done`` line, whatever
    thread or process logged them."""
    first = next((i for i, r in enumerate(records) if r.get("run") == run), None)
    if first is None:
        return []
    done = [i for i, r in enumerate(records) if r.get("event") == "run done"]
    return records[first : (done[-1] + 1 if done else len(records))]


def unfollowable(records: Iterable[Record], run: str, review_ids: Collection[int]) -> list[str]:
    """What is wrong with the lines of *run*: a line without the run (or with another), a study
    that is not one of the run's review ids, a study without its step, a study step without a
    study. Empty when every line can be followed."""
    problems: list[str] = []
    for record in records:
        what = f"{record.get('logger')}: {str(record.get('event'))[:60]!r}"
        if record.get("run") != run:
            problems.append(f"no run {run} in {what} (run={record.get('run')!r})")
        study, step = record.get("study"), record.get("step")
        if study is not None and study not in review_ids:
            problems.append(f"study {study!r} is not a review id of the run in {what}")
        if study is not None and step not in STUDY_STEPS:
            problems.append(f"study {study} without its step in {what} (step={step!r})")
        if step in STUDY_STEPS - RUN_STEPS and study is None:
            problems.append(f"step {step} without its study in {what}")
        if step is not None and step not in STUDY_STEPS | RUN_STEPS:
            problems.append(f"unknown step {step!r} in {what}")
    return problems


def birth_dates_in(text: str, dates: Iterable[str]) -> set[str]:
    """The YYYYMMDD *dates* found in *text* as whole numbers (not inside a longer one)."""
    return {d for d in dates if re.search(rf"(?<![0-9]){re.escape(d)}(?![0-9])", text)}
