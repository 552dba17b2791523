"""Durability on disk: what "written" means everywhere in anonpipe.

Objects pulled by C-MOVE still exist in the staging PACS, so one lost to a power cut costs a
re-pull, not data: they are not fsynced one by one as they land (an fsync of file and folder
before each C-STORE response cost ~3.5 ms per object here), only renamed atomically into their
final name. A study's landing folder, and its tree of de-identified outputs, are made durable
in one go (:func:`sync_folder`, :func:`sync_tree`) before the study is counted pulled or its
push recorded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from pathlib import Path

__all__ = ["free_bytes", "fsync_path", "move_file", "sync_filesystem", "sync_folder", "sync_tree"]

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


def sync_folder(path: Path) -> int:
    """Make the folder *path* durable: fsync each file in it, the folder, and its parent (so a
    folder created for this study survives too). Returns how many files were flushed.

    Per file rather than ``syncfs``: the cost stays that of this folder's own files, whatever
    else is being written to the filesystem (another study landing, outputs being written).
    Measured here on 400 objects (211 MB) just landed: 0.01-0.09 s either way on an idle disk;
    with another writer busy on the same filesystem, 0.02-0.03 s against 0.07-0.15 s for
    ``syncfs``, which waits for the other writer's data too.
    Subfolders are not descended into (:func:`sync_tree` does); a file removed meanwhile is
    skipped.

    Raises
    ------
    OSError
        If *path* cannot be listed or a flush fails (an I/O error: the data is not durable).
    """
    files = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                fsync_path(Path(entry.path))
                files += 1
    fsync_path(path)
    fsync_path(path.parent)
    return files


def sync_tree(root: Path) -> int:
    """:func:`sync_folder` for *root* and every folder below it (e.g. a study's de-identified
    ``<study>/<series>/<instance>.dcm`` tree), deepest first, so that each folder is flushed
    after the entries made in it. Returns how many files were flushed; 0 when *root* does not
    exist (a study whose every object was quarantined has no outputs).

    Raises
    ------
    OSError
        If a folder cannot be listed or a flush fails.
    """
    if not root.is_dir():
        return 0
    files = 0
    for folder, _subfolders, _names in os.walk(root, topdown=False, onerror=_raise):
        files += sync_folder(Path(folder))
    return files


def _raise(error: OSError) -> None:
    raise error


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
