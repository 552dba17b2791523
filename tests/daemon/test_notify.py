"""sd_notify messages and the watchdog, read from a real datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from anonpipe.daemon.notify import Notifier, child_environment


class FakeSystemd:
    """The receiving end of ``NOTIFY_SOCKET``: an ``AF_UNIX``/``SOCK_DGRAM`` socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        """Every datagram received so far, oldest first."""
        received: list[str] = []
        while True:
            try:
                received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return received


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    """A fake systemd listening on a short path, announced through ``NOTIFY_SOCKET``."""
    folder = Path(tempfile.mkdtemp(prefix="apntf-", dir="/tmp"))
    fake = FakeSystemd(folder / "notify.sock")
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(fake.path))
    yield fake
    fake.sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_messages_are_exact(systemd: FakeSystemd) -> None:
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready()
    notifier.ready("listening on 11112")
    notifier.status("run_at_1: pulling\n3 of 5 studies")
    notifier.watchdog()
    notifier.stopping()
    notifier.stopping("draining 2 associations")
    assert systemd.messages() == [
        "READY=1",
        "READY=1\nSTATUS=listening on 11112",
        "STATUS=run_at_1: pulling 3 of 5 studies",
        "WATCHDOG=1",
        "STOPPING=1",
        "STOPPING=1\nSTATUS=draining 2 associations",
    ]


def test_empty_status_is_still_sent(systemd: FakeSystemd) -> None:
    Notifier().status("")
    assert systemd.messages() == ["STATUS="]


def test_without_notify_socket_everything_is_a_no_op(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET")
    notifier = Notifier()
    assert not notifier.enabled
    with capture_logs() as logs:
        notifier.ready("x")
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping("x")
    assert systemd.messages() == []
    assert logs == []


def test_explicit_environment_without_notify_socket_sends_nothing(systemd: FakeSystemd) -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready()
    assert systemd.messages() == []


def test_send_failure_is_logged_once_and_never_raised(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path.with_name("gone.sock")))
    notifier = Notifier()
    with capture_logs() as logs:
        notifier.ready()
        notifier.watchdog()
        notifier.status("still here")
    assert [entry["event"] for entry in logs] == [
        "systemd notification failed; further failures not logged"
    ]
    assert logs[0]["log_level"] == "warning"


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000"}, 1.0),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "60000000"}, 30.0),
        ({"NOTIFY_SOCKET": "/run/x"}, None),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "0"}, None),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "soon"}, None),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert Notifier(environ).watchdog_interval == interval


def test_watchdog_interval_follows_watchdog_pid() -> None:
    ours = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(ours).watchdog_interval == 1.0
    assert Notifier(other).watchdog_interval is None


def test_watchdog_interval_from_process_environment(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    assert Notifier().watchdog_interval == 1.0


def test_watchdog_loop_pings_only_while_alive(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    notifier = Notifier()
    assert notifier.watchdog_interval == pytest.approx(0.1)
    alive = True

    async def main() -> tuple[list[str], list[str], list[str]]:
        nonlocal alive
        loop = asyncio.create_task(notifier.watchdog_loop(lambda: alive))
        await asyncio.sleep(0.35)
        while_alive = systemd.messages()
        alive = False
        await asyncio.sleep(0.35)
        while_hung = systemd.messages()
        alive = True
        await asyncio.sleep(0.25)
        recovered = systemd.messages()
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
        return while_alive, while_hung, recovered

    with capture_logs() as logs:
        while_alive, while_hung, recovered = asyncio.run(main())
    assert len(while_alive) >= 2  # about four (0, 0.1, 0.2, 0.3 s); fewer on a loaded machine
    assert set(while_alive) == {"WATCHDOG=1"}
    assert while_hung == []
    assert len(recovered) >= 1
    assert [entry["event"] for entry in logs] == [
        "watchdog ping withheld: the main loop is not alive",
        "watchdog pings resumed",
    ]


def test_watchdog_loop_returns_at_once_without_watchdog(systemd: FakeSystemd) -> None:
    async def main() -> None:
        await asyncio.wait_for(Notifier().watchdog_loop(lambda: True), 1.0)

    asyncio.run(main())
    assert systemd.messages() == []


def test_watchdog_loop_returns_at_once_without_notify_socket() -> None:
    async def main() -> None:
        await asyncio.wait_for(
            Notifier({"WATCHDOG_USEC": "200000"}).watchdog_loop(lambda: True), 1.0
        )

    asyncio.run(main())


def test_child_environment_strips_notify_variables() -> None:
    environ = {
        "PATH": "/usr/bin",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "60000000",
        "WATCHDOG_PID": "42",
        "TCP_NODELAY": "1",
    }
    assert child_environment(environ) == {"PATH": "/usr/bin", "TCP_NODELAY": "1"}
    assert "NOTIFY_SOCKET" in environ  # the caller's mapping is left alone
