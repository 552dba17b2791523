"""A command whose reader goes away (``anonpipectl status | head -1``) ends quietly.

Python ignores SIGPIPE, so writing to a pipe whose reader has closed raises
:class:`BrokenPipeError`: at a ``print`` (at once when unbuffered, ``PYTHONUNBUFFERED``, or
once the buffer fills) or at the interpreter's last flush, which prints "Exception ignored"
and a traceback. Both entry points (``anonpipe`` and ``anonpipectl``) run their command through
:func:`quiet_on_closed_pipe`: once the reader is gone, the rest of the output is dropped, the
command finishes what it was doing and exits with its own code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO, cast

__all__ = ["quiet_on_closed_pipe"]


class _Stdout:
    """``sys.stdout`` while a command runs: writes after the reader has gone are dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def _drop(self) -> None:
        """From now on nothing is written, and what the stream still buffers goes to
        ``/dev/null`` when it is flushed (at exit): the pipe is never written again."""
        self.reader_gone = True
        # No file behind the stream (a test's capture): nothing to point elsewhere.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.stream.fileno())
            finally:
                os.close(devnull)


def quiet_on_closed_pipe(run: Callable[[], int]) -> int:
    """Run *run* with a ``sys.stdout`` that a closed pipe cannot break, then flush it.

    Returns *run*'s exit code: a reader that wanted less of the output (``| head -1``) does not
    make the command fail, and no traceback is printed.
    """
    before = sys.stdout
    guarded = _Stdout(before)
    sys.stdout = cast(TextIO, guarded)
    try:
        return run()
    finally:
        guarded.flush()
        sys.stdout = before
