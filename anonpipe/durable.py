"""Durability on disk: what "written" means everywhere in anonpipe."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from pathlib import Path

__all__ = ["free_bytes", "fsync_path", "move_file", "sync_filesystem"]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data to disk (a directory: so a rename in it survives).

    fsync acts on the file, not the descriptor, so a fresh read-only descriptor is enough.
    A path that no longer exists is ignored.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Flush everything written to the filesystem holding *path* (``syncfs``), not the whole
    machine as ``os.sync()`` does: one flush for a batch of files instead of one per file.

    Falls back to ``os.sync()`` where ``syncfs`` is unavailable.
    """
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    while not path.exists() and path != path.parent:
        path = path.parent  # a folder not created yet: its filesystem is its parent's
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs failed: {os.strerror(error)}", str(path))
    finally:
        os.close(fd)


def move_file(source: Path, dest: Path, *, flush: bool = True) -> None:
    """Move *source* to *dest* atomically: a rename, or across filesystems a copy.

    With *flush*, *source* is flushed before and *dest*'s folder after the rename, so the move
    survives a power cut once this returns. Across filesystems the bytes are copied beside
    *dest* under a hidden name, flushed, renamed into place (the folder flushed), and only then
    is *source* removed: a crash leaves the file in one place or both, never in neither.

    Raises
    ------
    OSError
        When the move fails; *source* is then still there and *dest* unchanged.
    """
    if flush:
        fsync_path(source)
    try:
        os.replace(source, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = dest.with_name(f".{dest.name}.part")
        try:
            shutil.copyfile(source, partial)
            fsync_path(partial)
            os.replace(partial, dest)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fsync_path(dest.parent)
        source.unlink()
        return
    if flush:
        fsync_path(dest.parent)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding *path*."""
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize
