"""Keyed pseudonyms and the identity store (identity.db).

Pseudonyms are HMAC-SHA256 codes of the original under one secret key: every file, worker process
and run agrees without coordination, and nobody without the key can recompute them. The only random
value, a patient's date offset, is drawn at first sight and stored. identity.db keeps every mapping
(plain-text PHI, mode 0600) for linking: ``select original from accession_no where cleaned = ?``.

Each worker process opens its own :class:`IdentityStore` (never one opened before a fork) on the
same WAL-mode file; racers agree because a first sight is ``INSERT OR IGNORE`` then ``SELECT`` in
one ``BEGIN IMMEDIATE`` transaction. Original values never appear in logs or exception messages.

A file anonpipe did not create (the old pipeline's identity.db, anything without our ``meta``
table) is refused before anything is written to it: it is imported instead
(:mod:`anonpipe.anon.legacy`). Imported mappings (the old pipeline's cleaned UIDs, accession
numbers and patient pseudonyms) answer before the keyed codes, so a study it already published
keeps its identifiers when it is pulled again.
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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from anonpipe.durable import fsync_path

#: Length of a generated key, and the minimum accepted, in bytes.
KEY_BYTES: Final = 32
#: 2 added ``study_patient`` (one patient per original study); 3 added ``imported_uid`` and
#: ``imported_study`` (mappings imported from the old pipeline). Older files are migrated.
SCHEMA_VERSION: Final = 3
#: Versions this release opens (older ones are migrated when opened for writing).
READABLE_VERSIONS: Final = ("1", "2", str(SCHEMA_VERSION))
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
    # Version 3. UIDs the old pipeline published, by original, whatever attribute holds them
    # (a reference must resolve to the same old UID); they are in studyuid/seriesuid/
    # sopinstanceuid too, for linking.
    "CREATE TABLE IF NOT EXISTS imported_uid (original TEXT PRIMARY KEY, cleaned TEXT NOT NULL,"
    f" kind TEXT NOT NULL, created TEXT NOT NULL DEFAULT ({_NOW}))",
    # The patient pseudonyms each old study was published under (the old pipeline had one per
    # study): the study keeps them when it is pulled again; original_patient is for linking.
    "CREATE TABLE IF NOT EXISTS imported_study (study TEXT PRIMARY KEY, original_patient TEXT,"
    f" patient TEXT, patient_name TEXT, created TEXT NOT NULL DEFAULT ({_NOW}))",
    "CREATE INDEX IF NOT EXISTS imported_study_patient ON imported_study (patient)",
)
#: ``meta`` row present once an import added something: lookups consult imported rows first.
IMPORTED_META: Final = "legacy_import"


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


def keyed_patient(key: bytes, patient_id: str, issuer: str = "") -> tuple[str, str]:
    """The keyed Patient ID (LO) and Patient's Name (PN) of a patient: ``AP…`` and ``ANON^…``."""
    code = _code(key, f"patient:{issuer}\0{patient_id}".encode(), 10)
    return "AP" + code, "ANON^" + code


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


