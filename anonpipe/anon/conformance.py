"""The privacy officer's statement (``anonpipe conformance``): what the engine does, derived from
the data it runs on.

A statement typed by hand drifts from the code the day someone changes a rule. So every fact here
comes from what the engine itself reads or defines: the rule table and its supplement
(:mod:`~anonpipe.anon.profile`) resolved for the configured options, with their CID 7050 codes;
the pseudonymised attributes, dummy values and UID handling of :mod:`~anonpipe.anon.clean`; the
values :mod:`~anonpipe.anon.deidentify` records in every output; the quarantine rules
(``quarantine_rules.json``); the white lists (limited vocabulary, safe private creators); the
residual gate's attribute lists (:mod:`~anonpipe.anon.residual`). Only the sentence explaining
each :class:`Treatment` is written here, once. :func:`treatment` mirrors, per attribute and
without a value, the decision :meth:`~anonpipe.anon.clean.Cleaner.element` takes per element;
``tests/anon/test_conformance.py`` de-identifies generated studies and checks every attribute of
the inputs against the statement, so the two cannot part silently.

Facts about the deployment (where identity.db and the key live and who can read them, how long
identified copies stay on disk) are handed in by the caller: this package knows nothing of run
directories or networking.
"""

from __future__ import annotations

import enum
import grp
import json
import pwd
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from anonpipe import __version__
from anonpipe.anon.clean import (
    DUMMY_BY_VR,
    NOT_IN_A_DATASET,
    PSEUDONYM_TAGS,
    STANDARD_UID_ROOT,
    Recipe,
)
from anonpipe.anon.deidentify import (
    CANNOT_DEIDENTIFY,
    DUPLICATE_SOP,
    LONGITUDINAL,
    RESIDUAL_PHI,
    method_values,
)
from anonpipe.anon.profile import (
    OPTION_CODES,
    OPTION_NAMES,
    Action,
    Rule,
    TableEntry,
    build_profile,
    load_table,
    presence_rules,
)
from anonpipe.anon.quarantine import load_rules
from anonpipe.anon.residual import CONTEXT_KEYWORDS, IDENTIFYING_KEYWORDS, MIN_NEEDLE
from anonpipe.anon.vocabulary import Vocabulary

if TYPE_CHECKING:
    from anonpipe.config import AnonSettings

__all__ = [
    "FORMATS",
    "TREATMENT_TEXT",
    "AttributeRow",
    "Coded",
    "Fate",
    "FileAccess",
    "QuarantineEntry",
    "Retention",
    "Statement",
    "Treatment",
    "Unlisted",
    "build_statement",
    "file_access",
    "render",
    "treatment",
]


class Treatment(enum.Enum):
    """What happens to an attribute's value; the values are the statement's machine words."""

    REMOVED = "removed"
    EMPTIED = "emptied"
    PSEUDONYM = "pseudonym"
    DUMMY = "dummy"
    NEW_UID = "new-uid"
    ITEMS_CLEANED = "items-cleaned"
    DATE_SHIFTED = "date-shifted"
    KEPT = "kept"
    WHITE_LIST = "white-list"
    SAFE_PRIVATE = "safe-private"
    REBUILT = "rebuilt"
    RECORDED = "recorded"


#: The one sentence per treatment that a reader needs; everything else is derived.
TREATMENT_TEXT: Final[Mapping[Treatment, str]] = {
    Treatment.REMOVED: "removed",
    Treatment.EMPTIED: "kept, emptied (zero length)",
    Treatment.PSEUDONYM: "replaced by a keyed pseudonym (the same for one patient or study in"
    " every file and run; identity.db links it back)",
    Treatment.DUMMY: "replaced by a dummy value",
    Treatment.NEW_UID: "replaced by a keyed UID 2.25.… (the same for one original UID in every"
    " file and run, so references still resolve); DICOM standard UIDs kept",
    Treatment.ITEMS_CLEANED: "kept; every item cleaned by these same rules",
    Treatment.DATE_SHIFTED: "shifted by the patient's date offset (drawn once per patient)",
    Treatment.KEPT: "kept unchanged",
    Treatment.WHITE_LIST: "kept when every value is on the white list for this attribute,"
    " otherwise",
    Treatment.SAFE_PRIVATE: "kept when its private creator is a safe one, otherwise removed",
    Treatment.REBUILT: "not kept: the file meta is rebuilt from the cleaned data set",
    Treatment.RECORDED: "written by anonpipe",
}

