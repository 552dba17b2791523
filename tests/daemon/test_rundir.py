"""The run directory: layout, durable writes, and the old pipeline's exact overview wording."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from anonpipe.daemon import audit, rundir
from anonpipe.daemon.rundir import AUDIT_FILES, RUN_PREFIX, RunDir

NOW = 1367582400.7  # 2013-05-03 12:00:00.7 UTC


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    return RunDir.create(tmp_path / "data", now=NOW)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Record the descriptors passed to os.fsync (calls still go through)."""
    calls: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    yield calls


# ---------------------------------------------------------------------------------- create


def test_create_names_the_run_after_now_and_makes_the_folders(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "data", now=NOW)
    assert run.name == f"{RUN_PREFIX}1367582400"
    assert run.path == tmp_path / "data" / "run_at_1367582400"
    assert run.started == 1367582400
    for folder in (run.from_staging, run.quarantine, run.to_production):
        assert folder.is_dir()
        assert folder.parent == run.path
    assert {p.name for p in run.path.iterdir()} == {"from_staging", "quarantine", "to_production"}


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_create_makes_the_run_folder_owner_only(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        run = RunDir.create(tmp_path, now=NOW)
    finally:
        os.umask(old)
    for folder in (run.path, run.from_staging, run.quarantine, run.to_production):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_create_takes_the_next_second_when_the_name_is_taken(tmp_path: Path) -> None:
    first = RunDir.create(tmp_path, now=NOW)
    second = RunDir.create(tmp_path, now=NOW)
    third = RunDir.create(tmp_path, now=NOW + 0.2)
    assert [first.started, second.started, third.started] == [
        1367582400,
        1367582401,
        1367582402,
    ]


def test_create_without_now_uses_the_clock(tmp_path: Path) -> None:
    before = int(datetime.now().timestamp())
    run = RunDir.create(tmp_path)
    assert before <= run.started <= int(datetime.now().timestamp()) + 1


def test_create_fsyncs(tmp_path: Path, fsyncs: list[int]) -> None:
    RunDir.create(tmp_path, now=NOW)
    assert len(fsyncs) >= 2  # the run folder and the data folder


# ------------------------------------------------------------------------------ open, list


def test_open_an_existing_run(run: RunDir) -> None:
    again = RunDir.open(run.path)
    assert again == run
    assert again.started == run.started


@pytest.mark.parametrize("name", ["run_at_", "run_at_12x", "runat_12", "run_at_١٢", "other"])
def test_open_refuses_a_folder_not_named_like_a_run(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match="not a run directory"):
        RunDir.open(tmp_path / name)


def test_open_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such folder"):
        RunDir.open(tmp_path / "run_at_5")


def test_list_orders_runs_by_epoch_and_skips_other_entries(tmp_path: Path) -> None:
    for epoch in (900, 1000, 99):  # 99 sorts last as text, first as a number
        RunDir.create(tmp_path, now=epoch)
    (tmp_path / "identity.db").write_text("")
    (tmp_path / "incoming").mkdir()
    (tmp_path / "run_at_7").write_text("a file, not a run")
    assert [r.name for r in RunDir.list(tmp_path)] == ["run_at_99", "run_at_900", "run_at_1000"]


def test_list_of_a_missing_data_dir_is_empty(tmp_path: Path) -> None:
    assert RunDir.list(tmp_path / "absent") == []


# ------------------------------------------------------------------------ audit file writes


def test_audit_files_are_the_old_pipelines_names() -> None:
    assert set(AUDIT_FILES) == {
        "overview.txt",
        "comments.txt",
        "studies_to_retrieve.txt",
        "pull_output.txt",
        "anonymize_output.txt",
        "post_anon_output.txt",
        "post_anon_output_practice.txt",
        "push_output.txt",
        "reviewed_protocol_studies.txt",
        "found_protocol_studies.txt",
        "missing_protocol_studies.txt",
        "done.txt",
    }
    assert rundir.post_anon_output(practice=False) == "post_anon_output.txt"
    assert rundir.post_anon_output(practice=True) == "post_anon_output_practice.txt"


def test_append_adds_lines_and_fsyncs(run: RunDir, fsyncs: list[int]) -> None:
    assert not run.has("pull_output.txt")
    run.append("pull_output.txt", "first")
    run.append("pull_output.txt", "second ünïcode")
    assert run.has("pull_output.txt")
    assert run.read_lines("pull_output.txt") == ["first", "second ünïcode"]
    assert (run.path / "pull_output.txt").read_bytes() == "first\nsecond ünïcode\n".encode()
    # file each time, and the run folder once when the file appeared
    assert len(fsyncs) == 3
    assert stat.S_IMODE((run.path / "pull_output.txt").stat().st_mode) == 0o600


def test_append_accepts_an_empty_line(run: RunDir) -> None:
    run.append("comments.txt", "")
    assert run.read_lines("comments.txt") == [""]


def test_append_refuses_an_unknown_file(run: RunDir) -> None:
    with pytest.raises(ValueError, match="not an audit file"):
        run.append("../escape.txt", "x")
    with pytest.raises(ValueError, match="not an audit file"):
        run.append("overview.text", "x")
    assert not (run.path.parent / "escape.txt").exists()


@pytest.mark.parametrize("line", ["two\nlines", "trailing\n", "carriage\rreturn"])
def test_append_refuses_a_line_break(run: RunDir, line: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        run.append("overview.txt", line)
    assert not run.has("overview.txt")


def test_read_lines_of_an_absent_file_is_empty(run: RunDir) -> None:
    assert run.read_lines("push_output.txt") == []
    with pytest.raises(ValueError, match="not an audit file"):
        run.read_lines("nope.txt")


def test_read_lines_keeps_a_torn_last_line(run: RunDir) -> None:
    (run.path / "push_output.txt").write_bytes(b"whole\ntorn")
    assert run.read_lines("push_output.txt") == ["whole", "torn"]


def test_write_lines_replaces_the_file_atomically(run: RunDir, fsyncs: list[int]) -> None:
    run.write_lines("studies_to_retrieve.txt", ["1.2.3", "1.2.4"])
    assert run.read_lines("studies_to_retrieve.txt") == ["1.2.3", "1.2.4"]
    assert len(fsyncs) == 2  # the file, then the folder after the rename
    run.write_lines("studies_to_retrieve.txt", (uid for uid in ["9.9"]))
    assert run.read_lines("studies_to_retrieve.txt") == ["9.9"]
    run.write_lines("studies_to_retrieve.txt", [])
    assert (run.path / "studies_to_retrieve.txt").read_bytes() == b""
    assert stat.S_IMODE((run.path / "studies_to_retrieve.txt").stat().st_mode) == 0o600
    assert sorted(p.name for p in run.path.iterdir() if p.is_file()) == [
        "studies_to_retrieve.txt"
    ]  # no temporary file left


def test_write_lines_with_a_bad_line_leaves_the_old_file(run: RunDir) -> None:
    run.write_lines("found_protocol_studies.txt", ["kept"])
    with pytest.raises(ValueError, match="line break"):
        run.write_lines("found_protocol_studies.txt", ["fine", "not\nfine"])
    assert run.read_lines("found_protocol_studies.txt") == ["kept"]
    assert [p.name for p in run.path.iterdir() if p.is_file()] == ["found_protocol_studies.txt"]


def test_finish_writes_done(run: RunDir) -> None:
    assert not run.done
    run.finish("Finished at 2013-05-03 15:16")
    assert run.done
    assert run.read_lines("done.txt") == ["Finished at 2013-05-03 15:16"]
    assert RunDir.open(run.path).done


# ------------------------------------------------------------------------------- overview


def test_overview_lines_match_the_old_pipeline(run: RunDir) -> None:
    """The sample overview.txt of ORIGINALS.md, line for line."""
    lines = [
        audit.starting(datetime(2013, 5, 3, 8, 0, 59)),
        audit.valid_reviewed(100),
        audit.received(23948, 100),
        audit.protocol_summary(1, 1),
        audit.protocol_missing(1),
        audit.hooked(22755, 96),
        audit.push_completed(datetime(2013, 5, 3, 15, 15)),
        audit.pushed(96),
    ]
    assert lines == [
        "Starting at 2013-05-03 08:00",
        "100 valid reviewed studies. Please review comments.txt",
        "Received 23948 files containing 100 studies",
        "1 studies marked as having a protocol series, 1 studies found with protocol series "
        "during anonymization.",
        "1 studies marked as having a protocol series but not found, see "
        "'missing_protocol_studies.txt'.",
        "22755 files containing 96 studies were successfully hooked up to an encounter.",
        "Push completed at 2013-05-03 15:15",
        "96 studies marked as pushed",
    ]
    for line in lines:
        run.overview(line)
    assert run.read_lines("overview.txt") == lines


def test_held_back_line() -> None:
    assert audit.held_back(2) == "2 studies held back: their reviews conflict, see comments.txt"


def test_overview_stream_buffers_partial_lines(run: RunDir) -> None:
    stream = run.overview_stream()
    assert stream.write("22755 files containing ") == len("22755 files containing ")
    assert run.read_lines("overview.txt") == []
    stream.write("96 studies\nsecond line\nthird")
    assert run.read_lines("overview.txt") == ["22755 files containing 96 studies", "second line"]
    stream.flush()
    assert run.read_lines("overview.txt")[-1] == "third"
    stream.flush()  # nothing pending: no empty line
    assert len(run.read_lines("overview.txt")) == 3


def test_overview_stream_each_line_is_fsynced(run: RunDir, fsyncs: list[int]) -> None:
    stream = run.overview_stream()
    stream.write("a\nb\n")
    assert run.read_lines("overview.txt") == ["a", "b"]
    assert len(fsyncs) == 3  # each line, and the folder when overview.txt appeared


def test_overview_stream_treats_crlf_and_cr_as_line_ends(run: RunDir) -> None:
    stream = run.overview_stream()
    stream.write("dos\r")
    stream.write("\nmac\runix\n\n")
    assert run.read_lines("overview.txt") == ["dos", "mac", "unix", ""]


def test_overview_stream_works_with_print_and_closes(run: RunDir) -> None:
    with run.overview_stream() as stream:
        print("hooked", 3, "studies", file=stream)
        stream.writelines(["no newline"])
        assert stream.writable()
    assert run.read_lines("overview.txt") == ["hooked 3 studies", "no newline"]
    assert stream.closed
    with pytest.raises(ValueError, match="closed"):
        stream.write("late\n")


# ------------------------------------------------------------------------------- comments


def test_comments_lines() -> None:
    lines = audit.comments_lines(
        [
            ("1.2.3", ["looks fine", "second reviewer:\nhas a\r\nprotocol series"], None),
            ("1.2.4", [], None),
            ("1.2.5", ["ok", ""], "one reviewer approved, one rejected"),
            ("1.2.6", [], "reason\nover two lines"),
        ]
    )
    assert lines == [
        "1.2.3",
        "\tlooks fine",
        "\tsecond reviewer:",
        "\thas a",
        "\tprotocol series",
        "1.2.4",
        "1.2.5\tHELD BACK: one reviewer approved, one rejected",
        "\tok",
        "1.2.6\tHELD BACK: reason over two lines",
    ]


def test_comments_lines_written_to_comments_txt(run: RunDir) -> None:
    run.write_lines("comments.txt", audit.comments_lines([("1.2.3", ["a\nb"], None)]))
    assert (run.path / "comments.txt").read_text() == "1.2.3\n\ta\n\tb\n"


@pytest.mark.parametrize("uid", ["1.2\t3", "1.2\n3"])
def test_comments_lines_refuses_a_uid_that_breaks_the_layout(uid: str) -> None:
    with pytest.raises(ValueError, match="study UID"):
        audit.comments_lines([(uid, [], None)])
