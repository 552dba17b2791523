"""Keyed pseudonyms and the identity store (identity.db).

Pseudonyms are HMAC-SHA256 codes of the original under one secret key: every file, worker process
and run agrees without coordination, and nobody without the key can recompute them. The only random
value, a patient's date offset, is drawn at first sight and stored. identity.db keeps every mapping
(plain-text PHI, mode 0600) for linking: ``select original from accession_no where cleaned = ?``.

Each worker process opens its own :class:`IdentityStore` (never one opened before a fork) on the
same WAL-mode file; racers agree because a first sight is ``INSERT OR IGNORE`` then ``SELECT`` in
one ``BEGIN IMMEDIATE`` transaction. Original values never appear in logs or exception messages.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from anonpipe.durable import fsync_path

#: Length of a generated key, and the minimum accepted, in bytes.
KEY_BYTES: Final = 32
#: 2 added ``study_patient`` (one patient per original study); version 1 files are migrated.
SCHEMA_VERSION: Final = 2
#: Who is one patient: the Patient ID alone, or the Patient ID within its issuer.
PATIENT_KEYS: Final = ("id", "id+issuer")
#: Tables for remapped UIDs, by the ``kind`` accepted by :meth:`IdentityStore.uid`.
UID_KINDS: Final = ("studyuid", "seriesuid", "sopinstanceuid", "frameofreferenceuid", "uid")
#: Tables with the generic (id, original, cleaned, created) layout.
MAP_TABLES: Final = ("patient_name", "accession_no", "study_id", *UID_KINDS)
TABLES: Final = ("patient", *MAP_TABLES)
BUSY_TIMEOUT_MS: Final = 30_000
#: Per-table bound of the in-process caches: a resident service sees millions of SOP Instance UIDs.
CACHE_LIMIT: Final = 65_536

_NOW: Final = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_PATIENT_COLUMNS: Final = (
    " issuer TEXT NOT NULL DEFAULT '', cleaned_name TEXT NOT NULL,"
    " date_offset_days INTEGER NOT NULL,"
)


def _ddl(table: str, columns: str = "", unique: str = "original") -> tuple[str, str]:
    return (
        f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, original TEXT NOT NULL,"
        f" cleaned TEXT NOT NULL,{columns} created TEXT NOT NULL DEFAULT ({_NOW}),"
        f" UNIQUE ({unique}))",
        f"CREATE INDEX IF NOT EXISTS {table}_cleaned ON {table} (cleaned)",
    )


_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    *_ddl("patient", _PATIENT_COLUMNS, unique="original, issuer"),
    # One original name may belong to several patients: both mappings are kept for linking.
    *_ddl("patient_name", unique="original, cleaned"),
    *(stmt for table in MAP_TABLES[1:] for stmt in _ddl(table)),
    # The patient of each original study (its first object's): every later object of the study
    # gets the same pseudonyms and date offset, whatever it says. The digests (keyed, not the
    # values) tell which identifying attributes of a later object disagree.
    "CREATE TABLE IF NOT EXISTS study_patient (study TEXT PRIMARY KEY, patient TEXT NOT NULL,"
    " patient_name TEXT NOT NULL, date_offset_days INTEGER NOT NULL, id_digest TEXT NOT NULL,"
    " issuer_digest TEXT NOT NULL, name_digest TEXT NOT NULL,"
    f" created TEXT NOT NULL DEFAULT ({_NOW}))",
)


class IdentityError(Exception):
    """The key file or identity.db cannot be used; the message names the file and the fix."""


@dataclass(frozen=True, slots=True)
class PatientPseudonym:
    """What replaces one patient: Patient ID (LO), Patient's Name (PN) and the date shift."""

    patient_id: str
    patient_name: str
    date_offset_days: int


@dataclass(frozen=True, slots=True)
class PatientIdentity:
    """How one object names its patient (original values: never logged, never shown)."""

    patient_id: str
    issuer: str
    name: str

    @property
    def key(self) -> str:
        """What identifies the patient when the ID is empty: the name."""
        return self.patient_id or f"name:{self.name}"


#: The identifying attributes compared between the objects of one study, as the audit names them.
IDENTITY_ATTRIBUTES: Final = ("Patient ID", "Issuer of Patient ID", "Patient's Name")


