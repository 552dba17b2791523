#!/usr/bin/env python3
"""Generate ``anonpipe/anon/profile_table.json`` from DICOM PS3.15 Table E.1-1 as JSON.

The engine reads de-identification rules as data, not code (highdicom ships its standard tables the
same way): this script turns the reference extract of Table E.1-1 into the table the package ships,
resolving compound basic-profile actions and renaming the option columns to anonpipe's option
names. Output is deterministic (entries sorted by tag, keys sorted, one entry per line) so a
regenerated table can be compared byte for byte with the committed one, and the header records the
source file's name and SHA-256 so a reviewer can tell which extract it came from.

Usage::

    python scripts/gen_profile_table.py [SOURCE] [--output PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from pydicom.datadict import keyword_for_tag

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
SOURCE_NAME: Final = "ps3.15-e1-1-confidentiality-profile.json"
DEFAULT_SOURCE: Final = REPO_ROOT.parent / "shared" / "reference" / SOURCE_NAME
DEFAULT_OUTPUT: Final = REPO_ROOT / "anonpipe" / "anon" / "profile_table.json"
FORMAT_VERSION: Final = 1

#: Our option names -> the source's option columns, in the order anonpipe lists options.
OPTION_COLUMNS: Final[Mapping[str, str]] = {
    "retain_safe_private": "rtnSafePrivOpt",
    "retain_uids": "rtnUIDsOpt",
    "retain_device_identity": "rtnDevIdOpt",
    "retain_institution_identity": "rtnInstIdOpt",
    "retain_patient_characteristics": "rtnPatCharsOpt",
    "retain_longitudinal_full_dates": "rtnLongFullDatesOpt",
    "retain_longitudinal_modified_dates": "rtnLongModifDatesOpt",
    "clean_descriptors": "cleanDescOpt",
    "clean_structured_content": "cleanStructContOpt",
    "clean_graphics": "cleanGraphOpt",
}

#: Basic-profile actions -> the one the engine applies. PS3.15 E.1.1 leaves the choice in a compound
#: to the implementation as long as the object stays valid; the least destructive choice that is
#: valid for every IOD is taken (Z keeps a Type 2 attribute present, D a Type 1 one non-empty, and
#: X/Z/U* keeps the sequence and replaces the UIDs inside it).
RESOLUTION: Final[Mapping[str, str]] = {
    "X": "X",
    "Z": "Z",
    "D": "D",
    "U": "U",
    "K": "K",
    "C": "C",
    "X/Z": "Z",
    "X/D": "D",
    "Z/D": "D",
    "X/Z/D": "D",
    "X/Z/U*": "U",
}
OPTION_ACTIONS: Final = frozenset({"K", "C"})

#: Repeating-group rows -> (tag, mask, value): a tag t matches when ``t & mask == value``.
#: 50xx and 60xx are the even groups 0x5000-0x501E and 0x6000-0x601E (PS3.5 7.6).
PATTERNS: Final[Mapping[str, tuple[str, int, int]]] = {
    "(50XX,XXXX)": ("50XXXXXX", 0xFFE10000, 0x50000000),
    "(60XX,3000)": ("60XX3000", 0xFFE1FFFF, 0x60003000),
    "(60XX,4000)": ("60XX4000", 0xFFE1FFFF, 0x60004000),
    "(GGGG,EEEE) WHERE GGGG IS ODD": ("GGGGEEEE", 0x00010000, 0x00010000),
}
_EXACT_TAG: Final = re.compile(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)")


def _keyword(tag: int) -> str | None:
    """Return pydicom's keyword for ``tag`` (repeaters included), or None when it has none."""
    return keyword_for_tag(tag) or None


