"""The durability helpers: what "written" means everywhere in anonpipe."""

from __future__ import annotations

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
