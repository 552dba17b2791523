"""The read-only web status site and ``/metrics``, served from the daemon's own event loop.

Why aiohttp, and why this way: the daemon is one asyncio program (scheduler, control socket,
state store) and the pages read what it holds in memory (the status model: live pull and push
counts, peers, the SCP's counters) and its state store's connection, which belongs to that loop.
``aiohttp.web``'s :class:`~aiohttp.web.AppRunner` and :class:`~aiohttp.web.TCPSite` are a server
that runs *inside* an existing loop: :func:`start_web` adds a listening socket to it and
:meth:`WebServer.stop` removes it; each request is a task of that same loop, like a control
request. No second server process or thread, no copy of the status to keep in step, no
cross-thread locking. Starlette would need uvicorn (a server built to own its process, its loop
and its signals); aiohttp is one well-kept library with the server in it, typed, with no other
service to run.

Read-only: only GET (and HEAD) routes exist; the handlers call the status model's builders and
the state store's query methods and write nothing. Every page is HTML made by
:mod:`anonpipe.web.markup` (everything escaped), works without JavaScript, and is sent with a
Content-Security-Policy that allows no script at all. Nothing listens unless ``[web] bind`` is
configured.

Routes: ``/`` (now), ``/runs``, ``/runs/<run>``, ``/quarantine``, ``/quarantine/<run>``,
``/metrics`` (Prometheus text format, :mod:`anonpipe.web.metrics`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from anonpipe.config import Settings
from anonpipe.daemon.rundir import RUN_PREFIX
from anonpipe.daemon.status import build_run, build_status
from anonpipe.logs import get_logger
from anonpipe.web import pages
from anonpipe.web.history import History, quarantined_files
from anonpipe.web.markup import Markup
from anonpipe.web.metrics import AnonpipeCollector, Snapshot, free_bytes, make_registry

if TYPE_CHECKING:
    from anonpipe.daemon.service import Service

__all__ = ["QUARANTINE_FILES_SHOWN", "WebServer", "WebStartError", "make_app", "start_web"]

log = get_logger(__name__)

#: Quarantined files listed on one run's quarantine page (the counts cover them all).
QUARANTINE_FILES_SHOWN = 2000
#: Seconds a stopping server gives requests in progress (SIGTERM must end the daemon quickly).
SHUTDOWN_SECONDS = 2.0

_RUN = rf"{RUN_PREFIX}[0-9]+"
_HEADERS = {
    # No script, no frames, no plug-ins, nothing from elsewhere: inline style and SVG only.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_SERVICE: web.AppKey[Service] = web.AppKey("service")
_HISTORY: web.AppKey[History] = web.AppKey("history")
_METRICS: web.AppKey[tuple[CollectorRegistry, AnonpipeCollector]] = web.AppKey("metrics")


class WebStartError(OSError):
    """The web server cannot listen on ``[web] bind`` (the message says what to do)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "the web server cannot start"


def _html(page: Markup, status: int = 200) -> web.Response:
    return web.Response(
        text=page, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS
    )


async def _now(request: web.Request) -> web.Response:
    return _html(pages.now_page(await build_status(request.app[_SERVICE])))


async def _runs(request: web.Request) -> web.Response:
    try:
        page = int(request.query.get("page", "1"))
    except ValueError:
        page = 1
    tallies = await request.app[_HISTORY].tallies()
    return _html(pages.runs_page(tallies, page))


async def _run(request: web.Request) -> web.Response:
    service = request.app[_SERVICE]
    name = request.match_info["run"]
    record = await service.store.run(name)
    if record is None:
        return _html(pages.not_found(f"No run named {name}."), status=404)
    detail = await build_run(service, name)
    tally = await request.app[_HISTORY].tally(record)
    return _html(pages.run_page(detail, tally))


async def _quarantine(request: web.Request) -> web.Response:
    tallies = await request.app[_HISTORY].tallies()
    return _html(pages.quarantine_page(tallies))


async def _quarantine_run(request: web.Request) -> web.Response:
    service = request.app[_SERVICE]
    name = request.match_info["run"]
    record = await service.store.run(name)
    if record is None:
        return _html(pages.not_found(f"No run named {name}."), status=404)
    tally = await request.app[_HISTORY].tally(record)
    records = await service.store.files(name)
    shown, total = await asyncio.to_thread(quarantined_files, records, QUARANTINE_FILES_SHOWN)
    return _html(pages.quarantine_run_page(tally, shown, total))


async def _metrics(request: web.Request) -> web.Response:
    service = request.app[_SERVICE]
    registry, collector = request.app[_METRICS]
    snapshot = Snapshot(
        status=await build_status(service),
        runs=await request.app[_HISTORY].tallies(),
        free_bytes=await asyncio.to_thread(free_bytes, service.settings.pipeline.data_dir),
    )
    collector.snapshot = snapshot  # read by generate_latest below, with no await in between
    body = generate_latest(registry)
    return web.Response(body=body, headers={**_HEADERS, "Content-Type": CONTENT_TYPE_LATEST})


async def _not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _html(pages.not_found("No such page."), status=404)


def make_app(service: Service) -> web.Application:
    """The application: the routes above, over *service*'s status and state store."""
    app = web.Application(middlewares=[web.middleware(_not_found)])
    app[_SERVICE] = service
    app[_HISTORY] = History(service.store)
    app[_METRICS] = make_registry()
    app.router.add_get("/", _now)
    app.router.add_get("/runs", _runs)
    app.router.add_get(f"/runs/{{run:{_RUN}}}", _run)
    app.router.add_get("/quarantine", _quarantine)
    app.router.add_get(f"/quarantine/{{run:{_RUN}}}", _quarantine_run)
    app.router.add_get("/metrics", _metrics)
    return app


class WebServer:
    """The running web server (or none, when ``[web]`` is not configured)."""

    def __init__(self, runner: web.AppRunner | None = None, url: str | None = None) -> None:
        self._runner = runner
        #: ``http://host:port/`` while it listens, else None.
        self.url = url

    @property
    def listening(self) -> bool:
        return self._runner is not None

    async def stop(self) -> None:
        """Stop listening and end the requests in progress (within a few seconds)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("web server stopped")
        self.url = None


async def start_web(settings: Settings, service: Service) -> WebServer:
    """Listen on ``[web] bind`` in the running event loop; without ``[web]``, nothing listens.

    Raises
    ------
    WebStartError
        The address cannot be bound (in use, not an address of this host, a privileged port):
        start-up stops, naming the key and the fix.
    """
    if settings.web is None:
        return WebServer()
    host, port = settings.web.address
    runner = web.AppRunner(
        make_app(service), handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        source = settings.source or "the configuration"
        raise WebStartError(
            f"{source}: web.bind: cannot listen on {settings.web.bind}: "
            f"{exc.strerror or exc}; choose a free port on an address of this host, or remove "
            "[web] to run without the status pages"
        ) from exc
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    log.info("web server listening", url=url)
    return WebServer(runner, url)