def convert_entry(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Convert one source row to a table entry.

    Parameters
    ----------
    raw
        A row of the source: ``name``, ``tag``, ``basicProfile`` and option columns.

    Returns
    -------
    dict
        ``tag``, ``name``, ``keyword``, ``basic_raw``, ``basic``, ``options`` and, for repeating
        groups, ``mask`` and ``value`` (8 hex digits each).

    Raises
    ------
    ValueError
        If the tag, the basic action or an option action is not one this script understands; a
        new edition of the table must be looked at by a person, not guessed at.
    """
    source_tag = str(raw["tag"])
    name = str(raw["name"]).strip()
    basic_raw = str(raw["basicProfile"])
    if basic_raw not in RESOLUTION:
        raise ValueError(
            f"{source_tag} {name!r}: basicProfile {basic_raw!r} is not one of "
            f"{', '.join(RESOLUTION)}; extend RESOLUTION after reading PS3.15 E.1.1"
        )
    options: dict[str, str] = {}
    for option, column in OPTION_COLUMNS.items():
        if column in raw:
            action = str(raw[column])
            if action not in OPTION_ACTIONS:
                raise ValueError(f"{source_tag} {name!r}: {column} is {action!r}, expected K or C")
            options[option] = action
    entry: dict[str, Any] = {
        "name": name,
        "basic_raw": basic_raw,
        "basic": RESOLUTION[basic_raw],
        "options": options,
    }
    if match := _EXACT_TAG.fullmatch(source_tag):
        tag = int(match[1] + match[2], 16)
        entry["tag"] = f"{tag:08X}"
        entry["keyword"] = _keyword(tag)
    elif source_tag in PATTERNS:
        pattern, mask, value = PATTERNS[source_tag]
        entry["tag"] = pattern
        entry["mask"] = f"{mask:08X}"
        entry["value"] = f"{value:08X}"
        # A keyword only when the pattern names one element (60xx,3000), not a whole group.
        entry["keyword"] = None if "X" in pattern[4:] or pattern[0] == "G" else _keyword(value)
    else:
        raise ValueError(
            f"tag {source_tag!r} ({name!r}) is neither (GGGG,EEEE) hex nor one of the known "
            f"patterns {', '.join(PATTERNS)}"
        )
    return entry


def build_table(source: Path) -> dict[str, Any]:
    """Read the source extract and return the whole table (header and sorted entries).

    Raises
    ------
    ValueError
        If the source is not a JSON list of rows, a row is not understood, or a tag repeats.
    """
    data = source.read_bytes()
    rows = json.loads(data)
    if not isinstance(rows, list):
        raise ValueError(f"{source}: expected a JSON list of Table E.1-1 rows")
    entries = [convert_entry(row) for row in rows]
    seen: set[str] = set()
    for entry in entries:
        if entry["tag"] in seen:
            raise ValueError(f"{source}: tag {entry['tag']} is listed twice")
        seen.add(entry["tag"])
    entries.sort(key=lambda entry: str(entry["tag"]))
    return {
        "format": FORMAT_VERSION,
        "generator": "scripts/gen_profile_table.py",
        "source": {"file": source.name, "sha256": hashlib.sha256(data).hexdigest()},
        "options": dict(OPTION_COLUMNS),
        "resolution": dict(RESOLUTION),
        "entries": entries,
    }


def render(table: Mapping[str, Any]) -> str:
    """Serialise ``table`` as JSON with one entry per line, so diffs show one line per rule."""
    lines = ["{"]
    for key, value in table.items():
        if key == "entries":
            continue
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)},")
    entries: Sequence[Mapping[str, Any]] = table["entries"]
    lines.append('  "entries": [')
    lines.extend(
        f"    {json.dumps(entry, sort_keys=True)}{',' if i < len(entries) - 1 else ''}"
        for i, entry in enumerate(entries)
    )
    lines.extend(["  ]", "}", ""])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the table; return 0, or 2 when the source cannot be read or understood."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    try:
        text = render(build_table(args.source))
    except (OSError, ValueError) as exc:
        print(f"gen_profile_table: {exc}", file=sys.stderr)
        return 2
    args.output.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {len(text.splitlines())} lines to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