#: How each date mode treats a DA or the date part of a DT that the rules keep.
_DATE_TREATMENT: Final[Mapping[str, Treatment]] = {
    "shift": Treatment.DATE_SHIFTED,
    "keep": Treatment.KEPT,
    "remove": Treatment.EMPTIED,
}
#: Actions whose meaning does not depend on the VR.
_PLAIN: Final[Mapping[Action, Treatment]] = {
    Action.REMOVE: Treatment.REMOVED,
    Action.EMPTY: Treatment.EMPTIED,
}
_DATE_OPTION: Final = "retain_longitudinal_modified_dates"
_DATE_VRS: Final = frozenset({"DA", "DT"})
#: VRs the cleaner keeps under C (Clean): dates (then shifted), times, sequences (items cleaned).
_KEPT_WHEN_CLEANED: Final = frozenset({"DA", "DT", "TM", "SQ"})
_FILE_META_GROUP: Final = 0x0002
_SOP_INSTANCE: Final = 0x00080018
_MEDIA_STORAGE_SOP_INSTANCE: Final = 0x00020003
_PRIVATE_PROBE: Final = 0x00090010
#: Formats of :func:`render`.
FORMATS: Final = ("md", "json")


@dataclass(frozen=True, slots=True)
class Fate:
    """What the cleaner does to one attribute whatever its value: `otherwise` is a white
    list's fallback, `value` the dummy written."""

    treatment: Treatment
    otherwise: Treatment | None = None
    value: str | None = None


def treatment(tag: int, rule: Rule, vr: str, dates: str) -> Fate:
    """What the cleaner does to attribute `tag` of dictionary VR `vr` under `rule`.

    Mirrors :meth:`~anonpipe.anon.clean.Cleaner.element` without a value (the conformance test
    holds the two together on generated studies).
    """
    if rule.action is Action.REMOVE and tag not in PSEUDONYM_TAGS:
        return Fate(Treatment.REMOVED)
    if tag in PSEUDONYM_TAGS and rule.action is not Action.KEEP:
        return Fate(Treatment.PSEUDONYM)
    action = rule.action
    if action is Action.CLEAN:
        if rule.option == _DATE_OPTION or vr in _KEPT_WHEN_CLEANED:
            action = Action.KEEP  # dates shift below; times and sequences are kept
        else:
            fallback = _applied(rule.basic, vr, dates)
            return Fate(Treatment.WHITE_LIST, fallback.treatment, fallback.value)
    return _applied(action, vr, dates)


def _applied(action: Action, vr: str, dates: str) -> Fate:
    """What applying `action` does to an element of `vr` (the cleaner's ``_apply``)."""
    plain = _PLAIN.get(action)
    if plain is not None:
        return Fate(plain)
    if vr == "SQ":
        return Fate(Treatment.ITEMS_CLEANED)
    if action is Action.REPLACE_UID or (action is Action.DUMMY and vr == "UI"):
        return Fate(Treatment.NEW_UID)
    if action is Action.DUMMY:
        dummy = DUMMY_BY_VR.get(vr)
        return Fate(Treatment.EMPTIED) if dummy is None else Fate(Treatment.DUMMY, value=str(dummy))
    if vr in _DATE_VRS:
        return Fate(_DATE_TREATMENT[dates])
    return Fate(Treatment.KEPT)


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttributeRow:
    """One attribute (or repeating group) and what anonpipe does to it.

    ``basic`` is Table E.1-1's action (compound actions resolved, see profile_table.json),
    ``action`` the one after the options, ``option`` the option that decided it (None: the
    basic profile). ``kept_empty_when`` lists attributes whose presence in the input keeps this
    one, emptied, instead of removing it (an IOD condition).
    """

    tag: str
    name: str
    keyword: str
    vr: str
    basic: str
    action: str
    option: str | None
    treatment: Treatment
    otherwise: Treatment | None = None
    value: str | None = None
    kept_empty_when: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Coded:
    """A CID 7050 concept: the option's name in ``[anon] options`` and its code."""

    name: str
    code: str
    scheme: str
    meaning: str


@dataclass(frozen=True, slots=True)
class FileAccess:
    """Where a secret file lives and who can read it (``exists`` False: not created yet)."""

    path: str
    exists: bool
    owner: str | None = None
    group: str | None = None
    mode: str | None = None
    readable_by: str = ""


