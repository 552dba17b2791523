"""Tests for anonpipe.anon.identity on real SQLite files, including concurrent worker processes."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from anonpipe.anon.identity import (
    IDENTITY_ATTRIBUTES,
    UID_KINDS,
    IdentityError,
    IdentityStore,
    PatientIdentity,
    PatientPseudonym,
    keyed_uid,
    load_or_create_key,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
UID_RE = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")
CODE_RE = re.compile(r"^[A-Z2-7]+$")
WAL_FILES = ("identity.db-wal", "identity.db-shm")
IDS = [f"PID{i:03d}" for i in range(40)] + [""]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# -- the key ------------------------------------------------------------------------------------


def test_key_is_created_0600_in_a_0700_directory_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "secret" / "pseudonym.key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert re.fullmatch(rb"[0-9a-f]{64}\n", path.read_bytes())
    assert load_or_create_key(path) == key
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("too_open", [0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, too_open: int) -> None:
    path = tmp_path / "pseudonym.key"
    load_or_create_key(path)
    path.chmod(too_open)
    with pytest.raises(IdentityError, match=re.escape(f"chmod 600 {path}")):
        load_or_create_key(path)


@pytest.mark.parametrize(("content", "rule"), [(b"ab" * 16, "at least 32"), (b"zz\n", "hex")])
def test_bad_key_file_is_refused(tmp_path: Path, content: bytes, rule: str) -> None:
    path = tmp_path / "pseudonym.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=rule) as caught:
        load_or_create_key(path)
    assert str(path) in str(caught.value)


def _create_key(path: Path) -> bytes:
    return load_or_create_key(path)


def test_racing_processes_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "pseudonym.key"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        keys = pool.map(_create_key, [path] * 8)
    assert len(set(keys)) == 1 and keys[0] == load_or_create_key(path)


# -- keyed UIDs -----------------------------------------------------------------------------------


def test_keyed_uid_is_valid_and_stable(tmp_path: Path) -> None:
    originals = ["1.2.3", "1.2.840.10008.5.1.4.1.1.2", "", "9" * 64]
    originals += [f"1.2.3.{i}" for i in range(500)]
    uids = [keyed_uid(KEY, uid) for uid in originals]
    assert all(UID_RE.match(uid) and len(uid) <= 64 for uid in uids)
    assert len(set(uids)) == len(originals)
    key_path = tmp_path / "k"
    key = load_or_create_key(key_path)
    first = [keyed_uid(key, uid) for uid in originals[:10]]
    assert [keyed_uid(load_or_create_key(key_path), uid) for uid in originals[:10]] == first
    assert not set(first) & {keyed_uid(OTHER_KEY, uid) for uid in originals[:10]}
    db = tmp_path / "identity.db"
    with IdentityStore(db, key) as one, IdentityStore(db, key) as two:
        assert [one.uid(u, "studyuid") for u in originals[:10]] == first
        assert [two.uid(u) for u in originals[:10]] == first


def test_keyed_uid_zero_component_is_valid() -> None:
    assert UID_RE.match("2.25.0") and keyed_uid(KEY, "x").startswith("2.25.")


# -- the database file ----------------------------------------------------------------------------


def test_database_is_0600_in_wal_mode_with_the_documented_tables(tmp_path: Path) -> None:
    db = tmp_path / "new" / "identity.db"
    with IdentityStore(db, KEY) as store:
        store.accession("A1")
    assert mode(db) == 0o600 and mode(db.parent) == 0o700
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        meta = dict(conn.execute("SELECT name, value FROM meta"))
    assert {"patient", "accession_no", "studyuid", "patient_name", *UID_KINDS} <= tables
    assert meta["schema_version"] == "3"


def test_loose_database_mode_is_repaired(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    IdentityStore(db, KEY).close()
    db.chmod(0o644)
    IdentityStore(db, KEY).close()
    assert mode(db) == 0o600


def test_corrupt_database_is_reported_with_path_and_fix(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    db.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(IdentityError, match=r"not a database.*backup") as caught:
        IdentityStore(db, KEY)
    assert str(db) in str(caught.value)


def test_uncreatable_directory_is_reported(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    db = tmp_path / "file" / "identity.db"
    with pytest.raises(IdentityError, match=r"cannot create identity store.*writable") as caught:
        IdentityStore(db, KEY)
    assert str(db) in str(caught.value)
    with pytest.raises(IdentityError, match=re.escape(f"key file {tmp_path}")):
        load_or_create_key(tmp_path / "file" / "key")


def test_other_key_is_refused_on_an_existing_database(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    IdentityStore(db, KEY).close()
    with pytest.raises(IdentityError, match="different pseudonym key"):
        IdentityStore(db, OTHER_KEY)
    with pytest.raises(IdentityError, match="different pseudonym key"):
        IdentityStore(db, OTHER_KEY, readonly=True)


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key"):
        IdentityStore(tmp_path / "identity.db", b"short")
    with pytest.raises(ValueError, match="shift_days"):
        IdentityStore(tmp_path / "identity.db", KEY, shift_days=(5, -5))


# -- pseudonyms -----------------------------------------------------------------------------------


def test_patient_pseudonym_and_offset_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    with IdentityStore(db, KEY, shift_days=(-30, -10)) as store:
        first = {pid: store.patient(pid) for pid in IDS}
        assert store.patient("PID000") is first["PID000"]  # cached
        other_issuer = store.patient("PID000", issuer="OTHER")
    with IdentityStore(db, KEY, shift_days=(-30, -10)) as store:
        assert {pid: store.patient(pid) for pid in IDS} == first
    assert other_issuer == first["PID000"]  # patient_key "id": the issuer does not split
    with IdentityStore(db, KEY, shift_days=(-30, -10), patient_key="id+issuer") as store:
        assert store.patient("PID000") == first["PID000"]
        assert store.patient("PID000", issuer="OTHER").patient_id != first["PID000"].patient_id
    for pseudonym in first.values():
        assert -30 <= pseudonym.date_offset_days <= -10
        assert re.fullmatch(r"AP[A-Z2-7]{10}", pseudonym.patient_id)
        assert pseudonym.patient_name == "ANON^" + pseudonym.patient_id[2:]
    assert len({p.date_offset_days for p in first.values()}) > 1  # drawn, not constant
    assert count(db, "patient") == len(IDS) + 1


def test_single_day_range_is_honoured(tmp_path: Path) -> None:
    with IdentityStore(tmp_path / "identity.db", KEY, shift_days=(-7, -7)) as store:
        assert store.patient("X").date_offset_days == -7


def test_short_values_are_valid_sh(tmp_path: Path) -> None:
    with IdentityStore(tmp_path / "identity.db", KEY) as store:
        accession, study_id = store.accession("ACC-1"), store.study_id("42")
    assert accession.startswith("AC") and len(accession) <= 16 and CODE_RE.match(accession)
    assert study_id.startswith("ST") and len(study_id) <= 16 and CODE_RE.match(study_id)


def test_documented_linking_query_answers(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    with IdentityStore(db, KEY) as store:
        cleaned = store.accession("ACC-0001")
        store.accession("ACC-0001")
        pseudonym = store.patient("MRN-7")
        store.patient_name("DOE^JANE", pseudonym.patient_name)
        store.patient_name("DOE^JANE", "ANON^SOMEONEELSE")  # a namesake: both are kept
        new_uid = store.uid("1.2.3.4", "frameofreferenceuid")
        assert store.lookup_original("accession_no", cleaned) == "ACC-0001"
        assert store.lookup_original("patient", pseudonym.patient_id) == "MRN-7"
        assert store.lookup_original("studyuid", "2.25.1") is None
    with sqlite3.connect(db) as conn:
        query = "select original from accession_no where cleaned = ?"
        assert conn.execute(query, (cleaned,)).fetchall() == [("ACC-0001",)]
        query = "select original from frameofreferenceuid where cleaned = ?"
        assert conn.execute(query, (new_uid,)).fetchall() == [("1.2.3.4",)]
        query = "select original from patient_name where cleaned = ?"
        assert conn.execute(query, ("ANON^SOMEONEELSE",)).fetchall() == [("DOE^JANE",)]
        created = conn.execute("select created from accession_no").fetchone()[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", created)


def test_each_uid_kind_has_its_table(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    with IdentityStore(db, KEY) as store:
        for kind in UID_KINDS:
            assert store.uid("1.2.3", kind) == keyed_uid(KEY, "1.2.3")
    assert all(count(db, kind) == 1 for kind in UID_KINDS)


def test_unknown_kind_and_table_are_rejected(tmp_path: Path) -> None:
    with IdentityStore(tmp_path / "identity.db", KEY) as store:
        with pytest.raises(ValueError, match="kind"):
            store.uid("1.2.3", "patient")
        with pytest.raises(ValueError, match="table"):
            store.lookup_original("accession_no; drop table patient", "x")
        with pytest.raises(ValueError, match="table"):
            store.lookup_original("meta", "x")


# -- transactions ---------------------------------------------------------------------------------


def test_transaction_rolls_back_on_exception_and_forgets_its_cache(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    with IdentityStore(db, KEY) as store:
        with pytest.raises(KeyError), store.transaction():
            store.patient("P1")
            store.accession("A1")
            store.uid("1.2.3", "seriesuid")
            raise KeyError("boom")
        assert [count(db, t) for t in ("patient", "accession_no", "seriesuid")] == [0, 0, 0]
        store.accession("A1")
        store.uid("1.2.3", "seriesuid")
        store.patient("P1")
        assert [count(db, t) for t in ("patient", "accession_no", "seriesuid")] == [1, 1, 1]


def test_commit_inside_a_transaction_keeps_it_open(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    with IdentityStore(db, KEY) as store:
        with store.transaction():
            store.accession("A1")
            assert count(db, "accession_no") == 0  # not visible to others before COMMIT
            store.commit()
            assert count(db, "accession_no") == 1
            store.accession("A2")
            with pytest.raises(RuntimeError, match="nest"), store.transaction():
                pass
        assert count(db, "accession_no") == 2
        store.accession("A3")  # outside a transaction: committed by itself
        assert count(db, "accession_no") == 3
        store.commit()


def test_errors_never_quote_original_values(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path / "identity.db", KEY)
    store.close()
    store.close()
    with pytest.raises(IdentityError) as caught:
        store.accession("SECRET-ACCESSION")
    assert "SECRET" not in str(caught.value) and "closed" in str(caught.value)


# -- read-only ------------------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_readonly_writes_nothing_and_computes_the_rest(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    with IdentityStore(db, KEY) as store:
        known = store.patient("KNOWN")
        accession = store.accession("ACC")
    before = _snapshot(tmp_path)
    with IdentityStore(db, KEY, readonly=True) as ro, ro.transaction():
        assert ro.patient("KNOWN") == known
        unknown = ro.patient("UNKNOWN")
        assert -365 <= unknown.date_offset_days <= -1
        assert ro.accession("ACC") == accession and ro.accession("NEW").startswith("AC")
        assert ro.uid("1.2.3", "studyuid") == keyed_uid(KEY, "1.2.3")
        ro.patient_name("DOE^JOHN", unknown.patient_name)
        assert ro.lookup_original("accession_no", accession) == "ACC"
    with IdentityStore(db, KEY, readonly=True) as again:
        assert again.patient("UNKNOWN") == unknown  # derived from the key, so stable
        again.commit()
    after = _snapshot(tmp_path)
    assert after["identity.db"] == before["identity.db"]
    # SQLite needs the WAL index to read a WAL database: an empty log may be left, nothing else.
    assert after.get("identity.db-wal", b"") == b"" and set(after) <= {*before, *WAL_FILES}
    assert all(mode(tmp_path / name) == 0o600 for name in after)
    assert [count(db, t) for t in ("patient", "accession_no", "studyuid")] == [1, 1, 0]


def test_readonly_on_a_missing_database_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "absent" / "identity.db"
    with IdentityStore(db, KEY, readonly=True) as ro:
        assert isinstance(ro.patient("P"), PatientPseudonym)
        assert ro.lookup_original("patient", "APX") is None
    assert not db.parent.exists()


# -- several worker processes -------------------------------------------------------------------


def _worker(
    db: Path, start: float, ids: list[str], prefix: str, files: int
) -> tuple[dict[str, PatientPseudonym], float]:
    """One engine worker: wait for the common start, then record ~10 mappings per file."""
    time.sleep(max(0.0, start - time.time()))
    with IdentityStore(db, KEY, shift_days=(-1000, -1)) as store:
        began = time.perf_counter()
        seen = {}
        for n in range(files):
            with store.transaction():
                pid = ids[n % len(ids)]
                seen[pid] = store.patient(pid)
                store.patient_name(f"NAME^{pid}", seen[pid].patient_name)
                store.accession(f"ACC{pid}")
                store.study_id(f"S{pid}")
                store.uid(f"1.2.{n % len(ids)}", "studyuid")
                store.uid(f"1.2.{n % len(ids)}.1", "seriesuid")
                store.uid(f"{prefix}.{n}", "sopinstanceuid")
                store.uid(f"1.2.{n % len(ids)}.0", "frameofreferenceuid")
                store.uid(f"{prefix}.{n}.9")
                store.uid(f"1.2.{n % len(ids)}.8")
        return seen, time.perf_counter() - began


def _run_workers(
    db: Path, processes: int, ids: list[str], files: int
) -> list[tuple[dict[str, PatientPseudonym], float]]:
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 2.0  # all processes are up and importing before any of them opens db
    args = [(db, start, ids, f"9.{n}", files) for n in range(processes)]
    with ctx.Pool(processes) as pool:
        return pool.starmap(_worker, args)


def test_concurrent_processes_agree_on_one_row_and_one_offset(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    results = _run_workers(db, 4, IDS, len(IDS))
    offsets = {pid: {seen[pid] for seen, _ in results} for pid in IDS}
    assert all(len(pseudonyms) == 1 for pseudonyms in offsets.values())
    with sqlite3.connect(db) as conn:
        for table in ("patient", "patient_name", "accession_no", "study_id", "studyuid"):
            rows = conn.execute(f"SELECT count(*), count(DISTINCT original) FROM {table}")
            assert rows.fetchone() == (len(IDS), len(IDS)), table
        assert count(db, "sopinstanceuid") == 4 * len(IDS)
        stored = dict(conn.execute("SELECT original, date_offset_days FROM patient"))
    assert stored == {pid: next(iter(p)).date_offset_days for pid, p in offsets.items()}


def test_batched_writes_from_two_processes_are_fast(tmp_path: Path) -> None:
    results = _run_workers(tmp_path / "identity.db", 2, [f"P{i}" for i in range(200)], 1000)
    elapsed = max(seconds for _, seconds in results)
    print(f"1000 files x 10 mappings x 2 processes: {elapsed:.3f} s")
    assert elapsed < 10.0  # the target is well under 2 s; the bound only catches regressions


# -- one patient per study, whatever its objects say -----------------------------------------------


def test_a_study_keeps_its_first_objects_patient_and_reports_what_differs(tmp_path: Path) -> None:
    with IdentityStore(tmp_path / "identity.db", KEY) as store:
        first, differ = store.study_patient("1.2.3", PatientIdentity("PID1", "", "DOE^JANE"))
        assert differ == ()
        # absent issuer, another issuer, the name written another way: one patient, reported
        same, differ = store.study_patient("1.2.3", PatientIdentity("PID1", "HOSP A", "DOE^JANE"))
        assert same == first and differ == ("Issuer of Patient ID",)
        same, differ = store.study_patient("1.2.3", PatientIdentity("PID1", "", "doe^jane^^"))
        assert same == first and differ == ()  # the same name, formatted differently
        same, differ = store.study_patient("1.2.3", PatientIdentity("PID9", "X", "ROE^RICH"))
        assert same == first and set(differ) == set(IDENTITY_ATTRIBUTES)
        # another study of the same Patient ID gets the same patient under the default key
        other, differ = store.study_patient("1.2.4", PatientIdentity("PID1", "HOSP B", "DOE^J"))
        assert other == first and differ == ()
    with IdentityStore(tmp_path / "identity.db", KEY) as store:  # and in another process / run
        again, _ = store.study_patient("1.2.3", PatientIdentity("PID9", "X", "ROE^RICH"))
        assert again == first


def test_id_plus_issuer_keeps_domains_apart_but_never_splits_a_study(tmp_path: Path) -> None:
    with IdentityStore(tmp_path / "identity.db", KEY, patient_key="id+issuer") as store:
        a, _ = store.study_patient("1.2.3", PatientIdentity("PID1", "HOSP A", "DOE^JANE"))
        b, differ = store.study_patient("1.2.3", PatientIdentity("PID1", "HOSP B", "DOE^JANE"))
        assert a == b and differ == ("Issuer of Patient ID",)
        c, _ = store.study_patient("1.2.4", PatientIdentity("PID1", "HOSP B", "DOE^JANE"))
        assert c.patient_id != a.patient_id  # another ID domain: another patient
    with pytest.raises(ValueError, match="patient_key"):
        IdentityStore(tmp_path / "identity.db", KEY, patient_key="issuer")


def test_a_version_1_store_is_migrated_and_keeps_its_pseudonyms(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    with IdentityStore(db, KEY) as store:
        before = {pid: store.patient(pid) for pid in IDS[:5]}
        with_issuer = store.patient("PIDX", "OLD ISSUER")
    with sqlite3.connect(db) as conn:  # what an anonpipe of schema version 1 left behind
        for table in ("study_patient", "imported_uid", "imported_study"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("UPDATE meta SET value = '1' WHERE name = 'schema_version'")
        # a version-1 store keyed on (id, issuer): the same ID under an issuer, stored first
        conn.execute("UPDATE patient SET issuer = 'OLD ISSUER' WHERE original = 'PIDX'")
    with IdentityStore(db, KEY, readonly=True) as store:  # readable before it is migrated
        assert store.patient("PID000") == before["PID000"]
    with IdentityStore(db, KEY) as store:
        assert {pid: store.patient(pid) for pid in before} == before
        assert store.patient("PIDX") == with_issuer  # found under its old issuer
        assert store.study_patient("9.9", PatientIdentity("PID000", "", ""))[0] == before["PID000"]
    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert version == ("3",) and {"study_patient", "imported_uid", "imported_study"} <= tables


def test_a_version_2_store_is_migrated_and_a_newer_one_refused_unchanged(tmp_path: Path) -> None:
    db = tmp_path / "identity.db"
    with IdentityStore(db, KEY) as store:
        known = store.uid("1.2.3", "studyuid")
    with sqlite3.connect(db) as conn:  # what an anonpipe of schema version 2 left behind
        conn.execute("DROP TABLE imported_uid")
        conn.execute("DROP TABLE imported_study")
        conn.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
    with IdentityStore(db, KEY, readonly=True) as store:  # readable before it is migrated
        assert store.uid("1.2.3", "studyuid") == known
    with IdentityStore(db, KEY) as store:
        assert store.uid("1.2.3", "studyuid") == known
    assert count(db, "imported_uid") == 0
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE meta SET value = '9' WHERE name = 'schema_version'")
    before = _snapshot(tmp_path)
    with pytest.raises(IdentityError, match="schema version 9"):
        IdentityStore(db, KEY)
    after = _snapshot(tmp_path)  # refused before the schema statements ran (the WAL index of
    after.pop("identity.db-shm", None)  # a WAL file is shared memory, not content)
    before.pop("identity.db-shm", None)
    assert after == before
