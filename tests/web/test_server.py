"""The web server's lifecycle and what every answer carries, without a daemon behind it.

Pages that need the daemon's status are tested on the real daemon (test_web_daemon.py); here a
stand-in state store that knows no run is enough for the server's own behaviour.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import ClientSession

from anonpipe.config import Settings, WebSettings
from anonpipe.web import WebStartError, start_web
from tests.harness.ports import LOOPBACK, free_port


class _NoRuns:
    async def run(self, name: str) -> None:
        return None

    async def runs(self) -> list[Any]:
        return []


class _Service:
    store = _NoRuns()


def _settings(bind: str | None) -> Settings:
    web = WebSettings(bind=bind) if bind is not None else None
    return Settings(web=web, source=Path("/etc/anonpipe/anonpipe.toml"))


def test_without_web_nothing_starts() -> None:
    async def scenario() -> None:
        server = await start_web(_settings(None), cast(Any, _Service()))
        assert not server.listening and server.url is None
        await server.stop()

    asyncio.run(scenario())


def test_answers_are_read_only_with_a_strict_policy() -> None:
    port = free_port()

    async def scenario() -> None:
        server = await start_web(_settings(f"{LOOPBACK}:{port}"), cast(Any, _Service()))
        assert server.url == f"http://{LOOPBACK}:{port}/"
        try:
            async with ClientSession() as session:
                async with session.get(f"{server.url}runs/run_at_5") as response:
                    assert response.status == 404
                    assert "No run named run_at_5" in await response.text()
                    policy = response.headers["Content-Security-Policy"]
                    assert "default-src 'none'" in policy and "script" not in policy
                    assert response.headers["X-Content-Type-Options"] == "nosniff"
                async with session.get(f"{server.url}runs/..%2Fetc") as response:
                    assert response.status == 404
                async with session.get(f"{server.url}runs") as response:
                    assert response.status == 200 and "<script" not in await response.text()
                async with session.post(f"{server.url}runs") as response:
                    assert response.status == 405
                async with session.delete(f"{server.url}") as response:
                    assert response.status == 405
        finally:
            await server.stop()
        assert not server.listening
        with pytest.raises(OSError):
            socket.create_connection((LOOPBACK, port), timeout=2).close()

    asyncio.run(scenario())


def test_a_port_in_use_names_the_key_and_the_fix() -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def scenario() -> None:
            with pytest.raises(WebStartError) as caught:
                await start_web(_settings(f"{LOOPBACK}:{port}"), cast(Any, _Service()))
            message = str(caught.value)
            assert message.startswith(
                f"/etc/anonpipe/anonpipe.toml: web.bind: cannot listen on {LOOPBACK}:{port}: "
            )
            assert "choose a free port" in message and "remove [web]" in message

        asyncio.run(scenario())
