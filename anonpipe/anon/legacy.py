"""Import the old pipeline's identity.db (the dicom-anon audit database) into anonpipe's.

Why: a study the old pipeline published must keep its Study, Series and SOP Instance UIDs, its
accession number and its patient pseudonyms when it is pulled again, or the research PACS gets a
second copy; a patient the old database knows must keep one pseudonym from then on. The old file
is read only (``immutable=1``, or ``mode=ro`` beside a journal) and never changed; everything
is added to identity.db in one transaction, set-wise in SQL over the old file attached to it.
Nothing here prints, logs or raises a value: the report holds counts and table names only.

The old schema: one table per audited attribute, named after the attribute name lower-cased
without punctuation (``studyinstanceuid``, ``patientid``, ``accessionnumber``, …), columns
(id, original, cleaned) and, in all but the study table, ``study`` → the study table's id. The
old README's names (``studyuid``, ``patient``, ``accession_no``) are accepted too. Its mappings
were per study: the first usable row (lowest id) of an original wins, the others are reported.

Patients: the old pipeline gave a patient a new pseudonym in every study. Each patient keeps the
pseudonym of its first old study (lowest row id) for every new study; each old study keeps the
one it was published under when pulled again (``imported_study``). A pseudonym the old file gave
to several patients is nobody's from then on: those patients get keyed pseudonyms for new
studies. A mapping identity.db already holds (anonpipe used it) is never replaced.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from anonpipe.anon.identity import (
    BUSY_TIMEOUT_MS,
    IMPORTED_META,
    IdentityError,
    IdentityStore,
    check_store,
    keyed_patient,
)

__all__ = [
    "OLD_TABLES",
    "Attribute",
    "Counts",
    "ImportReport",
    "LegacyError",
    "OldSchema",
    "import_identity",
    "inspect_old",
    "usable",
]


class LegacyError(Exception):
    """OLD_DB cannot be imported (not the old schema, or the wrong file); names file and fix."""


@dataclass(frozen=True, slots=True)
class Attribute:
    """Where the rows of one old table go: an identity.db table, and the VR its values must be
    valid for before anonpipe writes them into files again."""

    table: str
    vr: str
    label: str


_STUDY: Final = Attribute("studyuid", "UI", "Study Instance UID")
_PATIENT: Final = Attribute("patient", "LO", "Patient ID")
_ACCESSION: Final = Attribute("accession_no", "SH", "Accession Number")

#: Old table name → what its rows are. dicom-anon's names first, then the old README's.
OLD_TABLES: Final[dict[str, Attribute]] = {
    "studyinstanceuid": _STUDY,
    "studyuid": _STUDY,
    "seriesinstanceuid": Attribute("seriesuid", "UI", "Series Instance UID"),
    "sopinstanceuid": Attribute("sopinstanceuid", "UI", "SOP Instance UID"),
    "patientid": _PATIENT,
    "patient": _PATIENT,
    "patientsname": Attribute("patient_name", "PN", "Patient's Name"),
    "accessionnumber": _ACCESSION,
    "accession_no": _ACCESSION,
}
STUDY_TABLES: Final = tuple(name for name, a in OLD_TABLES.items() if a is _STUDY)
#: identity.db tables the import writes, in the order it fills them.
TARGETS: Final = tuple(dict.fromkeys(a.table for a in OLD_TABLES.values()))
#: A conflict condition: the row belongs to an old study that is anonpipe's now.
_OF_TAKEN: Final = " OR f.study IN (SELECT study FROM temp.taken)"
_MAX_LENGTH: Final = {"UI": 64, "SH": 16, "LO": 64, "PN": 64}
_UID: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_NAME: Final = re.compile(r"[A-Za-z0-9_]{1,64}")


def _text(value: object) -> str | None:
    """Stored text without DICOM padding; None for NULL, empty, numbers and undecodable bytes
    (a number is not how any of these values was stored: it is a defect of the old file)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    return value.strip(" \0") or None


def usable(vr: str, value: object) -> str | None:
    """`value` when anonpipe may write it as a `vr` value again, else None."""
    text = _text(value)
    if text is None or any(ord(c) < 0x20 or c == "\\" for c in text):
        return None
    if vr == "UI":
        return text if len(text) <= _MAX_LENGTH[vr] and _UID.fullmatch(text) else None
    if vr == "PN":  # up to three component groups of 64 characters each
        groups = text.split("=")
        return text if len(groups) <= 3 and all(len(g) <= 64 for g in groups) else None
    return text if len(text) <= _MAX_LENGTH[vr] else None