def _normal_name(name: str) -> str:
    """PN values that differ only in case, spacing or trailing empty components are one name."""
    return "^".join(part.strip() for part in name.split("^")).rstrip("^").casefold()


def _fields(pseudonym: PatientPseudonym) -> tuple[str, str, int]:
    return pseudonym.patient_id, pseudonym.patient_name, pseudonym.date_offset_days


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _code(key: bytes, message: bytes, length: int) -> str:
    """Upper-case base32 (A-Z, 2-7) of the HMAC: valid in SH, LO and PN, no padding."""
    return base64.b32encode(_hmac(key, message)).decode("ascii")[:length]


def keyed_uid(key: bytes, original: str) -> str:
    """Return the UID that replaces `original`: ``2.25.`` and 128 bits of its HMAC, in decimal.

    Deterministic, so every file, process and run agrees; at most 44 characters, and ``int`` in
    decimal never has leading zeros, so the result is a valid UID (PS3.5 9.1).
    """
    digest = _hmac(key, b"uid:" + original.encode())
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def load_or_create_key(path: Path) -> bytes:
    """Return the pseudonym key stored hex-encoded (one line) in `path`, creating it if absent.

    A new key is 32 bytes from :mod:`secrets`, written to a private temporary file (mode 0600 from
    the start, fsynced) and hard-linked into place, so a concurrent reader never sees a partial key;
    the loser of a creation race reads the winner's key. Parent directories are created 0700.

    Raises
    ------
    IdentityError
        If the file is readable by group or others, too short, not hex, or cannot be written.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(tmp, "x", opener=lambda name, flags: os.open(name, flags, 0o600)) as file:
            file.write(secrets.token_bytes(KEY_BYTES).hex() + "\n")
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):  # the loser of a race uses the winner's key
            os.link(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        raise IdentityError(
            f"cannot create key file {path}: {exc.strerror}; make {path.parent} writable by this"
            " user or point the setting at a writable path"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise IdentityError(f"cannot read key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise IdentityError(f"key file {path} is not a regular file")
        if mode & 0o077:
            raise IdentityError(
                f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o});"
                f" run: chmod 600 {path}"
            )
        text = file.read()
    try:
        key = bytes.fromhex(text.decode("ascii"))  # fromhex skips the whitespace around it
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) < KEY_BYTES:
        raise IdentityError(
            f"key file {path} must hold at least {KEY_BYTES} bytes as hex digits on one line;"
            " restore it from a backup"
        )
    return key


class IdentityStore:
    """The identity store: keyed pseudonyms, recorded in identity.db.

    Parameters
    ----------
    path
        identity.db; created (mode 0600, parents 0700) when absent unless `readonly`.
    key
        The pseudonym key (:func:`load_or_create_key`), at least 32 bytes. identity.db remembers a
        fingerprint of it and refuses another key, which would silently split every mapping.
    shift_days
        Inclusive range a new patient's date offset is drawn from.
    readonly
        Never write (lookups, e.g. from a hook): originals that are not stored still get their
        keyed pseudonyms, and an unstored date offset is derived from the key instead of drawn.
    patient_key
        ``id`` (default): one patient per Patient ID, whatever its issuer says (a patient already
        stored under several issuers keeps the pseudonym of the first one stored);
        ``id+issuer``: the issuer is part of the key (sites pooling several ID domains).

    Outside :meth:`transaction` every call that records something commits by itself. Lookups are
    cached per process; an entry is cached only once its row is committed.
    """

    def __init__(
        self,
        path: Path,
        key: bytes,
        shift_days: tuple[int, int] = (-365, -1),
        readonly: bool = False,
        patient_key: str = "id",
    ) -> None:
        if patient_key not in PATIENT_KEYS:
            raise ValueError(f"patient_key: expected one of {PATIENT_KEYS}, got {patient_key!r}")
        self.patient_key = patient_key
        if len(key) < KEY_BYTES:
            raise ValueError(f"key: expected at least {KEY_BYTES} bytes, got {len(key)}")
        low, high = shift_days
        if low > high:
            raise ValueError(f"shift_days: expected (low, high) with low <= high, got {shift_days}")
        self.path = path
        self.readonly = readonly
        self._key = key
        self._shift = (low, high)
        self._in_transaction = False
        self._seen: dict[str, set[str]] = {table: set() for table in MAP_TABLES}
        self._pending: dict[str, set[str]] = {table: set() for table in MAP_TABLES}
        self._patients: dict[tuple[str, str], PatientPseudonym] = {}
        self._pending_patients: dict[tuple[str, str], PatientPseudonym] = {}
        self._studies: dict[str, tuple[PatientPseudonym, tuple[str, str, str]]] = {}
        self._pending_studies: dict[str, tuple[PatientPseudonym, tuple[str, str, str]]] = {}
        self._has_study_table = True
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = self._open_readonly() if readonly else self._open()
        except BaseException as exc:
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from exc
            raise

    # -- opening --------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            for file in (self.path, *(Path(f"{self.path}{end}") for end in ("-wal", "-shm"))):
                if file.exists() and file.stat().st_mode & 0o077:
                    file.chmod(0o600)  # repair: the file holds PHI in plain text
        except OSError as exc:
            raise IdentityError(
                f"cannot create identity store {self.path}: {exc.strerror}; make"
                f" {self.path.parent} and the file writable by this user"
            ) from exc
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        conn = self._conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._enable_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        with self.transaction():
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.executemany(
                "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("key_fingerprint", self._fingerprint)],
            )
            # version 1 lacked study_patient, which the schema above has just created
            conn.execute(
                "UPDATE meta SET value = ? WHERE name = 'schema_version' AND value = '1'",
                (str(SCHEMA_VERSION),),
            )
        self._check_meta(conn)
        return conn

    @staticmethod
    def _enable_wal(conn: sqlite3.Connection) -> None:
        """Switch to WAL, retrying: SQLite skips the busy handler when first-openers race here."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005 + secrets.randbelow(20) / 1000)

    def _open_readonly(self) -> sqlite3.Connection | None:
        if not self.path.exists():
            return None  # nothing stored yet: every answer is computed
        uri = self.path.resolve().as_uri() + "?mode=ro"
        conn = self._conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA query_only = 1")
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if not set(TABLES) | {"meta"} <= names:
            conn.close()
            return None
        self._has_study_table = "study_patient" in names  # a version 1 file, not migrated here
        self._check_meta(conn, readable=("1", str(SCHEMA_VERSION)))
        return conn

    @property
    def _fingerprint(self) -> str:
        return _hmac(self._key, b"fingerprint:identity.db").hex()[:32]

    def _check_meta(
        self, conn: sqlite3.Connection, readable: tuple[str, ...] = (str(SCHEMA_VERSION),)
    ) -> None:
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("schema_version") not in readable:
            raise IdentityError(
                f"identity store {self.path} has schema version {meta.get('schema_version')},"
                f" this anonpipe reads version {SCHEMA_VERSION}; use a matching anonpipe release"
            )
        if meta.get("key_fingerprint") != self._fingerprint:
            raise IdentityError(
                f"identity store {self.path} was written with a different pseudonym key; use the"
                " key file it was created with, or a new identity_db path"
            )

    def _error(self, exc: sqlite3.Error) -> IdentityError:
        """Translate an SQLite error (whose text never holds bound values) into a fix."""
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            fix = "restore it from a backup or move it aside to start a new one"
        elif "locked" in text or "busy" in text:
            fix = "another process held it too long; check for stuck anonpipe processes"
        else:
            fix = f"check that {self.path.parent} and the file are readable and writable"
        return IdentityError(f"identity store {self.path}: {text}; {fix}")

    # -- transactions ---------------------------------------------------------------------------

    def _execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        if self._conn is None:
            raise IdentityError(f"identity store {self.path} is closed or was never created")
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Record everything inside the block in one ``BEGIN IMMEDIATE ... COMMIT``.

        One transaction per file keeps per-file writes cheap; an exception rolls the block back
        (and forgets what it cached). A no-op when the store is read-only.

        Raises
        ------
        RuntimeError
            If a transaction is already open: nesting is not supported.
        """
        if self._in_transaction:
            raise RuntimeError("IdentityStore.transaction() is already open; do not nest it")
        if self.readonly:
            yield
            return
        self._execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield
            self._execute("COMMIT")
        except BaseException:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            for pending in self._pending.values():
                pending.clear()
            self._pending_patients.clear()
            self._pending_studies.clear()
            raise
        finally:
            self._in_transaction = False
        self._settle()

    def _settle(self) -> None:
        """Move what was just committed from the pending sets into the caches."""
        for table, pending in self._pending.items():
            seen = self._seen[table]
            if len(seen) + len(pending) > CACHE_LIMIT:
                seen.clear()
            seen |= pending
            pending.clear()
        if len(self._patients) + len(self._pending_patients) > CACHE_LIMIT:
            self._patients.clear()
        self._patients.update(self._pending_patients)
        self._pending_patients.clear()
        if len(self._studies) + len(self._pending_studies) > CACHE_LIMIT:
            self._studies.clear()
        self._studies.update(self._pending_studies)
        self._pending_studies.clear()

    def commit(self) -> None:
        """Make everything committed so far durable against power loss, not only process crashes.

        Transactions commit with ``synchronous=NORMAL`` (cheap; a power cut may lose the newest
        ones), so call this before de-identified files leave the host: it fsyncs the WAL. Inside
        :meth:`transaction` it first commits the rows so far and keeps the transaction open.
        """
        if self.readonly:
            return
        if self._in_transaction:
            self._execute("COMMIT")
            self._settle()
            self._execute("BEGIN IMMEDIATE")
        fsync_path(Path(f"{self.path}-wal"))

    def _writing(self) -> AbstractContextManager[None]:
        return nullcontext() if self._in_transaction else self.transaction()

    # -- mappings -------------------------------------------------------------------------------

    def _record(self, table: str, seen_key: str, original: str, cleaned: str) -> str:
        if self.readonly or seen_key in self._seen[table] or seen_key in self._pending[table]:
            return cleaned
        with self._writing():
            self._execute(
                f"INSERT OR IGNORE INTO {table} (original, cleaned) VALUES (?, ?)",
                (original, cleaned),
            )
            self._pending[table].add(seen_key)
        return cleaned

    def patient(self, patient_id: str, issuer: str = "") -> PatientPseudonym:
        """Return the pseudonym of one patient (an empty Patient ID is an ID like any other).

        ID and name are keyed codes; the date offset is drawn uniformly from `shift_days` at first
        sight and stored, so every later call (any process, any run) returns the same one. Under
        ``patient_key = "id"`` the issuer is ignored: a patient stored earlier under one or more
        issuers answers with its first row, a new one is stored without an issuer.
        """
        select = "SELECT cleaned, cleaned_name, date_offset_days FROM patient WHERE original = ?"
        params: tuple[str, ...] = (patient_id,)
        if self.patient_key == "id":
            issuer = ""
            select += " ORDER BY id LIMIT 1"
        else:
            select += " AND issuer = ?"
            params = (patient_id, issuer)
        ident = (patient_id, issuer)
        known = self._patients.get(ident) or self._pending_patients.get(ident)
        if known is not None:
            return known
        row = self._execute(select, params).fetchone() if self._conn else None
        if row is None and self.readonly:
            code = self._patient_code(patient_id, issuer)
            row = ("AP" + code, "ANON^" + code, self._derived_offset(patient_id, issuer))
        if row is not None:
            found = PatientPseudonym(*row)
            (self._pending_patients if self._in_transaction else self._patients)[ident] = found
            return found
        low, high = self._shift
        code = self._patient_code(patient_id, issuer)
        with self._writing():
            self._execute(
                "INSERT OR IGNORE INTO patient (original, issuer, cleaned, cleaned_name,"
                " date_offset_days) VALUES (?, ?, ?, ?, ?)",
                (*ident, "AP" + code, "ANON^" + code, low + secrets.randbelow(high - low + 1)),
            )
            found = PatientPseudonym(*self._execute(select, params).fetchone())
            self._pending_patients[ident] = found
        return found

    def study_patient(
        self, study_uid: str, identity: PatientIdentity
    ) -> tuple[PatientPseudonym, tuple[str, ...]]:
        """The pseudonym of the patient of original study `study_uid`, and what disagrees.

        The first object seen of a study fixes its patient (:meth:`patient` of its identity);
        every later object of that study, in any process or run, gets the same pseudonyms and date
        offset, so a study never splits. The second value names the identifying attributes
        (:data:`IDENTITY_ATTRIBUTES`) in which this object differs from that first one: for the
        audit trail, without values. An empty `study_uid` binds nothing.
        """
        digests = (
            self._digest("id", identity.patient_id),
            self._digest("issuer", identity.issuer),
            self._digest("name", _normal_name(identity.name)),
        )
        if not study_uid:
            return self.patient(identity.key, identity.issuer), ()
        bound = self._studies.get(study_uid) or self._pending_studies.get(study_uid)
        if bound is None and self._conn is not None and self._has_study_table:
            row = self._execute(
                "SELECT patient, patient_name, date_offset_days, id_digest, issuer_digest,"
                " name_digest FROM study_patient WHERE study = ?",
                (study_uid,),
            ).fetchone()
            if row is None and not self.readonly:
                pseudonym = self.patient(identity.key, identity.issuer)
                with self._writing():
                    self._execute(
                        "INSERT OR IGNORE INTO study_patient (study, patient, patient_name,"
                        " date_offset_days, id_digest, issuer_digest, name_digest)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (study_uid, *_fields(pseudonym), *digests),
                    )
                    row = self._execute(
                        "SELECT patient, patient_name, date_offset_days, id_digest,"
                        " issuer_digest, name_digest FROM study_patient WHERE study = ?",
                        (study_uid,),
                    ).fetchone()
            if row is not None:
                bound = (PatientPseudonym(*row[:3]), (row[3], row[4], row[5]))
                target = self._pending_studies if self._in_transaction else self._studies
                target[study_uid] = bound
        if bound is None:  # read-only, never stored
            return self.patient(identity.key, identity.issuer), ()
        pseudonym, first = bound
        differ = tuple(
            name for name, a, b in zip(IDENTITY_ATTRIBUTES, first, digests, strict=True) if a != b
        )
        return pseudonym, differ

    def _digest(self, kind: str, value: str) -> str:
        return _hmac(self._key, f"identity:{kind}\0{value}".encode()).hex()[:24]

    def _patient_code(self, patient_id: str, issuer: str) -> str:
        return _code(self._key, f"patient:{issuer}\0{patient_id}".encode(), 10)

    def _derived_offset(self, patient_id: str, issuer: str) -> int:
        low, high = self._shift
        digest = _hmac(self._key, f"offset:{issuer}\0{patient_id}".encode())
        return low + int.from_bytes(digest[:8], "big") % (high - low + 1)

    def accession(self, original: str) -> str:
        """Return (and record) the Accession Number replacing `original`: 14 characters, SH."""
        cleaned = "AC" + _code(self._key, b"accession:" + original.encode(), 12)
        return self._record("accession_no", original, original, cleaned)

    def study_id(self, original: str) -> str:
        """Return (and record) the Study ID replacing `original`: 12 characters, SH."""
        cleaned = "ST" + _code(self._key, b"study_id:" + original.encode(), 10)
        return self._record("study_id", original, original, cleaned)

    def patient_name(self, original_name: str, cleaned: str) -> None:
        """Record that Patient's Name `original_name` was replaced by `cleaned`, for linking."""
        self._record("patient_name", f"{original_name}\0{cleaned}", original_name, cleaned)

    def uid(self, original: str, kind: str = "uid") -> str:
        """Return :func:`keyed_uid` of `original` and record it in the table for `kind`.

        Raises
        ------
        ValueError
            If `kind` is not one of :data:`UID_KINDS`.
        """
        if kind not in UID_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(UID_KINDS)}, got {kind!r}")
        return self._record(kind, original, original, keyed_uid(self._key, original))

    def lookup_original(self, table: str, cleaned: str) -> str | None:
        """Return the original that `cleaned` replaced in `table`, or None if none is stored.

        Raises
        ------
        ValueError
            If `table` is not one of :data:`TABLES`.
        """
        if table not in TABLES:
            raise ValueError(f"table: expected one of {', '.join(TABLES)}, got {table!r}")
        if self._conn is None:
            return None
        row = self._execute(
            f"SELECT original FROM {table} WHERE cleaned = ? ORDER BY id LIMIT 1", (cleaned,)
        ).fetchone()
        return None if row is None else str(row[0])

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; an open transaction is rolled back. Safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> IdentityStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