@dataclass(frozen=True, slots=True)
class Retention:
    """Where identified copies stay on disk, from the caller (the run directories' layout).

    ``folders`` are what ``clean-data`` removes from a finished run; ``identified`` the ones
    among them holding identified originals; ``kept`` the other places that keep identifiers
    after clean-data, each ``(place, what it holds)``.
    """

    data_dir: str
    folders: tuple[str, ...]
    identified: tuple[str, ...]
    kept: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Unlisted:
    """What happens to a public attribute the table does not list, by ``kind``."""

    kind: str
    description: str
    treatment: Treatment


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """One quarantine rule as the data file states it."""

    reason: str
    keyword: str
    match: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Statement:
    """Everything ``anonpipe conformance`` states; :func:`render` writes it as md or JSON."""

    anonpipe_version: str
    table_source: Mapping[str, str]
    profile: Coded
    options: tuple[Coded, ...]
    options_not_enabled: tuple[Coded, ...]
    dates: str
    attributes: tuple[AttributeRow, ...]
    groups: tuple[AttributeRow, ...]
    unlisted: tuple[Unlisted, ...]
    recorded: tuple[AttributeRow, ...]
    white_lists: Mapping[str, tuple[str, ...]]
    safe_private: tuple[str, ...]
    quarantine: tuple[QuarantineEntry, ...]
    engine_reasons: tuple[str, ...]
    residual_patient: tuple[str, ...]
    residual_context: tuple[str, ...]
    residual_min_length: int
    identity_db: FileAccess
    key_file: FileAccess
    retention: Retention | None
    notes: tuple[str, ...] = field(default=())


# -- building ------------------------------------------------------------------------------------


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _row(
    tag: int, entry: TableEntry, rule: Rule, dates: str, when: Mapping[int, tuple[int, ...]]
) -> AttributeRow:
    vr = _vr(tag)
    group = tag >> 16
    if tag == _MEDIA_STORAGE_SOP_INSTANCE:  # the rebuilt meta's copy of SOP Instance UID
        fate = treatment(_SOP_INSTANCE, rule, "UI", dates)
    elif group == _FILE_META_GROUP:
        fate = Fate(Treatment.REBUILT)
    elif group in NOT_IN_A_DATASET:
        fate = Fate(Treatment.REMOVED)  # command elements never belong in a data set
    else:
        fate = treatment(tag, rule, vr, dates)
    when_tags = tuple(_tag_text(t) for t in when.get(tag, ()))
    return _attribute(
        _tag_text(tag), entry.name, keyword_for_tag(tag) or "", vr, rule, fate, when_tags
    )


def _attribute(
    tag: str,
    name: str,
    keyword: str,
    vr: str,
    rule: Rule | None,
    fate: Fate,
    kept_empty_when: tuple[str, ...] = (),
) -> AttributeRow:
    return AttributeRow(
        tag=tag,
        name=name,
        keyword=keyword,
        vr=vr,
        basic=rule.basic.value if rule else "",
        action=rule.action.value if rule else "",
        option=rule.option if rule else None,
        treatment=fate.treatment,
        otherwise=fate.otherwise,
        value=fate.value,
        kept_empty_when=kept_empty_when,
    )


#: The repeating-group rows of the table, each with one tag of its kind to ask the profile.
_GROUP_PROBES: Final = (
    ("(50xx,xxxx)", 0x50000005, ""),
    ("(60xx,3000)", 0x60003000, "OW"),
    ("(60xx,4000)", 0x60004000, "LT"),
    ("(60xx,eeee) other", 0x60000010, "US"),
)


def _groups(recipe: Recipe) -> tuple[AttributeRow, ...]:
    """The repeating-group rows: curves, overlays, private attributes."""
    profile = recipe.profile
    rows = []
    for pattern, probe, vr in _GROUP_PROBES:
        rule = profile.rule(probe)
        if rule is not None:
            rows.append(
                _attribute(
                    pattern, rule.name, "", "", rule, treatment(probe, rule, vr, recipe.dates)
                )
            )
    private = profile.rule(_PRIVATE_PROBE)
    if private is not None:
        safe = "retain_safe_private" in profile.options and bool(recipe.safe_private)
        fate = Fate(Treatment.SAFE_PRIVATE if safe else Treatment.REMOVED)
        rows.append(_attribute("(gggg,eeee), gggg odd", private.name, "", "", private, fate))
    return tuple(rows)