@dataclass(frozen=True)
class OldSchema:
    """What :func:`inspect_old` found in OLD_DB."""

    path: Path
    #: Attribute tables imported, in :data:`OLD_TABLES` order.
    tables: tuple[str, ...]
    #: Those with a ``study`` column.
    linked: frozenset[str]
    #: Other tables (attributes anonpipe does not map, e.g. studydate), by name.
    ignored: tuple[str, ...]

    @property
    def uri(self) -> str:
        """Read-only URI: ``immutable=1`` (no lock, no file created) unless a journal or WAL
        file is beside it, which only ``mode=ro`` reads correctly."""
        journal = any(Path(f"{self.path}{s}").exists() for s in ("-journal", "-wal"))
        return f"{self.path.resolve().as_uri()}?{'mode=ro' if journal else 'immutable=1'}"


def inspect_old(path: Path) -> OldSchema:
    """Check that `path` is the old pipeline's identity.db, reading only.

    Raises
    ------
    LegacyError
        If it is absent, not SQLite, anonpipe's own identity.db, has no study table (or both
        names of it), or a known table lacks (id, original, cleaned).
    """
    what = f"{path} is not the old pipeline's identity.db"
    try:
        with open(path, "rb") as file:
            header = file.read(16)
    except OSError as exc:
        raise LegacyError(f"cannot read {path}: {exc.strerror}") from exc
    if header != b"SQLite format 3\x00":
        raise LegacyError(f"{what}: it is not an SQLite database")
    schema = OldSchema(path, (), frozenset(), ())
    try:
        conn = sqlite3.connect(schema.uri, uri=True, isolation_level=None)
        try:
            names = [
                str(row[0])
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite%' ORDER BY name"
                )
            ]
            columns = {
                name: {
                    str(r[1]).lower()
                    for r in conn.execute("SELECT * FROM pragma_table_info(?)", (name,))
                }
                for name in names
            }
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise LegacyError(f"cannot read {path}: {exc}") from exc
    if "meta" in names and {"name", "value"} <= columns["meta"]:
        raise LegacyError(
            f"{what}: it is an anonpipe identity.db (it has anonpipe's meta table); nothing to"
            " import"
        )
    studies = [t for t in STUDY_TABLES if t in names]
    if not studies:
        raise LegacyError(f"{what}: it has no {' or '.join(STUDY_TABLES)} table")
    if len(studies) > 1:
        raise LegacyError(
            f"{what}: it has both {' and '.join(studies)} tables, so which one the study columns"
            " refer to is ambiguous; remove the unused one from a copy and import the copy"
        )
    tables = tuple(t for t in OLD_TABLES if t in names)
    for table in tables:
        missing = {"id", "original", "cleaned"} - columns[table]
        if missing:
            raise LegacyError(
                f"{what}: its table {table} lacks the column(s) {', '.join(sorted(missing))}"
                " (expected id, original, cleaned and, but for the study table, study)"
            )
    ignored = [t if _NAME.fullmatch(t) else "(a table with an unusual name)" for t in names]
    return OldSchema(
        path,
        tables,
        frozenset(t for t in tables if "study" in columns[t] and t not in STUDY_TABLES),
        tuple(t for t in ignored if t not in tables),
    )


@dataclass
class Counts:
    """What became of the rows of one identity.db table (or of the studies)."""

    #: Rows read from the old tables (studies: old studies with a patient pseudonym).
    rows: int = 0
    #: Rows without an original, or whose cleaned value anonpipe cannot write (not a valid
    #: value of the attribute's VR): not imported.
    unusable: int = 0
    #: Originals the old file maps to more than one cleaned value (the first row is imported).
    several: int = 0
    #: Cleaned values the old file gives to more than one original.
    shared: int = 0
    added: int = 0
    #: Already in identity.db with the same value (an earlier import).
    present: int = 0
    #: Already in identity.db with another value: identity.db's is kept.
    conflicts: int = 0


