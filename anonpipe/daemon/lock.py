"""One daemon per data folder: an advisory lock taken at start-up, released by the kernel.

Two daemons (or a daemon and a ``run-once``) on one data folder would run the same run: the
second one's C-MOVE lands at the first one's SCP and it reports a false misroute. A ``flock`` on
``<data_dir>/anonpipe.lock`` is held for the life of the process and dropped by the kernel when
it dies, even by kill -9, so a stale lock never needs clearing by hand. The file holds the pid
of the holder, for the message the second process prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["DataDirLock", "DataDirLocked"]


class DataDirLocked(Exception):
    """Another process holds the data folder; the message names its pid and the fix."""


class DataDirLock:
    """``acquire`` at start-up, ``release`` at the end (closing the file releases it too)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "anonpipe.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DataDirLocked` at once (never waits).

        Raises
        ------
        DataDirLocked
            If another process holds it.
        OSError
            If the data folder cannot hold the lock file.
        """
        if self._fd is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DataDirLocked(
                f"data folder {self.data_dir} is in use by another anonpipe (pid {holder});"
                " stop that one first, or give this one its own [pipeline] data_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (safe to call twice)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
