"""The service lifecycle: start (stores, SCP, control socket, READY=1), run (the scheduler), stop.

Like uvicorn's ``Server``: :meth:`Service.start` opens everything in dependency order and fails
early with a clear message, :meth:`Service.run` loops until its shutdown trigger fires, and
:meth:`Service.stop` closes in reverse order (STOPPING=1, no new work, drain the SCP's open
associations, close the stores). Signal handlers only set the trigger.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from anonpipe.anon.identity import check_identity
from anonpipe.config import Settings
from anonpipe.daemon.control import ControlServer
from anonpipe.daemon.lock import DataDirLock
from anonpipe.daemon.notify import Notifier
from anonpipe.daemon.reviewdb import review_database
from anonpipe.daemon.rundir import RunDir
from anonpipe.daemon.runner import (
    PeerOutage,
    Pipeline,
    RunStopped,
    StopSignal,
    execute_run,
    failure_text,
)
from anonpipe.daemon.state import RunRecord, StateStore
from anonpipe.daemon.states import RunState, StudyState
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
        #: Pause (the step in hand finishes) and shutdown (SIGTERM/SIGINT or stop(); read from
        #: the transfer threads too): what the runs see.
        self.stop_signal = StopSignal()
        self.waiting: str | None = None
        self._down = ""  # the unreachable PACS at the last cycle, for logging changes only
        self.peers: dict[str, Any] = {}
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
        return self.stop_signal.paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self.stop_signal.paused = value

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
        except BaseException:
            self.lock.release()
            raise
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
                self.control = ControlServer(self.settings.control.socket, self._handlers())
                await self.control.start()
        except BaseException:
            # Undo what opened, so a failed start leaves no thread or socket behind.
            await asyncio.to_thread(self.scp.stop, 0.0)
            await self.store.close()
            self.lock.release()
            raise
        self.notifier.ready(self._status_line())
        log.info("service started", scp_port=self.scp.port, paused=self.paused)

    async def stop(self) -> None:
        """STOPPING=1, stop taking work, drain the SCP, close the control socket and stores."""
        self.shutting_down.set()
        self.notifier.stopping("stopping: draining associations")
        if self.control is not None:
            await self.control.stop()
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
                self.peers[exc.peer] = {**self.peers[exc.peer], "ok": False, "error": exc.reason}
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
            self.paused = True
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
            f"{name} PACS {self.peers[name]['peer']} unreachable: {self.peers[name]['error']}"
            for name in needed
            if name in self.peers and not self.peers[name]["ok"]
        ]
        return " | ".join(down)

    async def _echo_peers(self) -> None:
        for name, peer in remote_peers(self.settings).items():
            result = await asyncio.to_thread(echo, self.settings.local, peer)
            self.peers[name] = {
                "peer": result.peer,
                "ok": result.ok,
                "error": result.error,
                "tls": peer.tls is not None,
            }

    def _status_line(self) -> str:
        if self.guard.tripped:
            return "blocked: misroute detected, pulls stopped"
        if self.paused:
            return "paused"
        if self.waiting:
            return self.waiting
        current = self.pipeline.current if self.pipeline else None
        return f"running {current}" if current else "idle"

    # -- control ----------------------------------------------------------------------------

    def _handlers(self) -> dict[str, Any]:
        return {
            "status": self._status,
            "runs": self._runs,
            "show": self._show,
            "restart-run": self._restart,
            "pause": self._pause,
            "resume": self._resume,
            "poll": self._poll_now,
            "echo": self._echo,
        }

    async def _status(self, _args: dict[str, Any]) -> dict[str, Any]:
        latest = await self.store.latest_run()
        studies = await self._study_rows(latest.name) if latest else []
        return {
            "state": self._status_line(),
            "misroute": self.guard.tripped,
            "run": None
            if latest is None
            else {"name": latest.name, "state": latest.state, "error": latest.error},
            "studies": studies,
            "held": list(self.pipeline.held if self.pipeline else []),
            "deferred": list(self.pipeline.deferred if self.pipeline else []),
            "scp": asdict(self.scp.status()),
            "peers": self.peers,
            "errors": list(self.pipeline.errors if self.pipeline else []),
        }

    async def _study_rows(self, run: str) -> list[dict[str, Any]]:
        # Review ids and counts only: no original UIDs or accession numbers on the socket.
        rows = []
        pushing = self.pipeline.pushing if self.pipeline else {}
        for s in await self.store.studies(run):
            row = {
                "study": s.review_id,
                "step": s.state,
                "expected": s.expected,
                "landed": s.landed,
                "clean": s.clean,
                "quarantined": s.quarantined,
                "duplicates": s.duplicates,
                "pushed": s.pushed,
                "reason": s.reason,
                "notes": s.notes,
            }
            # Live progress of the step in hand (the store has the counts once it is done).
            pulling = s.state is StudyState.PULLING
            landing = self.registry.get(s.original_study_uid) if pulling else None
            if landing is not None:
                row.update(expected=landing.expected, landed=landing.landed)
            if s.state is StudyState.PUSHING and s.review_id in pushing:
                row["pushed"] = pushing[s.review_id]
            rows.append(row)
        return rows

    async def _runs(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": r.name,
                "state": r.state,
                "practice": r.practice,
                "started": r.started,
                "finished": r.finished,
                "error": r.error,
            }
            for r in await self.store.runs()
        ]

    async def _show(self, args: dict[str, Any]) -> dict[str, Any]:
        record = await self.store.run(str(args.get("run", "")))
        if record is None:
            raise ValueError(f"no run named {args.get('run')!r}; see `anonpipectl runs`")
        return {
            "name": record.name,
            "state": record.state,
            "error": record.error,
            "path": str(record.path),
            "studies": await self._study_rows(record.name),
            "overview": RunDir.open(record.path).read_lines("overview.txt"),
        }

    async def _restart(self, args: dict[str, Any]) -> str:
        latest = await self.store.latest_run()
        name = args.get("run") or (latest.name if latest else None)
        record = await self.store.run(str(name)) if name else None
        if record is None:
            raise ValueError("no such run; see `anonpipectl runs`")
        if record.state is RunState.DONE:
            raise ValueError(f"{record.name} is done; nothing to restart")
        await self.store.set_run_state(record.name, RunState.STOPPED)
        self._poll.set()
        return f"{record.name} will resume at its first unfinished step"

    async def _pause(self, _args: dict[str, Any]) -> str:
        self.paused = True
        self.notifier.status(self._status_line())
        return "paused: the current step finishes, nothing new starts"

    async def _resume(self, _args: dict[str, Any]) -> str:
        cleared = self.guard.clear()
        self.paused = False
        self._poll.set()
        self.notifier.status(self._status_line())
        return "resumed" + (" (misroute guard cleared)" if cleared else "")

    async def _poll_now(self, _args: dict[str, Any]) -> str:
        self._poll.set()
        return "polling the review database now"

    async def _echo(self, args: dict[str, Any]) -> dict[str, Any]:
        name = str(args.get("peer", ""))
        peers = remote_peers(self.settings)
        if name not in peers:
            raise ValueError("peer must be staging or research")
        result = await asyncio.to_thread(echo, self.settings.local, peers[name])
        return asdict(result)
