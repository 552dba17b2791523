"""Where pynetdicom streams each received data set: a spool file in our own folder.

pynetdicom (with ``STORE_RECV_CHUNKED_DATASET``) writes every incoming object, fragment by
fragment, into a ``tempfile.NamedTemporaryFile`` in ``TMPDIR`` and hands the handler its path.
Two things about that are not acceptable for a resident service, so the SCP swaps in
:class:`SpoolFile` when it starts (:func:`install`), in this one place:

- the file must be on the landing filesystem, so landing is a rename and not a second copy:
  spool files go to a folder the SCP is given (the daemon uses ``<data_dir>/incoming``);
- a full disk raised ``OSError`` inside pynetdicom's network thread, which killed the association
  without an answer (the peer then waits out its timeout, and the partial file stayed). A
  :class:`SpoolFile` keeps the error, empties itself and lets the transfer finish; the C-STORE
  handler then answers Out of Resources (0xA700);
- the free-space floor (``[local] min_free_mb``) must hold while an object arrives, not only
  when it lands: one large object (unsolicited, even) filled a small data disk before it was
  refused, and a legitimate pull beside it lost objects. A :class:`SpoolFile` checks the free
  space every :data:`CHECK_EVERY` bytes and fails, as for a full disk, below the floor;
- an association that ends in the middle of an object (peer killed, network cut, abort) left
  that partial file behind until the next restart, patient data and disk space included, for a
  service that runs for months: :func:`discard_unfinished` deletes it when the connection closes.

The swap targets ``pynetdicom.dimse_messages.NamedTemporaryFile`` (pynetdicom 3.0); the full-disk
test in ``tests/net`` fails if a pynetdicom release stops calling it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["BelowFloor", "SpoolFile", "discard_unfinished", "install", "spool_error", "sweep"]

PREFIX = "in-"
SUFFIX = ".dcm"

#: How often (bytes written) a spool file checks the free-space floor: one ``fstatvfs`` per MiB.
CHECK_EVERY = 1 << 20

#: What a spool file stopped at the floor keeps: its header's UIDs are in the first bytes.
KEEP_HEADER = 64 << 10

_lock = threading.Lock()
_directory: Path | None = None
_floor = 0


class BelowFloor(OSError):
    """Writing on would take the landing filesystem below its free-space floor."""


class SpoolFile:
    """A write-only spool file that records, instead of raising, a failed write.

    It offers what pynetdicom uses of a ``NamedTemporaryFile``: ``name``, ``write``,
    ``file.flush()`` and ``close``.
    """

    def __init__(self, directory: Path, floor: int = 0) -> None:
        fd, name = tempfile.mkstemp(prefix=PREFIX, suffix=SUFFIX, dir=directory)
        self.name = name
        self._fd = fd
        self._floor = floor
        # The first check comes once the header is written (the lander checks small objects).
        self._unchecked = CHECK_EVERY - KEEP_HEADER
        self.error: OSError | None = None

    @property
    def file(self) -> SpoolFile:
        return self  # pynetdicom calls ``.file.flush()``

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                self._fail(exc)
        if self._floor and self.error is None:
            self._unchecked += len(data)
            if self._unchecked >= CHECK_EVERY:
                self._unchecked = 0
                self._check_floor()
        return len(data)

    def _check_floor(self) -> None:
        """Fail when the next :data:`CHECK_EVERY` bytes could take us below the floor."""
        try:
            stats = os.fstatvfs(self._fd)
        except OSError as exc:
            self._fail(exc)
            return
        if stats.f_bavail * stats.f_frsize - CHECK_EVERY < self._floor:
            self._fail(BelowFloor(errno.ENOSPC, "the free-space floor is reached"))

    def flush(self) -> None:
        """Unbuffered: every ``write`` already reached the kernel."""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        # Give the space back at once; below the floor, keep the start of the header, so the
        # refusal can be counted against the study that was expected.
        keep = KEEP_HEADER if isinstance(exc, BelowFloor) else 0
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, min(keep, os.fstat(self._fd).st_size))


def _spool_factory(*_args: Any, **_kwargs: Any) -> SpoolFile:
    directory = _directory
    if directory is None:
        directory = Path(tempfile.gettempdir())
    return SpoolFile(directory, _floor)


def install(directory: Path, floor: int = 0) -> None:
    """Make pynetdicom spool received data sets into *directory* through :class:`SpoolFile`,
    keeping at least *floor* bytes free on its filesystem."""
    global _directory, _floor
    from pynetdicom import dimse_messages

    with _lock:
        _directory = directory
        _floor = floor
        setattr(dimse_messages, "NamedTemporaryFile", _spool_factory)  # noqa: B010


def spool_error(request: Any) -> OSError | None:
    """The write error of the C-STORE request's spool file, if writing it failed."""
    spool = getattr(request, "_dataset_file", None)
    return spool.error if isinstance(spool, SpoolFile) else None


def discard_unfinished(assoc: Any) -> bool:
    """Delete the spool file of the data set *assoc* was receiving when its connection closed.

    pynetdicom keeps the message being decoded on the association's DIMSE provider and forgets
    it, file and all, when the connection ends; a finished message was already handed over (and
    its file landed or deleted). Returns whether there was a partial file.
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    spool = getattr(message, "_data_set_file", None)
    if not isinstance(spool, SpoolFile):
        return False
    spool.close()
    Path(spool.name).unlink(missing_ok=True)
    message._data_set_file = None  # type: ignore[union-attr]
    return True


def sweep(directory: Path) -> int:
    """Delete spool files left by a previous process (objects never acknowledged: the sender
    retries them). Returns how many were removed."""
    removed = 0
    for leftover in directory.glob(f"{PREFIX}*{SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed
