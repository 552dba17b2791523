"""The control socket's commands: what ``anonpipectl`` asks the service, one thin handler each.

Each handler gets the request's ``args`` and returns the reply's ``result`` (JSON values); an
exception becomes the error reply, its message shown to the operator (so it never quotes patient
data). Replies that describe the service are the typed models of
:mod:`anonpipe.daemon.status`, sent as their ``to_json()``:

========================  ==========================================================
command (args)            result
========================  ==========================================================
``status``                :class:`~anonpipe.daemon.status.StatusReport`
``runs``                  a list of :class:`~anonpipe.daemon.status.RunSummary`
``show`` (``run``)        :class:`~anonpipe.daemon.status.RunDetail`
``restart-run`` (``run``) a sentence (the newest run when ``run`` is absent)
``pause``, ``resume``     a sentence
``poll``                  a sentence
``echo`` (``peer``)       :class:`~anonpipe.scu.echo.EchoResult` (``ok`` false when it failed)
========================  ==========================================================
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from anonpipe.daemon.control import Handler
from anonpipe.daemon.states import RunState
from anonpipe.daemon.status import build_run, build_runs, build_status
from anonpipe.scu import echo, remote_peers

if TYPE_CHECKING:
    from anonpipe.daemon.service import Service

__all__ = ["Commands"]

Args = dict[str, Any]


class Commands:
    """The handlers of the control socket, over one :class:`~anonpipe.daemon.service.Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def handlers(self) -> dict[str, Handler]:
        """Command name → handler, for :class:`~anonpipe.daemon.control.ControlServer`."""
        return {
            "status": self.status,
            "runs": self.runs,
            "show": self.show,
            "restart-run": self.restart_run,
            "pause": self.pause,
            "resume": self.resume,
            "poll": self.poll,
            "echo": self.echo,
        }

    async def status(self, _args: Args) -> dict[str, Any]:
        return (await build_status(self.service)).to_json()

    async def runs(self, _args: Args) -> list[dict[str, Any]]:
        return [run.to_json() for run in await build_runs(self.service)]

    async def show(self, args: Args) -> dict[str, Any]:
        return (await build_run(self.service, str(args.get("run", "")))).to_json()

    async def restart_run(self, args: Args) -> str:
        """Mark a failed or stopped run (default: the newest) to resume at the next cycle."""
        store = self.service.store
        latest = await store.latest_run()
        name = args.get("run") or (latest.name if latest else None)
        record = await store.run(str(name)) if name else None
        if record is None:
            raise ValueError("no such run; see `anonpipectl runs`")
        if record.state is RunState.DONE:
            raise ValueError(f"{record.name} is done; nothing to restart")
        await store.set_run_state(record.name, RunState.STOPPED)
        self.service.poll_now()
        return f"{record.name} will resume at its first unfinished step"

    async def pause(self, _args: Args) -> str:
        await self.service.pause()
        return "paused: the current step finishes, nothing new starts (kept until resume)"

    async def resume(self, _args: Args) -> str:
        cleared = await self.service.resume()
        return "resumed" + (" (misroute guard cleared)" if cleared else "")

    async def poll(self, _args: Args) -> str:
        self.service.poll_now()
        return "polling the review database now"

    async def echo(self, args: Args) -> dict[str, Any]:
        name = str(args.get("peer", ""))
        peers = remote_peers(self.service.settings)
        if name not in peers:
            raise ValueError("peer must be staging or research")
        result = await asyncio.to_thread(echo, self.service.settings.local, peers[name])
        return dataclasses.asdict(result)
