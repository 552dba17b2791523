"""``anonpipe daemon`` as systemd runs it, for tests: a subprocess with a NOTIFY_SOCKET, its
own process group (the "cgroup" a kill takes down), and read-only views of its state store."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.harness.deployment import Site, StudyPlan, build_site
from tests.harness.orthanc import OrthancFactory

__all__ = ["Daemon", "make_site", "query_state", "run_state"]


class Daemon:
    """``anonpipe daemon`` in a subprocess, with a NOTIFY_SOCKET the test reads."""

    def __init__(self, site: Site, notify_dir: Path) -> None:
        self.site = site
        self.notify_path = notify_dir / f"notify-{time.monotonic_ns()}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)
        self.messages: list[str] = []
        self.leftovers: bool | None = None
        # Read datagrams as they come, like systemd: an unread queue (10 datagrams by default)
        # would block the daemon's sendmsg.
        self._reading = True
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), WATCHDOG_USEC="2000000")
        self.log = (site.root / "daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anonpipe.cli", "daemon", "-c", str(site.config_path)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=site.root,
            start_new_session=True,  # its own process group: the "cgroup" a kill takes down
        )

    def _read_loop(self) -> None:
        while self._reading:
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def read_notifications(self) -> list[str]:
        return list(self.messages)

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 120.0, what: str = ""
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}): {self.log_tail()}")
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return (self.site.root / "daemon.log").read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """kill -9 the daemon and everything it started (its de-identification workers), as
        systemd does with a service's cgroup."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.close()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
            # The forkserver and resource tracker leave once they see their parent gone.
            self.leftovers = True
            deadline = time.monotonic() + 10
            while self.leftovers and time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                    time.sleep(0.1)
                except ProcessLookupError:
                    self.leftovers = False
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # nothing may outlive the test
        time.sleep(0.3)  # the last datagrams
        self.close()
        return code

    def close(self) -> None:
        self._reading = False
        self._reader.join(2)
        self.notify.close()
        self.notify_path.unlink(missing_ok=True)
        self.log.close()


def query_state(site: Site, sql: str) -> list[tuple[object, ...]]:
    path = site.data_dir / "state.db"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


def run_state(site: Site) -> str | None:
    rows = query_state(site, "SELECT state FROM runs ORDER BY started DESC LIMIT 1")
    return str(rows[0][0]) if rows else None


def make_site(orthanc_factory: OrthancFactory, root: Path, sockets: Path, plan: StudyPlan) -> Site:
    staging = orthanc_factory("STAGING")
    research = orthanc_factory("RESEARCH")
    site, _port = build_site(root, staging, research, plan, socket_path=sockets / "ctl.sock")
    return site