@dataclass
class ImportReport:
    """Counts only (never a value): what an import added, or would add (dry run)."""

    source: Path
    target: Path
    dry_run: bool
    tables: dict[str, Counts] = field(default_factory=lambda: {t: Counts() for t in TARGETS})
    studies: Counts = field(default_factory=Counts)
    #: Old studies whose published patient pseudonym is not their patient's chosen one.
    studies_other_pseudonym: int = 0
    ignored: tuple[str, ...] = ()

    @property
    def added(self) -> int:
        """Rows added to identity.db in all."""
        return sum(c.added for c in self.tables.values()) + self.studies.added

    def lines(self) -> list[str]:
        """The report for an operator: one line per table, then the conflicts explained."""
        verb = "would add" if self.dry_run else "added"
        head = (
            f"{'dry run, nothing written: ' if self.dry_run else ''}{self.source} -> {self.target}"
        )
        out = [head]
        labels = {a.table: a.label for a in OLD_TABLES.values()}
        for table, c in self.tables.items():
            out.append(
                f"{table} ({labels[table]}): {c.rows} old rows; {verb} {c.added}, already"
                f" imported {c.present}"
            )
        out.append(
            f"imported_study (patient pseudonyms each old study was published under):"
            f" {self.studies.rows} old studies; {verb} {self.studies.added}, already imported"
            f" {self.studies.present}"
        )
        if self.ignored:
            out.append(f"not imported (anonpipe does not map them): {', '.join(self.ignored)}")
        notes = self._conflict_lines()
        out.append("conflicts:" if notes else "conflicts: none")
        out.extend(f"  {note}" for note in notes)
        return out

    def _conflict_lines(self) -> list[str]:
        notes: list[str] = []
        for table, c in self.tables.items():
            if c.unusable:
                notes.append(
                    f"{table}: {c.unusable} rows without an original or with a cleaned value that"
                    " is not valid DICOM for the attribute: not imported (new keyed values)"
                )
            if c.several and table == "patient":
                notes.append(
                    f"patient: {c.several} patients had several pseudonyms (one per old study):"
                    " each keeps the one of its first old study for new studies;"
                    f" {self.studies_other_pseudonym} old studies keep their own when pulled"
                    " again"
                )
            elif c.several and table != "patient_name":
                notes.append(
                    f"{table}: {c.several} originals had several cleaned values: the first one"
                    " (lowest row id) is imported"
                )
            if c.shared and table == "patient":
                notes.append(
                    f"patient: {c.shared} pseudonyms were given to several patients: no patient"
                    " keeps them for new studies (keyed pseudonyms instead)"
                )
            elif c.shared:
                notes.append(
                    f"{table}: {c.shared} cleaned values were given to several originals:"
                    " imported as the old pipeline published them"
                )
            if c.conflicts:
                notes.append(
                    f"{table}: {c.conflicts} originals already in identity.db with another"
                    " value (or of a study anonpipe has de-identified): identity.db's is kept"
                )
        if self.studies.conflicts:
            notes.append(
                f"imported_study: {self.studies.conflicts} old studies anonpipe has already"
                " de-identified (or imported otherwise): they keep what identity.db has"
            )
        return notes


def import_identity(
    old_db: Path,
    identity_db: Path,
    key: bytes,
    shift_days: tuple[int, int] = (-365, -1),
    *,
    dry_run: bool = False,
) -> ImportReport:
    """Import OLD_DB's mappings into `identity_db` (created if absent) in one transaction.

    Idempotent: a second import adds nothing. ``dry_run`` runs the same import on a private copy
    of identity.db (in a 0700 folder beside it, or in the system's temporary folder while it has
    no folder yet; deleted at the end), so its counts are exact and neither file changes.

    Raises
    ------
    LegacyError
        OLD_DB is not the old schema, or is identity.db itself.
    IdentityError
        identity.db cannot be used (foreign, another key, unwritable).
    sqlite3.Error
        Reading or writing failed midway (nothing was committed).
    """
    schema = inspect_old(old_db)
    if identity_db.exists() and os.path.samefile(old_db, identity_db):
        raise LegacyError(
            f"{old_db} is the configured identity_db itself: point [anon] identity_db at a new"
            " file and import the old one into it"
        )
    check_store(identity_db)  # refuse a foreign identity.db by its own name, before any copy
    if not dry_run:
        return _import_into(
            identity_db, schema, key, shift_days, ImportReport(old_db, identity_db, False)
        )
    parent = identity_db.parent if identity_db.parent.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=".anonpipe-import-", dir=parent) as tmp:
        copy = Path(tmp) / identity_db.name
        for suffix in ("", "-wal"):  # bytes, as practice runs do: no -shm appears beside it
            source = Path(f"{identity_db}{suffix}")
            if source.exists():
                shutil.copyfile(source, f"{copy}{suffix}")
        try:
            report = _import_into(copy, schema, key, shift_days, ImportReport(old_db, copy, True))
        except IdentityError as exc:  # name identity.db, not the throwaway copy
            raise IdentityError(str(exc).replace(str(copy), str(identity_db))) from None
    return replace(report, target=identity_db)