def _inspect_store(path: Path) -> dict[str, str] | None:
    """The ``meta`` rows of identity.db at `path`; None when it is absent, empty or has no table
    (ours to set up).

    Reads without creating or changing anything: ``immutable=1`` when no WAL file exists (then
    the main file holds everything), else ``mode=ro``, which may add the WAL index of a WAL
    database in use. An old pipeline's identity.db stays byte-identical.

    Raises
    ------
    IdentityError
        If the file is not an SQLite database, or not one anonpipe created (no ``meta`` with a
        schema version): the message names the file and the import command.
    """
    try:
        with open(path, "rb") as file:
            header = file.read(16)
    except (FileNotFoundError, NotADirectoryError):
        return None  # creating it will say what is wrong with its folder
    except OSError as exc:
        raise IdentityError(
            f"cannot read identity store {path}: {exc.strerror}; make the file readable by this"
            " user"
        ) from exc
    if not header:
        return None
    if header != b"SQLite format 3\x00":
        raise IdentityError(
            f"identity store {path}: file is not a database; restore it from a backup or move it"
            " aside to start a new one"
        )
    mode = "mode=ro" if Path(f"{path}-wal").exists() else "immutable=1"
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            names = {
                str(row[0])
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite%'"
                )
            }
            meta: dict[str, str] = {}
            with contextlib.suppress(sqlite3.Error):  # a meta table of another layout
                meta = {str(k): str(v) for k, v in conn.execute("SELECT name, value FROM meta")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise IdentityError(
            f"identity store {path}: {exc}; restore it from a backup or move it aside to start"
            " a new one"
        ) from exc
    if not names:
        return None
    if "schema_version" not in meta:
        raise IdentityError(
            f"identity store {path} was not created by anonpipe (no anonpipe meta table: the old"
            " pipeline's identity.db?) and anonpipe never changes such a file; point [anon]"
            f" identity_db at a new file, then import the old mappings: anonpipe import-identity"
            f" {path}"
        )
    return meta


def check_store(path: Path) -> None:
    """Refuse at start-up, reading only, an identity.db anonpipe did not create or cannot read
    (another schema version); absent is fine (it is created at first use).

    Raises
    ------
    IdentityError
        With the file, the reason and the fix (for a foreign file: the import command).
    """
    _checked_meta(path)


def _checked_meta(path: Path) -> dict[str, str] | None:
    """identity.db's ``meta`` (None when absent), read only; refuses a foreign or newer file."""
    meta = _inspect_store(path)
    if meta is not None and meta.get("schema_version") not in READABLE_VERSIONS:
        raise _version_error(path, meta.get("schema_version"))
    return meta


def key_fingerprint(key: bytes) -> str:
    """What identity.db's ``meta`` records of the key it was made with (``key_fingerprint``):
    a keyed digest, so the key cannot be recovered from it."""
    return _hmac(key, b"fingerprint:identity.db").hex()[:32]


def _key_error(path: Path, key_file: Path | None = None) -> IdentityError:
    """Another key than identity.db's: every known patient would get new pseudonyms."""
    which = f" ({key_file})" if key_file is not None else ""
    return IdentityError(
        f"identity store {path} was written with a different pseudonym key{which}; with this key"
        " every known patient would get new pseudonyms and every UID a new replacement: restore"
        " the key file the store was created with (from a backup), or point [anon] identity_db"
        " at a new file to start afresh"
    )


def check_identity(path: Path, key_file: Path) -> None:
    """Refuse at start-up, reading only and creating nothing, an identity.db that
    :func:`check_store` refuses, or one that another key than `key_file`'s wrote.

    An absent store is fine (it is created at first use), and so is an absent key file while
    the store is absent too; a key file missing beside an existing store is refused, since the
    key created in its place could never open the store.

    Raises
    ------
    IdentityError
        With the file, the reason and the fix.
    """
    meta = _checked_meta(path)
    try:
        key = _read_key(key_file)
    except FileNotFoundError:
        if meta is None:
            return
        raise IdentityError(
            f"key file {key_file} not found, but identity store {path} holds mappings made with"
            " a key: restore the key file from a backup (a new key would give every known"
            " patient new pseudonyms), or point [anon] identity_db at a new file"
        ) from None
    if meta is not None and meta.get("key_fingerprint") != key_fingerprint(key):
        raise _key_error(path, key_file)


def _version_error(path: Path, version: str | None) -> IdentityError:
    return IdentityError(
        f"identity store {path} has schema version {version}, this anonpipe reads version"
        f" {SCHEMA_VERSION}; use a matching anonpipe release"
    )


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
        # per table: what each original (the seen key) was replaced by, committed or pending
        self._seen: dict[str, dict[str, str]] = {table: {} for table in MAP_TABLES}
        self._pending: dict[str, dict[str, str]] = {table: {} for table in MAP_TABLES}
        self._patients: dict[tuple[str, str], PatientPseudonym] = {}
        self._pending_patients: dict[tuple[str, str], PatientPseudonym] = {}
        self._studies: dict[str, tuple[PatientPseudonym, tuple[str, str, str]]] = {}
        self._pending_studies: dict[str, tuple[PatientPseudonym, tuple[str, str, str]]] = {}
        self._has_study_table = True
        self._has_imports = False  # set from meta: whether imported rows must be consulted
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
        self._preflight(readable=READABLE_VERSIONS)
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
            # versions 1 and 2 lacked tables the schema above has just created
            conn.execute(
                "UPDATE meta SET value = ? WHERE name = 'schema_version' AND value IN ('1', '2')",
                (str(SCHEMA_VERSION),),
            )
        self._check_meta(conn)
        return conn

    def _preflight(self, readable: tuple[str, ...]) -> None:
        """Refuse, before anything is written (not even a mode repair), a file anonpipe did not
        create, a version this release cannot read, or a store of another key."""
        meta = _inspect_store(self.path)
        if meta is not None:
            self._judge_meta(meta, readable)

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
        self._preflight(readable=READABLE_VERSIONS)
        uri = self.path.resolve().as_uri() + "?mode=ro"
        conn = self._conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA query_only = 1")
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if not set(TABLES) | {"meta"} <= names:
            conn.close()
            return None
        self._has_study_table = "study_patient" in names  # a version 1 file, not migrated here
        self._check_meta(conn, readable=READABLE_VERSIONS)
        self._has_imports &= {"imported_uid", "imported_study"} <= names
        return conn

    @property
    def _fingerprint(self) -> str:
        return key_fingerprint(self._key)

    def _check_meta(
        self, conn: sqlite3.Connection, readable: tuple[str, ...] = (str(SCHEMA_VERSION),)
    ) -> None:
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        self._judge_meta(meta, readable)
        self._has_imports = IMPORTED_META in meta

    def _judge_meta(self, meta: dict[str, str], readable: tuple[str, ...]) -> None:
        if meta.get("schema_version") not in readable:
            raise _version_error(self.path, meta.get("schema_version"))
        if meta.get("key_fingerprint") != self._fingerprint:
            raise _key_error(self.path)

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
            seen.update(pending)
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
            self._pending[table][seen_key] = cleaned
        return cleaned

    def _mapped(
        self, table: str, original: str, keyed: Callable[[], str], imported: str | None
    ) -> str:
        """The replacement of `original` in `table`: cached, else imported (from the table
        `imported`, consulted only once an import added rows), else `keyed`; then recorded."""
        known = self._seen[table].get(original) or self._pending[table].get(original)
        if known is not None:
            return known
        cleaned = self._imported(imported, original) if imported else None
        return self._record(table, original, original, cleaned or keyed())

    def _imported(self, table: str, original: str) -> str | None:
        if not self._has_imports or self._conn is None:
            return None
        row = self._execute(f"SELECT cleaned FROM {table} WHERE original = ?", (original,))
        found = row.fetchone()
        return None if found is None else str(found[0])

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
            row = (*keyed_patient(self._key, patient_id, issuer), self._derived_offset(*ident))
        if row is not None:
            found = PatientPseudonym(*row)
            (self._pending_patients if self._in_transaction else self._patients)[ident] = found
            return found
        low, high = self._shift
        with self._writing():
            self._execute(
                "INSERT OR IGNORE INTO patient (original, issuer, cleaned, cleaned_name,"
                " date_offset_days) VALUES (?, ?, ?, ?, ?)",
                (
                    *ident,
                    *keyed_patient(self._key, patient_id, issuer),
                    low + secrets.randbelow(high - low + 1),
                ),
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
                pseudonym = self._as_published(study_uid, identity)
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
            return self._as_published(study_uid, identity), ()
        pseudonym, first = bound
        differ = tuple(
            name for name, a, b in zip(IDENTITY_ATTRIBUTES, first, digests, strict=True) if a != b
        )
        return pseudonym, differ

    def _as_published(self, study_uid: str, identity: PatientIdentity) -> PatientPseudonym:
        """The patient's pseudonym, or for a study the old pipeline published (imported), the
        Patient ID and Name it was published under: pulled again, it must not arrive as another
        patient's study. The date offset is the patient's."""
        pseudonym = self.patient(identity.key, identity.issuer)
        if not self._has_imports or self._conn is None:
            return pseudonym
        row = self._execute(
            "SELECT patient, patient_name FROM imported_study WHERE study = ?", (study_uid,)
        ).fetchone()
        if row is None:
            return pseudonym
        return PatientPseudonym(
            row[0] or pseudonym.patient_id,
            row[1] or pseudonym.patient_name,
            pseudonym.date_offset_days,
        )

    def _digest(self, kind: str, value: str) -> str:
        return _hmac(self._key, f"identity:{kind}\0{value}".encode()).hex()[:24]

    def _derived_offset(self, patient_id: str, issuer: str) -> int:
        low, high = self._shift
        digest = _hmac(self._key, f"offset:{issuer}\0{patient_id}".encode())
        return low + int.from_bytes(digest[:8], "big") % (high - low + 1)

    def accession(self, original: str) -> str:
        """Return (and record) the Accession Number replacing `original`: 14 characters, SH.

        One imported from the old pipeline (a row of ``accession_no``) answers first.
        """
        return self._mapped(
            "accession_no",
            original,
            lambda: "AC" + _code(self._key, b"accession:" + original.encode(), 12),
            "accession_no",
        )

    def study_id(self, original: str) -> str:
        """Return (and record) the Study ID replacing `original`: 12 characters, SH."""
        cleaned = "ST" + _code(self._key, b"study_id:" + original.encode(), 10)
        return self._record("study_id", original, original, cleaned)

    def patient_name(self, original_name: str, cleaned: str) -> None:
        """Record that Patient's Name `original_name` was replaced by `cleaned`, for linking."""
        self._record("patient_name", f"{original_name}\0{cleaned}", original_name, cleaned)

    def uid(self, original: str, kind: str = "uid") -> str:
        """Return the UID replacing `original` and record it in the table for `kind`.

        The UID the old pipeline published for it, when imported (``imported_uid``, whatever
        the kind: references resolve), else :func:`keyed_uid`.

        Raises
        ------
        ValueError
            If `kind` is not one of :data:`UID_KINDS`.
        """
        if kind not in UID_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(UID_KINDS)}, got {kind!r}")
        return self._mapped(kind, original, lambda: keyed_uid(self._key, original), "imported_uid")

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
