"""The service lifecycle: start (stores, SCP, control socket, READY=1), run (the scheduler), stop.

Like uvicorn's ``Server``: :meth:`Service.start` opens everything in dependency order and fails
early with a clear message, :meth:`Service.run` loops until its shutdown trigger fires, and
:meth:`Service.stop` closes in reverse order (STOPPING=1, no new work, drain the SCP's open
associations, close the stores). Signal handlers only set the trigger.

The scheduling state an operator changes lives here too: the pause (kept in the state store
until resume, so a restart does not forget it) and the poll on demand. What the control socket's
commands do with them is :mod:`anonpipe.daemon.commands`; what status shows,
:mod:`anonpipe.daemon.status`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from anonpipe.anon.identity import check_identity
from anonpipe.config import Settings
from anonpipe.daemon.commands import Commands
from anonpipe.daemon.control import ControlServer
from anonpipe.daemon.lock import DataDirLock
from anonpipe.daemon.notify import Notifier
from anonpipe.daemon.reviewdb import review_database
from anonpipe.daemon.runner import (
    PeerOutage,
    Pipeline,
    RunStopped,
    StopSignal,
    execute_run,
    failure_text,
)
from anonpipe.daemon.state import PAUSED, RunRecord, StateStore
from anonpipe.daemon.states import RunState
from anonpipe.daemon.status import PeerStatus, ServiceState
from anonpipe.hooks import resolve_hook
from anonpipe.logs import get_logger
from anonpipe.scp import LandingRegistry, StorageSCP
from anonpipe.scu import (
    MisrouteError,
    MisrouteGuard,
    echo,
    end_open_associations,
    remote_peers,
)
from anonpipe.web import WebServer, start_web

__all__ = ["Service", "state_store_path"]

log = get_logger(__name__)


#: How long a stopping service lets inbound associations finish before it aborts them: short,
#: so SIGTERM ends the daemon within 10 s in every state (an unfinished object is not kept, and
#: the sender was never told it landed).
DRAIN_SECONDS = 5.0


def state_store_path(settings: Settings) -> Path:
    """``state.db`` beside the data folder (never inside a run directory)."""
    return settings.pipeline.data_dir / "state.db"


class Service:
    """The resident daemon (``anonpipe daemon``) and the engine of ``anonpipe run-once``."""

    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.store = StateStore(state_store_path(settings))
        self.review = review_database(
            settings.review.database,
            settings.review.table_prefix,
            password_file=settings.review.password_file,
        )
        self.registry = LandingRegistry()
        data_dir = settings.pipeline.data_dir
        self.guard = MisrouteGuard(data_dir / "misroute.json")
        self.scp = StorageSCP(
            settings.local,
            settings.allowed_peers,
            self.registry,
            min_free_bytes=settings.local.min_free_mb * 2**20,
            spool_dir=data_dir / "incoming",
        )
        self.lock = DataDirLock(data_dir)
        self.control: ControlServer | None = None
        #: The read-only status pages and /metrics ([web]); listening only between start and stop.
        self.web = WebServer()
        #: Pause (the step in hand finishes) and shutdown (SIGTERM/SIGINT or stop(); read from
        #: the transfer threads too): what the runs see.
        self.stop_signal = StopSignal()
        #: When the operator's pause began (UTC, ISO 8601), None when not paused by one.
        self.paused_since: str | None = None
        self.waiting: str | None = None
        self._down = ""  # the unreachable PACS at the last cycle, for logging changes only
        #: What the last C-ECHO (or a failed association since) found, by name.
        self.peers: dict[str, PeerStatus] = {}
        self._poll = asyncio.Event()
        self._shutdown: asyncio.Event | None = None
        self.pipeline: Pipeline | None = None

    @property
    def stopping(self) -> bool:
        """True once shutting down: the run stops at its next boundary, nothing new starts."""
        return self.stop_signal.now.is_set()

    @property
    def shutting_down(self) -> threading.Event:
        """Set on SIGTERM/SIGINT or :meth:`stop`."""
        return self.stop_signal.now

    @property
    def paused(self) -> bool:
        """The step in hand finishes, nothing new starts (an operator's pause, or a misroute)."""
        return self.stop_signal.paused

    async def pause(self) -> None:
        """Pause until :meth:`resume`, in the state store first: a restart stays paused."""
        flag = await self.store.set_flag(PAUSED, "operator")
        self.paused_since = flag.since if flag else None
        self.stop_signal.paused = True
        self.notifier.status(self._status_line())
        log.info("paused by the operator")

    async def resume(self) -> bool:
        """Undo a pause (and a misroute's block), then look for work at once; returns whether
        the misroute guard was cleared."""
        cleared = self.guard.clear()
        await self.store.set_flag(PAUSED, None)
        self.paused_since = None
        self.stop_signal.paused = False
        self.poll_now()
        self.notifier.status(self._status_line())
        log.info("resumed by the operator", misroute_cleared=cleared)
        return cleared

    def poll_now(self) -> None:
        """Start the next cycle now rather than at the next poll interval."""
        self._poll.set()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, *, control: bool = True) -> None:
        """Lock the data folder, open the stores, start the SCP and the control socket, then tell
        systemd READY=1."""
        hook = resolve_hook(
            self.settings.pipeline.post_anon_hook, self.settings.pipeline.hook_files
        )
        # An identity.db anonpipe did not create (the old pipeline's), or one another key wrote
        # (every known patient would silently get new pseudonyms), stops start-up unchanged.
        check_identity(self.settings.anon.identity_db, self.settings.anon.key_file)
        await self.review.check()
        self.lock.acquire()
        try:
            await self.store.open()
            paused = await self.store.flag(PAUSED)
        except BaseException:
            await self.store.close()
            self.lock.release()
            raise
        if paused is not None:  # paused before a restart: stays paused until resume
            self.stop_signal.paused = True
            self.paused_since = paused.since
        self.pipeline = Pipeline(
            self.settings,
            self.store,
            self.review,
            self.registry,
            self.guard,
            hook,
            stop=self.stop_signal,
            on_state=lambda text: self.notifier.status(f"running {text}"),
        )
        try:
            self.scp.start()
            if control:
                self.web = await start_web(self.settings, self)
                self.control = ControlServer(
                    self.settings.control.socket, Commands(self).handlers()
                )
                await self.control.start()
        except BaseException:
            # Undo what opened, so a failed start leaves no thread or socket behind.
            await self.web.stop()
            await asyncio.to_thread(self.scp.stop, 0.0)
            await self.store.close()
            self.lock.release()
            raise
        self.notifier.ready(self._status_line())
        log.info(
            "service started", scp_port=self.scp.port, paused=self.paused, since=self.paused_since
        )

    async def stop(self) -> None:
        """STOPPING=1, stop taking work, drain the SCP, close the control socket and stores."""
        self.shutting_down.set()
        self.notifier.stopping("stopping: draining associations")
        if self.control is not None:
            await self.control.stop()
        await self.web.stop()
        await asyncio.to_thread(self.scp.stop, DRAIN_SECONDS)
        await self.store.close()
        self.lock.release()
        log.info("service stopped")

    async def run(self, shutdown: asyncio.Event, *, once: bool = False) -> None:
        """Poll and run until *shutdown* is set (or, with *once*, after one run)."""
        self._shutdown = shutdown
        watchdog = asyncio.create_task(self.notifier.watchdog_loop(lambda: not shutdown.is_set()))
        try:
            while not shutdown.is_set():
                await self._cycle()
                if once:
                    return
                self._poll.clear()
                waits = [
                    asyncio.create_task(shutdown.wait()),
                    asyncio.create_task(self._poll.wait()),
                ]
                await asyncio.wait(
                    waits,
                    timeout=self.settings.review.poll_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in waits:
                    task.cancel()
        finally:
            watchdog.cancel()

    async def serve(self) -> None:
        """start → run until SIGTERM/SIGINT → stop (``anonpipe daemon``)."""
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()

        def request_stop() -> None:
            # Flags: the run stops at its next step boundary, then run() returns; and a request
            # waiting on a peer (a silent one included) ends now instead of at the DIMSE timeout.
            self.shutting_down.set()
            shutdown.set()
            end_open_associations("the service is stopping")

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, request_stop)
        await self.start()
        try:
            await self.run(shutdown)
        finally:
            self.shutting_down.set()
            await self.stop()

    # -- scheduling -------------------------------------------------------------------------

    async def _cycle(self) -> None:
        """Resume an unfinished run, or start a new one if there is work; one at a time."""
        if self.pipeline is None or self.paused:
            return
        if self.guard.tripped:
            self.notifier.status(f"blocked: {self.guard.tripped}")
            return
        await self._echo_peers()
        run = await self.store.unfinished_run()
        if run is None and (failed := await self._failed_run()) is not None:
            # One run at a time, and the previous must be done: a failed run waits for the
            # operator (anonpipectl restart-run) rather than being overtaken by a new one.
            self.waiting = f"waiting: {failed} failed; fix the cause, then restart-run"
            self.notifier.status(self.waiting)
            return
        down = self._unreachable(run)
        if down != self._down:  # logged when it changes, not every cycle
            if down:
                log.warning("peer unreachable; no run started or resumed", peers=down)
            else:
                log.info("peers reachable again; runs go on")
            self._down = down
        if down:
            # Starting anyway would fail every study of the run (and a research PACS that is
            # down would get them written back as errors): wait, and ask again next cycle.
            every = self.settings.review.poll_interval
            self.waiting = f"waiting: {down} (asking again every {every:g} s)"
            self.notifier.status(self.waiting)
            return
        self.waiting = None
        try:
            await execute_run(self.pipeline, run)
        except PeerOutage as exc:
            # Down from the first failed association, not only at the next C-ECHO.
            if exc.peer in self.peers:
                self.peers[exc.peer] = self._peer_seen(self.peers[exc.peer], False, exc.reason)
            every = self.settings.review.poll_interval
            self.waiting = f"waiting: {exc} (trying again every {every:g} s)"
            log.warning("run waits for a PACS", peer=exc.peer, reason=exc.reason)
        except RunStopped as exc:
            if str(exc):  # stopped for a reason (disk space), not by a pause or shutdown
                self.waiting = f"waiting: {exc}"
                log.warning("run waits", reason=str(exc))
            else:
                log.info("run stopped; it resumes later")
        except Exception as exc:  # the state store itself failed (disk full): stay up, say so
            self.waiting = f"waiting: the run could not be recorded: {failure_text(exc)}"
            log.exception("run could not be recorded; trying again next cycle")
        except MisrouteError:
            # Blocked until an operator resumes (the guard itself is kept in misroute.json).
            self.stop_signal.paused = True
        finally:
            self.notifier.status(self._status_line())

    async def _failed_run(self) -> str | None:
        latest = await self.store.latest_run()
        return latest.name if latest is not None and latest.state is RunState.FAILED else None

    def _unreachable(self, run: RunRecord | None) -> str:
        """The PACS the next run needs that did not answer the last C-ECHO, as one line."""
        pipe = self.settings.pipeline
        pushes = not (run.practice or run.no_push) if run else not (pipe.practice or pipe.no_push)
        needed = ("staging", "research") if pushes else ("staging",)
        down = [
            f"{name} PACS {self.peers[name].peer} unreachable: {self.peers[name].error}"
            for name in needed
            if name in self.peers and not self.peers[name].ok
        ]
        return " | ".join(down)

    async def _echo_peers(self) -> None:
        for name, peer in remote_peers(self.settings).items():
            result = await asyncio.to_thread(echo, self.settings.local, peer)
            seen = PeerStatus(peer=result.peer, ok=True, error="", tls=peer.tls is not None)
            self.peers[name] = self._peer_seen(
                self.peers.get(name, seen), result.ok, result.error, peer=result.peer
            )

    def _peer_seen(
        self, before: PeerStatus, ok: bool, error: str, *, peer: str | None = None
    ) -> PeerStatus:
        """*before* as just found: reachable, or down (since its first failed check)."""
        now = datetime.now(UTC)
        again = now + timedelta(seconds=self.settings.review.poll_interval)
        return dataclasses.replace(
            before,
            peer=peer or before.peer,
            ok=ok,
            error="" if ok else error,
            checked=now.isoformat(timespec="seconds"),
            down_since=None if ok else (before.down_since or now.isoformat(timespec="seconds")),
            next_check=None if ok else again.isoformat(timespec="seconds"),
        )

    def condition(self) -> tuple[ServiceState, str]:
        """What the service is doing, and the line systemd's STATUS= and status show."""
        if self.stopping:
            return ServiceState.STOPPING, "stopping"
        if self.guard.tripped:
            return ServiceState.BLOCKED, "blocked: misroute detected, pulls stopped"
        if self.paused:
            return ServiceState.PAUSED, "paused"
        if self.waiting:
            return ServiceState.WAITING, self.waiting
        current = self.pipeline.current if self.pipeline else None
        if current:
            return ServiceState.RUNNING, f"running {current}"
        return ServiceState.IDLE, "idle"

    def _status_line(self) -> str:
        return self.condition()[1]
