"""``anonpipe summary``: the Study Descriptions, Series Descriptions and Patient Names in a folder.

The operator's check of what a folder holds, for example that ``to_production/`` contains no
real names. The values are printed, by design, to the operator's terminal; they are never
logged. Only the three header elements are read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from anonpipe.anon.batch import iter_files
from anonpipe.headers import read_header, text_value

__all__ = ["EMPTY", "FIELDS", "MISSING", "FolderSummary", "summarize", "summary_lines"]

#: Heading -> header keyword, in the order printed.
FIELDS: dict[str, str] = {
    "Study Descriptions": "StudyDescription",
    "Series Descriptions": "SeriesDescription",
    "Patient Names": "PatientName",
}
#: Shown for a file without the element.
MISSING = "(missing)"
#: Shown for an element with an empty (or blank) value.
EMPTY = "(empty)"


@dataclass(slots=True)
class FolderSummary:
    """The values found under a folder.

    Attributes
    ----------
    files : int
        Files looked at (hidden ones are skipped).
    unreadable : int
        Files that are not readable DICOM.
    values : dict of str to Counter
        Per header keyword of :data:`FIELDS`, how many files hold each value (:data:`MISSING`
        and :data:`EMPTY` stand for no value).
    """

    files: int = 0
    unreadable: int = 0
    values: dict[str, Counter[str]] = field(
        default_factory=lambda: {keyword: Counter() for keyword in FIELDS.values()}
    )


def summarize(root: Path) -> FolderSummary:
    """Count the values of :data:`FIELDS` in the DICOM files under `root`."""
    summary = FolderSummary()
    keywords = list(FIELDS.values())
    for path in iter_files(root):
        summary.files += 1
        header = read_header(path, keywords)
        if header is None:
            summary.unreadable += 1
            continue
        for keyword in keywords:
            summary.values[keyword][_shown(text_value(header, keyword))] += 1
    return summary


def _shown(value: str | None) -> str:
    """`value` as printed: placeholders for no value, unprintable characters escaped."""
    if value is None:
        return MISSING
    if not value:
        return EMPTY
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def summary_lines(summary: FolderSummary) -> list[str]:
    """The report: per field a heading, then ``count  value`` lines sorted by value."""
    lines: list[str] = []
    width = len(str(summary.files))
    for heading, keyword in FIELDS.items():
        counts = summary.values[keyword]
        lines.append(f"{heading} ({len(counts)} unique):")
        lines.extend(f"  {count:>{width}}  {value}" for value, count in sorted(counts.items()))
    readable = summary.files - summary.unreadable
    lines.append(
        f"{summary.files} files: {readable} DICOM, {summary.unreadable} unreadable (not counted)"
    )
    return lines