def _recorded(recipe: Recipe) -> tuple[AttributeRow, ...]:
    """What every output carries to say what was done (PS3.15 E.1.1), with its value."""
    codes = ", ".join(f"{c.scheme} {c.value}" for c in recipe.profile.codes)
    values = (
        ("PatientIdentityRemoved", "YES"),
        ("DeidentificationMethod", "\\".join(method_values(recipe))),
        ("DeidentificationMethodCodeSequence", codes),
        ("LongitudinalTemporalInformationModified", LONGITUDINAL[recipe.dates]),
    )
    rows = []
    for keyword, value in values:
        tag = tag_for_keyword(keyword)
        if tag is not None:
            fate = Fate(Treatment.RECORDED, value=value)
            rows.append(_attribute(_tag_text(tag), keyword, keyword, _vr(tag), None, fate))
    return tuple(rows)


def _coded(name: str) -> Coded:
    code = OPTION_CODES[name]
    return Coded(name, code.value, code.scheme, code.meaning)


def file_access(path: Path) -> FileAccess:
    """Who can read `path`: its owner, group and mode, said in words."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return FileAccess(str(path), False, readable_by="created at first use, mode 0600")
    except OSError as exc:
        return FileAccess(str(path), True, readable_by=f"cannot tell: {exc.strerror}")
    owner, group = _name(pwd.getpwuid, info.st_uid), _name(grp.getgrgid, info.st_gid)
    mode = stat.S_IMODE(info.st_mode)
    readers = [f"user {owner}"]
    if mode & stat.S_IRGRP:
        readers.append(f"group {group}")
    if mode & stat.S_IROTH:
        readers = ["every user"]
    return FileAccess(
        str(path), True, owner, group, f"{mode:04o}", " and ".join(readers) + " (and root)"
    )


def _name(lookup: Any, number: int) -> str:
    try:
        return str(lookup(number)[0])
    except KeyError:
        return str(number)


def build_statement(anon: AnonSettings, retention: Retention | None = None) -> Statement:
    """The statement for the ``[anon]`` settings: the same profile, white lists and rules the
    engine builds from them (:class:`~anonpipe.anon.batch.Engine`).

    Raises
    ------
    ValueError
        For options the engine refuses too, or an unreadable limited vocabulary.
    """
    vocabulary = Vocabulary.load(anon.limited_vocabulary)
    recipe = Recipe(
        profile=build_profile(anon.options, anon.dates),
        dates=anon.dates,
        vocabulary=vocabulary,
        safe_private=frozenset(s.strip().casefold() for s in anon.safe_private),
    )
    table = load_table()
    when = {tag: rule.when for rule in presence_rules() for tag in rule.tags}
    attributes = []
    for tag, entry in sorted(table.exact.items()):
        # the profile leaves the file meta out: its one listed UID follows SOP Instance UID
        rule = recipe.profile.rule(_SOP_INSTANCE if tag >> 16 == _FILE_META_GROUP else tag)
        if rule is None:  # pragma: no cover - every listed tag has a rule
            continue
        attributes.append(_row(tag, entry, rule, anon.dates, when))
    recorded = _recorded(recipe)
    written = {row.tag for row in recorded}
    attributes = [row for row in attributes if row.tag not in written]
    enabled = tuple(_coded(n) for n in OPTION_NAMES if n in recipe.profile.options)
    basic = recipe.profile.codes[0]
    return Statement(
        anonpipe_version=__version__,
        table_source=dict(table.source),
        profile=Coded("basic", basic.value, basic.scheme, basic.meaning),
        options=enabled,
        options_not_enabled=tuple(
            _coded(n) for n in OPTION_NAMES if n not in recipe.profile.options
        ),
        dates=anon.dates,
        attributes=tuple(attributes),
        groups=_groups(recipe),
        unlisted=_unlisted(anon.dates),
        recorded=recorded,
        white_lists={
            _tag_text(tag): tuple(sorted(values))
            for tag, values in sorted(vocabulary.allowed.items())
        },
        safe_private=tuple(sorted(recipe.safe_private)),
        quarantine=tuple(
            QuarantineEntry(r.reason, r.keyword, r.match, r.values)
            for r in load_rules(anon.allowed_modalities)
        ),
        engine_reasons=(RESIDUAL_PHI, CANNOT_DEIDENTIFY, DUPLICATE_SOP),
        residual_patient=tuple(sorted(IDENTIFYING_KEYWORDS)),
        residual_context=tuple(sorted(CONTEXT_KEYWORDS)),
        residual_min_length=MIN_NEEDLE,
        identity_db=file_access(anon.identity_db),
        key_file=file_access(anon.key_file),
        retention=retention,
        notes=_notes(recipe),
    )


def _unlisted(dates: str) -> tuple[Unlisted, ...]:
    """Public attributes Table E.1-1 does not list, by kind (the cleaner's ``_unlisted``)."""
    return (
        Unlisted(
            "known", "known to the DICOM dictionary, with its VR and value count", Treatment.KEPT
        ),
        Unlisted("uid", "any UID (VR UI), Retain UIDs or not", Treatment.NEW_UID),
        Unlisted("date", "dates (VR DA, DT)", _DATE_TREATMENT[dates]),
        Unlisted("sequence", "sequences (VR SQ)", Treatment.ITEMS_CLEANED),
        Unlisted(
            "unknown",
            "unknown to the dictionary, or with a VR or value count it contradicts",
            Treatment.REMOVED,
        ),
    )


def _notes(recipe: Recipe) -> tuple[str, ...]:
    """Consequences of the options that a per-attribute table does not show."""
    notes = []
    if "retain_uids" in recipe.profile.options:
        notes.append(
            "Retain UIDs keeps the UIDs Table E.1-1 lists; a UID in an attribute the table does"
            " not list is replaced all the same."
        )
    if "retain_safe_private" in recipe.profile.options and not recipe.safe_private:
        notes.append(
            "Retain Safe Private is enabled but [anon] safe_private names no creator: every"
            " private attribute is removed."
        )
    return tuple(notes)


# -- rendering -----------------------------------------------------------------------------------


def render(statement: Statement, fmt: str) -> str:
    """The statement as a Markdown document (``md``) or JSON (``json``)."""
    if fmt == "json":
        return json.dumps(_plain(asdict(statement)), indent=2, ensure_ascii=False) + "\n"
    if fmt == "md":
        return "\n".join(_markdown(statement)) + "\n"
    raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _words(row: AttributeRow) -> str:
    text = TREATMENT_TEXT[row.treatment]
    if row.otherwise is not None:
        fallback = TREATMENT_TEXT[row.otherwise]
        text += f" {fallback}" + (f" `{row.value}`" if row.value is not None else "")
    elif row.value is not None:
        text += f": `{row.value}`"
    if row.kept_empty_when:
        text += f"; kept, emptied, while the input has {' or '.join(row.kept_empty_when)}"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _action(row: AttributeRow) -> str:
    if not row.action:
        return ""
    return row.action + (f" ({row.option})" if row.option else "")


def _markdown(s: Statement) -> list[str]:
    out = [
        "# De-identification statement",
        "",
        f"Generated by anonpipe {s.anonpipe_version} from the rules, options and data files it"
        " runs on. DICOM PS3.15 Annex E, Table E.1-1"
        f" ({s.table_source.get('file', '')}, sha256 {s.table_source.get('sha256', '')[:16]}…).",
        "",
        "## Profile and options",
        "",
        f"- {s.profile.meaning} ({s.profile.scheme} {s.profile.code})",
        *(f"- {o.meaning} ({o.scheme} {o.code}): `{o.name}`" for o in s.options),
        "",
        "Not enabled: " + ", ".join(f"{o.meaning} ({o.code})" for o in s.options_not_enabled) + ".",
        "",
        f'Dates (`[anon] dates = "{s.dates}"`): every DA and the date part of every DT that'
        f" the rules keep is {TREATMENT_TEXT[_DATE_TREATMENT[s.dates]]}; a partial or invalid"
        " date is emptied rather than kept.",
        "",
        *(f"- {note}" for note in s.notes),
        *([""] if s.notes else []),
    ]
    counts: dict[Treatment, int] = {}
    for row in s.attributes:
        counts[row.treatment] = counts.get(row.treatment, 0) + 1
    out += [
        "## Attributes of Table E.1-1",
        "",
        "Action: the table's letter after the options (X remove, Z empty, D dummy, K keep,"
        " C clean, U new UID) and the option that decided it. "
        + "Attributes per treatment: "
        + ", ".join(f"{t.value} {n}" for t, n in counts.items())
        + ". The same rules apply inside every sequence item, at every depth.",
        "",
        "| tag | name | action | what anonpipe does |",
        "|---|---|---|---|",
        *(
            f"| {row.tag} | {_cell(row.name)} | {_action(row)} | {_cell(_words(row))} |"
            for row in s.attributes
        ),
        "",
        "## Repeating groups and private attributes",
        "",
        "| attributes | name | action | what anonpipe does |",
        "|---|---|---|---|",
        *(
            f"| {row.tag} | {_cell(row.name)} | {_action(row)} | {_cell(_words(row))} |"
            for row in s.groups
        ),
        "",
        "Safe private creators (`[anon] safe_private`): "
        + (", ".join(f"`{c}`" for c in s.safe_private) or "none")
        + ".",
        "",
        "## Attributes Table E.1-1 does not list",
        "",
        *(f"- {u.description}: {TREATMENT_TEXT[u.treatment]}" for u in s.unlisted),
        "",
        "## UIDs",
        "",
        f"Every UID the rules do not keep is {TREATMENT_TEXT[Treatment.NEW_UID]}"
        f" (root `{STANDARD_UID_ROOT}`). The file meta is rebuilt from the cleaned data set.",
        "",
        "## White lists (Clean Descriptors)",
        "",
    ]
    if s.white_lists:
        out += [
            f"- {tag}: " + ", ".join(f"`{v}`" for v in vals) for tag, vals in s.white_lists.items()
        ]
    else:
        out.append("No limited vocabulary (`[anon] limited_vocabulary`): nothing is white-listed.")
    out += [
        "",
        "Values are compared in lower case, without - _ , . and with spaces collapsed.",
        "",
        "## Recorded in every output",
        "",
        *(f"- {row.tag} {row.name}: `{row.value}`" for row in s.recorded),
        "",
        "## Quarantine",
        "",
        "A file matching a rule is never sent; its original is kept in the run's quarantine"
        " with the reason (values compare case-insensitively on the identified input).",
        "",
        "| reason | attribute | match | values |",
        "|---|---|---|---|",
        *(
            f"| {q.reason} | {q.keyword} | {q.match} | {_cell(', '.join(q.values))} |"
            for q in s.quarantine
        ),
        "",
        "The engine also quarantines: " + ", ".join(f"`{r}`" for r in s.engine_reasons)
        + ", and files that cannot be read as DICOM.",
        "",
        "## Residual-PHI gate",
        "",
        "Before a file is written, the identifying values of its input (at least"
        f" {s.residual_min_length} characters) are searched, case-insensitively, in the"
        " output's bytes outside the pixel data; a hit quarantines the file"
        f" (`{RESIDUAL_PHI}`) naming the kind of value and the element, never the value."
        " Pixel data is not inspected: burned-in text is handled by the quarantine rules.",
        "",
        "- Patient values (a leak wherever found): person names and their components, every"
        " non-standard UID, " + ", ".join(s.residual_patient) + ".",
        "- Context values (a leak unless only in an attribute kept verbatim): private text,"
        " unknown public elements, " + ", ".join(s.residual_context) + ".",
        "",
        "## identity.db and the key",
        "",
        *_access_lines("identity.db (every original identifier and its pseudonym, in plain"
                       " text)", s.identity_db),
        *_access_lines("pseudonym key", s.key_file),
        "",
    ]  # fmt: skip
    out += _retention_lines(s.retention)
    return out


def _access_lines(what: str, access: FileAccess) -> list[str]:
    if not access.exists:
        return [f"- {what}: `{access.path}`, not created yet ({access.readable_by})."]
    return [
        f"- {what}: `{access.path}`, owner {access.owner}, group {access.group}, mode"
        f" {access.mode}: readable by {access.readable_by}."
    ]


def _retention_lines(retention: Retention | None) -> list[str]:
    if retention is None:
        return []
    identified = ", ".join(f"`{name}/`" for name in retention.identified)
    return [
        "## Identified copies on disk",
        "",
        f"Each run keeps identified originals in {identified} of"
        f" `{retention.data_dir}/run_at_<epoch>/` until `anonpipe clean-data --before"
        " YYYY-MM-DD` removes a finished run's "
        + ", ".join(f"`{f}/`" for f in retention.folders)
        + "; nothing removes them sooner.",
        *(f"- {place}: {what}" for place, what in retention.kept),
        "",
    ]
