"""The durability helpers: what "written" means everywhere in anonpipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anonpipe import durable


def test_fsync_path_flushes_files_and_folders_and_ignores_missing(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("x")
    durable.fsync_path(target)
    durable.fsync_path(tmp_path)
    durable.fsync_path(tmp_path / "gone")  # no error


def test_sync_filesystem_uses_syncfs_on_the_folder_or_its_nearest_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = durable._libc.syncfs

    def spy(fd: int) -> int:
        calls.append(fd)
        return int(real(fd))

    monkeypatch.setattr(durable._libc, "syncfs", spy)
    durable.sync_filesystem(tmp_path)
    durable.sync_filesystem(tmp_path / "not" / "created" / "yet")
    assert len(calls) == 2


def test_sync_filesystem_reports_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable._libc, "syncfs", lambda _fd: -1)
    with pytest.raises(OSError, match="syncfs failed"):
        durable.sync_filesystem(tmp_path)


def _spy_fsync(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    flushed: list[Path] = []
    real = durable.fsync_path

    def spy(path: Path) -> None:
        flushed.append(path)
        real(path)

    monkeypatch.setattr(durable, "fsync_path", spy)
    return flushed


def test_sync_folder_flushes_each_file_then_the_folder_and_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    landing = tmp_path / "from_staging" / "7"
    (landing / "sub").mkdir(parents=True)
    for name in ("1.2.3.dcm", "1.2.4.dcm", ".hidden.part"):
        (landing / name).write_bytes(b"x")
    (landing / "sub" / "deeper.dcm").write_bytes(b"x")
    flushed = _spy_fsync(monkeypatch)
    assert durable.sync_folder(landing) == 3
    files = {landing / n for n in ("1.2.3.dcm", "1.2.4.dcm", ".hidden.part")}
    assert set(flushed[:3]) == files  # files first: their names are flushed with the folder
    assert flushed[3:] == [landing, landing.parent]  # subfolders are sync_tree's


def test_sync_folder_reports_an_io_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.dcm").write_bytes(b"x")

    def failing(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output"):
        durable.sync_folder(tmp_path)


def test_sync_tree_flushes_every_folder_after_its_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "to_production"
    for series in ("s1", "s2"):
        (root / "study" / series).mkdir(parents=True)
        for n in range(2):
            (root / "study" / series / f"{n}.dcm").write_bytes(b"x")
    flushed = _spy_fsync(monkeypatch)
    assert durable.sync_tree(root) == 4

    def last(path: Path) -> int:  # a folder is flushed again as its subfolders' parent
        return len(flushed) - 1 - flushed[::-1].index(path)

    study = root / "study"
    for series in ("s1", "s2"):
        folder = study / series
        assert last(folder / "0.dcm") < last(folder) < last(study)
        assert last(folder / "1.dcm") < last(folder)
    assert last(study) < last(root) < last(tmp_path)


def test_sync_tree_of_a_missing_folder_does_nothing(tmp_path: Path) -> None:
    assert durable.sync_tree(tmp_path / "nothing clean") == 0
