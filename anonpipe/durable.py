"""Durability on disk: what "written" means everywhere in anonpipe."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_path"]


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
