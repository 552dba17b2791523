"""systemd glue: ``sd_notify`` messages and the watchdog.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC`` with
``WatchdogSec=``); the daemon answers ``READY=1`` once it serves, ``STATUS=`` on state changes,
``WATCHDOG=1`` while its main loop is alive, and ``STOPPING=1`` when it drains. Without
``NOTIFY_SOCKET`` (a terminal, a test) every call is a quiet no-op. Messages go through
``systemd.daemon.notify`` (systemd-python), which reads ``NOTIFY_SOCKET`` from the process
environment when it sends.

Children must not inherit these variables (a child could report for us): start subprocesses with
:func:`child_environment`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

from anonpipe.logs import get_logger
from systemd import daemon as sd_daemon

__all__ = ["NOTIFY_VARIABLES", "Notifier", "child_environment"]

#: The variables systemd sets for the main process only.
NOTIFY_VARIABLES: tuple[str, ...] = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

log = get_logger(__name__)


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` without :data:`NOTIFY_VARIABLES`, for subprocesses.

    Parameters
    ----------
    environ : mapping of str to str
        Usually ``os.environ``.

    Returns
    -------
    dict of str to str
        The same variables, minus ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.
    """
    return {key: value for key, value in environ.items() if key not in NOTIFY_VARIABLES}


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, as ``sd_watchdog_enabled(3)`` advises, or None."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner is not None:
        try:
            if int(owner) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends ``sd_notify`` messages to systemd when it asked for them.

    Parameters
    ----------
    environ : mapping of str to str, optional
        Where to find ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``; read once, here.
        Defaults to ``os.environ``.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._enabled = bool(env.get("NOTIFY_SOCKET"))
        self._interval = _watchdog_seconds(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether systemd passed a notification socket."""
        return self._enabled

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None.

        None when systemd set no watchdog, or set it for another process (``WATCHDOG_PID``).
        """
        return self._interval

    def ready(self, status: str = "") -> None:
        """``READY=1``: start-up finished (the SCP listens, the stores are open)."""
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        """``STATUS=``: one line for ``systemctl status``; newlines become spaces."""
        self._send(None, text)

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the main loop is alive."""
        self._send("WATCHDOG=1", "")

    def stopping(self, status: str = "") -> None:
        """``STOPPING=1``: shutdown began (drain of associations and runs)."""
        self._send("STOPPING=1", status)

    async def watchdog_loop(self, alive: Callable[[], bool]) -> None:
        """Ping the watchdog every :attr:`watchdog_interval` while ``alive()`` says so.

        A ping is sent only when ``alive()`` returns True, so a stuck main loop lets systemd's
        watchdog fire. Returns at once when there is no watchdog or no notification socket;
        otherwise runs until cancelled.

        Parameters
        ----------
        alive : callable returning bool
            The liveness check, e.g. "the main loop ticked recently".
        """
        interval = self._interval
        if interval is None or not self._enabled:
            return
        withheld = False
        while True:
            if alive():
                if withheld:
                    log.info("watchdog pings resumed")
                withheld = False
                self.watchdog()
            elif not withheld:
                withheld = True
                log.warning("watchdog ping withheld: the main loop is not alive")
            await asyncio.sleep(interval)

    def _send(self, message: str | None, status: str) -> None:
        if not self._enabled:
            return
        lines = [] if message is None else [message]
        if status or message is None:
            lines.append(f"STATUS={_one_line(status)}")
        try:
            sent = bool(sd_daemon.notify("\n".join(lines)))
        except OSError as exc:
            self._warn_once(exc.strerror or type(exc).__name__)
            return
        if not sent:
            self._warn_once("NOTIFY_SOCKET is no longer in the process environment")

    def _warn_once(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("systemd notification failed; further failures not logged", error=reason)