def _import_into(
    target: Path, schema: OldSchema, key: bytes, shift_days: tuple[int, int], report: ImportReport
) -> ImportReport:
    IdentityStore(target, key, shift_days).close()  # create or migrate; checks the key
    conn = sqlite3.connect(target.resolve().as_uri(), uri=True, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.create_function("ap_original", 1, _text, deterministic=True)
        conn.create_function("ap_usable", 2, usable, deterministic=True)
        conn.execute("ATTACH DATABASE ? AS old", (schema.uri,))
        conn.execute("BEGIN IMMEDIATE")
        try:
            _Import(conn, schema, key, shift_days, report).run()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    report.ignored = schema.ignored
    return report


class _Import:
    """The steps of one import, on a connection to identity.db with OLD_DB attached as ``old``.

    The old rows are first copied, checked, into a temporary table (``old_rows``: target, original,
    cleaned, old study id, sequence); every step is then set-wise SQL over it.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        schema: OldSchema,
        key: bytes,
        shift_days: tuple[int, int],
        report: ImportReport,
    ) -> None:
        self.conn, self.schema, self.key, self.report = conn, schema, key, report
        self.shift = shift_days

    def run(self) -> None:
        self._load()
        self._uids("studyuid")
        self._taken()
        self._uids("seriesuid")
        self._uids("sopinstanceuid")
        self._patients()
        self._names()
        self._accessions()
        self._studies()
        if self.report.added:
            self.conn.execute(
                "INSERT OR IGNORE INTO main.meta (name, value) VALUES (?, ?)",
                (IMPORTED_META, dt.datetime.now(dt.UTC).isoformat(timespec="seconds")),
            )

    def _count(self, sql: str, params: tuple[object, ...] = ()) -> int:
        return int(self.conn.execute(sql, params).fetchone()[0])

    def _by_target(self, sql: str) -> Counter[str]:
        return Counter({str(t): int(n) for t, n in self.conn.execute(sql)})

    def _load(self) -> None:
        conn = self.conn
        conn.execute(
            "CREATE TEMP TABLE old_rows (seq INTEGER PRIMARY KEY, target TEXT NOT NULL,"
            " original TEXT, cleaned TEXT, study INTEGER)"
        )
        for name in self.schema.tables:
            attribute = OLD_TABLES[name]
            if attribute is _STUDY:
                study = "id"  # the study table links to itself: its id is what the others hold
            else:
                study = "study" if name in self.schema.linked else "NULL"
            cursor = conn.execute(
                "INSERT INTO temp.old_rows (target, original, cleaned, study) SELECT ?,"
                f' ap_original(original), ap_usable(?, cleaned), {study} FROM old."{name}"'
                " ORDER BY id",
                (attribute.table, attribute.vr),
            )
            self.report.tables[attribute.table].rows += cursor.rowcount
        unusable = self._by_target(
            "SELECT target, count(*) FROM temp.old_rows WHERE original IS NULL OR cleaned IS NULL"
            " GROUP BY target"
        )
        conn.execute("DELETE FROM temp.old_rows WHERE original IS NULL OR cleaned IS NULL")
        conn.execute("CREATE INDEX temp.old_rows_original ON old_rows (target, original, seq)")
        conn.execute("CREATE INDEX temp.old_rows_study ON old_rows (target, study, seq)")
        several = self._by_target(
            "SELECT target, count(*) FROM (SELECT target FROM temp.old_rows"
            " GROUP BY target, original HAVING count(DISTINCT cleaned) > 1) GROUP BY target"
        )
        shared = self._by_target(
            "SELECT target, count(*) FROM (SELECT target FROM temp.old_rows"
            " GROUP BY target, cleaned HAVING count(DISTINCT original) > 1) GROUP BY target"
        )
        for table, counts in self.report.tables.items():
            counts.unusable, counts.several = unusable[table], several[table]
            counts.shared = shared[table]
        # the first row (lowest id) of each original: what is imported. A patient pseudonym
        # given to several patients is no one's.
        conn.execute(
            "CREATE TEMP TABLE chosen (target TEXT NOT NULL, original TEXT NOT NULL,"
            " cleaned TEXT NOT NULL, study INTEGER, state TEXT NOT NULL DEFAULT 'new',"
            " seq INTEGER NOT NULL, PRIMARY KEY (target, original))"
        )
        conn.execute(
            "INSERT INTO temp.chosen (target, original, cleaned, study, seq)"
            " SELECT target, original, cleaned, study, min(seq) FROM temp.old_rows r"
            " WHERE target != 'patient' OR cleaned NOT IN (SELECT cleaned FROM temp.old_rows"
            "  WHERE target = 'patient' GROUP BY cleaned HAVING count(DISTINCT original) > 1)"
            " GROUP BY target, original"
        )

    def _settle(self, target: str, present: str, conflict: str) -> Counts:
        """Mark the first rows of `target` already there (`present`: same value) or in conflict
        (`conflict`: another value), both SQL conditions on ``f`` (a row of ``first``)."""
        conn = self.conn
        conn.execute(
            f"UPDATE temp.chosen AS f SET state = 'present' WHERE target = ? AND ({present})",
            (target,),
        )
        conn.execute(
            "UPDATE temp.chosen AS f SET state = 'conflict' WHERE target = ? AND state = 'new'"
            f" AND ({conflict})",
            (target,),
        )
        counts = self.report.tables[target]
        states = dict(
            conn.execute(
                "SELECT state, count(*) FROM temp.chosen WHERE target = ? GROUP BY state", (target,)
            ).fetchall()
        )
        counts.present, counts.conflicts = states.get("present", 0), states.get("conflict", 0)
        return counts

    def _taken(self) -> None:
        """Old studies that are anonpipe's now (their Study UID is mapped otherwise, or anonpipe
        de-identified them): none of their rows is imported, so a study is never re-published
        half under old UIDs, half under anonpipe's."""
        self.conn.execute(
            "CREATE TEMP TABLE taken AS SELECT DISTINCT r.study AS study FROM temp.old_rows r"
            " WHERE r.target = 'studyuid' AND (EXISTS (SELECT 1 FROM temp.chosen c"
            "  WHERE c.target = 'studyuid' AND c.original = r.original AND c.state = 'conflict')"
            " OR EXISTS (SELECT 1 FROM main.study_patient m WHERE m.study = r.original))"
        )

    def _uids(self, target: str) -> None:
        counts = self._settle(
            target,
            present=f"EXISTS (SELECT 1 FROM main.{target} m WHERE m.original = f.original AND"
            " m.cleaned = f.cleaned) AND EXISTS (SELECT 1 FROM main.imported_uid i"
            " WHERE i.original = f.original AND i.cleaned = f.cleaned)",
            conflict=f"EXISTS (SELECT 1 FROM main.{target} m WHERE m.original = f.original)"
            " OR EXISTS (SELECT 1 FROM main.imported_uid i WHERE i.original = f.original)"
            f" OR EXISTS (SELECT 1 FROM main.{target} m WHERE m.cleaned = f.cleaned)"
            + ("" if target == "studyuid" else _OF_TAKEN),
        )
        new = "FROM temp.chosen WHERE target = ? AND state = 'new' ORDER BY seq"
        counts.added = self.conn.execute(
            f"INSERT INTO main.{target} (original, cleaned) SELECT original, cleaned {new}",
            (target,),
        ).rowcount
        self.conn.execute(
            "INSERT INTO main.imported_uid (original, cleaned, kind)"
            f" SELECT original, cleaned, target {new}",
            (target,),
        )

    def _patients(self) -> None:
        counts = self._settle(
            "patient",
            present="EXISTS (SELECT 1 FROM main.patient m WHERE m.original = f.original AND"
            " m.cleaned = f.cleaned)",
            conflict="EXISTS (SELECT 1 FROM main.patient m WHERE m.original = f.original"
            "  OR m.cleaned = f.cleaned)",
        )
        # the name published with the chosen Patient ID (same old study), else a keyed one
        chosen = self.conn.execute(
            "SELECT f.original, f.cleaned, (SELECT n.cleaned FROM temp.old_rows n"
            "  WHERE n.target = 'patient_name' AND n.study = f.study ORDER BY n.seq LIMIT 1)"
            " FROM temp.chosen f WHERE f.target = 'patient' AND f.state = 'new' ORDER BY f.seq"
        ).fetchall()
        low, high = self.shift
        self.conn.executemany(
            "INSERT INTO main.patient (original, issuer, cleaned, cleaned_name, date_offset_days)"
            " VALUES (?, '', ?, ?, ?)",
            (
                (
                    original,
                    cleaned,
                    name or keyed_patient(self.key, original)[1],
                    low + secrets.randbelow(high - low + 1),
                )
                for original, cleaned, name in chosen
            ),
        )
        counts.added = len(chosen)

    def _names(self) -> None:
        """Every (name, pseudonym) pair: ``patient_name`` keeps them all, for linking."""
        counts = self.report.tables["patient_name"]
        pairs = "SELECT DISTINCT original, cleaned FROM temp.old_rows WHERE target = 'patient_name'"
        total = self._count(f"SELECT count(*) FROM ({pairs})")
        counts.added = self.conn.execute(
            f"INSERT OR IGNORE INTO main.patient_name (original, cleaned) {pairs}"
        ).rowcount
        counts.present = total - counts.added

    def _accessions(self) -> None:
        counts = self._settle(
            "accession_no",
            present="EXISTS (SELECT 1 FROM main.accession_no m WHERE m.original = f.original"
            " AND m.cleaned = f.cleaned)",
            conflict="EXISTS (SELECT 1 FROM main.accession_no m WHERE m.original = f.original"
            "  OR m.cleaned = f.cleaned)" + _OF_TAKEN,
        )
        counts.added = self.conn.execute(
            "INSERT INTO main.accession_no (original, cleaned) SELECT original, cleaned"
            " FROM temp.chosen WHERE target = 'accession_no' AND state = 'new' ORDER BY seq"
        ).rowcount

    def _studies(self) -> None:
        """The Patient ID and Name each old study was published under (its first rows)."""
        conn = self.conn
        first = (
            "SELECT p.{0} FROM temp.old_rows p WHERE p.target = '{1}' AND p.study = s.study"
            " ORDER BY p.seq LIMIT 1"
        )
        conn.execute(
            "CREATE TEMP TABLE old_studies AS SELECT study, original_patient, patient,"
            " patient_name, 'new' AS state FROM (SELECT s.original AS study,"
            f" ({first.format('original', 'patient')}) AS original_patient,"
            f" ({first.format('cleaned', 'patient')}) AS patient,"
            f" ({first.format('cleaned', 'patient_name')}) AS patient_name"
            " FROM temp.chosen s WHERE s.target = 'studyuid')"
            " WHERE patient IS NOT NULL OR patient_name IS NOT NULL"
        )
        counts = self.report.studies
        counts.rows = self._count("SELECT count(*) FROM temp.old_studies")
        conn.execute(
            "UPDATE temp.old_studies AS s SET state = 'present' WHERE EXISTS (SELECT 1 FROM"
            " main.imported_study m WHERE m.study = s.study AND m.original_patient IS"
            " s.original_patient AND m.patient IS s.patient AND m.patient_name IS s.patient_name)"
        )
        conn.execute(
            "UPDATE temp.old_studies AS s SET state = 'conflict' WHERE state = 'new' AND (EXISTS"
            " (SELECT 1 FROM main.imported_study m WHERE m.study = s.study) OR EXISTS"
            " (SELECT 1 FROM temp.chosen c WHERE c.target = 'studyuid' AND c.original = s.study"
            "  AND c.state = 'conflict') OR EXISTS"
            " (SELECT 1 FROM main.study_patient m WHERE m.study = s.study))"
        )
        states = dict(conn.execute("SELECT state, count(*) FROM temp.old_studies GROUP BY state"))
        counts.present, counts.conflicts = states.get("present", 0), states.get("conflict", 0)
        counts.added = conn.execute(
            "INSERT INTO main.imported_study (study, original_patient, patient, patient_name)"
            " SELECT study, original_patient, patient, patient_name FROM temp.old_studies"
            " WHERE state = 'new'"
        ).rowcount
        self.report.studies_other_pseudonym = self._count(
            "SELECT count(*) FROM temp.old_studies s WHERE s.state != 'conflict' AND s.patient IS"
            " NOT NULL AND s.patient IS NOT (SELECT m.cleaned FROM main.patient m"
            "  WHERE m.original = s.original_patient ORDER BY m.id LIMIT 1)"
        )
