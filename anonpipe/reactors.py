"""pynetdicom's association threads wait for work instead of waking every millisecond.

Each pynetdicom association runs two threads that poll: the DUL thread (the network side) sleeps
1 ms between looks at its socket and queues whenever it had nothing to do, and the association's
reactor sleeps 1 ms on every turn. Measured here: one idle association with both ends in one
process cost 0.19 of a core, four cost 0.66; in an end-to-end run (two C-MOVEs receiving, two
pushes sending) this polling was about a third of the daemon's CPU on a 2-core machine.

:func:`install` makes one association's threads wait on what they actually wait for:

- the DUL thread on its socket (``select``) and a wake-up pipe written whenever something is put
  on its queues (a PDU to send, a transport event) or it is told to stop;
- the reactor on an event set whenever a DIMSE message or an ACSE primitive (release, abort) is
  queued for it, or a request of ours pauses it (the request waits until it has).

Either wait ends after :data:`MAX_WAIT` at the latest, so pynetdicom's timers (ARTIM, the idle
timeout) and flags it sets without a queue still work, at most that much later; while the DUL
thread is being stopped, the reactor polls as before (it waits for that thread to end).

pynetdicom calls ``time.sleep`` from its modules ``pynetdicom.dul`` and
``pynetdicom.association``; those modules' ``time`` becomes a stand-in whose ``sleep`` runs the
calling thread's wait if it is such a thread and the sleep is pynetdicom's 1 ms poll, and sleeps
as asked otherwise (e.g. the 10 ms steps in which an ending association waits for its peer to
close the connection). Installing is safe at any moment of an association's life: work
queued before it is seen at the next bounded wait.
"""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_WAIT", "install", "on_open"]

#: The longest a waiting thread stays asleep with nothing to wake it (seconds).
MAX_WAIT = 0.1

#: Thread (a DUL or an association) -> the wait that replaces its poll.
#: pynetdicom's own poll interval, kept where there is nothing to wait on.
_PYNETDICOM_POLL = 0.001

_WAITS: weakref.WeakKeyDictionary[threading.Thread, Callable[[Any], None]] = (
    weakref.WeakKeyDictionary()
)
_patched = False
_patch_lock = threading.Lock()


class _Clock:
    """pynetdicom's view of :mod:`time`: the same, but ``sleep`` waits for work when it can."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        polling = seconds <= _PYNETDICOM_POLL  # other sleeps wait for something else
        wait = _WAITS.get(threading.current_thread()) if polling else None
        if wait is None:
            time.sleep(seconds)
        else:
            wait(threading.current_thread())


def _patch_pynetdicom() -> None:
    global _patched
    with _patch_lock:
        if _patched:
            return
        from pynetdicom import association, dul

        clock = _Clock()
        for module in (dul, association):
            setattr(module, "time", clock)  # noqa: B010 (a module's global, not an attribute)
        _patched = True


class _Wakeup:
    """What wakes one association's two threads: a pipe for the DUL thread (it must also watch
    its socket, so it waits in ``select``), an event for the reactor."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._written = False
        #: Guards the pipe's fds: once closed, their numbers may belong to another file.
        self._lock = threading.Lock()
        self._closed = False
        self.reactor = threading.Event()

    def close(self) -> None:
        """Close the pipe (idempotent). Called as soon as the DUL thread has ended, so an
        association's fds do not wait for the cyclic garbage collector."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._read, self._write):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def dul(self) -> None:
        if self._written:
            return
        with self._lock:
            if self._closed:
                return
            self._written = True
            with contextlib.suppress(OSError):  # full: it is read soon
                os.write(self._write, b"\0")

    def wait_dul(self, dul: Any) -> None:
        if dul._kill_thread:
            return  # told to stop: it checks that next
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        watched: list[Any] = [self._read]
        if sock is not None and sock.fileno() >= 0:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes waiting that select cannot see
            watched.append(sock)
        try:
            ready, _, _ = select.select(watched, [], [], MAX_WAIT)
        except (OSError, ValueError):  # the socket closed under us: let pynetdicom see it
            return
        if self._read in ready:
            with self._lock:
                if self._closed:
                    return
                with contextlib.suppress(OSError):
                    os.read(self._read, 4096)
                self._written = False

    def wait_reactor(self, assoc: Any) -> None:
        if assoc.dul._kill_thread:
            # pynetdicom's kill() waits here for the DUL thread to end: nothing wakes us then
            time.sleep(_PYNETDICOM_POLL)
            return
        self.reactor.wait(MAX_WAIT)
        self.reactor.clear()


def _notify_on_put(q: Any, notify: Callable[[], None]) -> None:
    put = q.put

    def put_and_wake(item: Any, *args: Any, **kwargs: Any) -> None:
        put(item, *args, **kwargs)
        notify()

    q.put = put_and_wake


def install(assoc: Any) -> None:
    """Make `assoc`'s DUL thread and reactor wait for work instead of polling (idempotent)."""
    _patch_pynetdicom()
    dul = assoc.dul
    if dul in _WAITS:
        return
    wakeup = _Wakeup()
    weakref.finalize(dul, wakeup.close)

    def wake_both() -> None:
        wakeup.dul()
        wakeup.reactor.set()

    _notify_on_put(dul.to_provider_queue, wakeup.dul)
    _notify_on_put(dul.event_queue, wakeup.dul)
    _notify_on_put(dul.to_user_queue, wakeup.reactor.set)
    _notify_on_put(assoc.dimse.msg_queue, wakeup.reactor.set)
    # A request about to be sent pauses the reactor and waits until it has (``_is_paused``):
    # it must not sleep through that.
    checkpoint = assoc._reactor_checkpoint
    pause = checkpoint.clear

    def pause_and_wake() -> None:
        pause()
        wakeup.reactor.set()

    checkpoint.clear = pause_and_wake
    stop_dul = dul.stop_dul

    def stop_and_wake() -> bool:
        wake_both()
        stopped: bool = stop_dul()
        if stopped:  # the DUL thread has ended: nothing reads or writes the pipe any more
            wakeup.close()
        return stopped

    dul.stop_dul = stop_and_wake
    # pynetdicom's kill() returns once the DUL thread has ended (it skips stop_dul when that
    # thread ended by itself); every way an association ends goes through it.
    kill = assoc.kill

    def kill_and_close() -> None:
        kill()
        if not dul.is_alive():
            wakeup.close()

    assoc.kill = kill_and_close
    _WAITS[dul] = wakeup.wait_dul  # the thread is passed in: no reference to it is kept
    _WAITS[assoc] = wakeup.wait_reactor


def on_open(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler: :func:`install` on the new connection's association."""
    install(event.assoc)
