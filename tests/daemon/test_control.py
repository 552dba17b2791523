"""The control socket server, driven by the real ``anonpipectl`` client over a real Unix socket."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from anonpipe import ctl
from anonpipe.daemon.control import ControlServer, Handler, peer_allowed, peer_credentials

Scenario = Callable[[ControlServer], Awaitable[None]]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short folder under /tmp: a socket path must stay under 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="apctl-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def _status(args: dict[str, Any]) -> Any:
    return {"state": "idle", "since": dt.datetime(2024, 1, 2, 3, 4, 5), "where": Path("/x")}


async def _echo(args: dict[str, Any]) -> Any:
    return args


async def _broken(args: dict[str, Any]) -> Any:
    raise ValueError("run 'run_at_1' is not failed")


HANDLERS: dict[str, Handler] = {"status": _status, "echo": _echo, "broken": _broken}


def _serve(
    path: Path,
    scenario: Scenario,
    handlers: Mapping[str, Handler] = HANDLERS,
    **options: Any,
) -> None:
    """Start a server on ``path`` in a fresh event loop, run ``scenario``, always stop it."""

    async def main() -> None:
        server = ControlServer(path, handlers, **options)
        await server.start()
        try:
            await scenario(server)
        finally:
            await server.stop()

    asyncio.run(main())


async def _request(path: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    return await asyncio.to_thread(ctl.request, path, command, args or {}, 5.0)


def _raw_exchange(path: Path, data: bytes) -> dict[str, Any]:
    """Send raw bytes, half-close, and return the decoded reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline()
    answer: dict[str, Any] = json.loads(reply)
    return answer


def test_handler_result_is_returned(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    async def scenario(server: ControlServer) -> None:
        assert server.path == path
        assert server.serving
        result = await _request(path, "status")
        assert result == {"state": "idle", "since": "2024-01-02 03:04:05", "where": "/x"}
        assert await _request(path, "echo", {"run": "run_at_1", "n": 3}) == {
            "run": "run_at_1",
            "n": 3,
        }

    _serve(path, scenario)


def test_unknown_command_lists_known_commands(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    async def scenario(server: ControlServer) -> None:
        with pytest.raises(ctl.ControlError, match="unknown command 'nope'") as info:
            await _request(path, "nope")
        assert "known commands: broken, echo, status" in str(info.value)

    _serve(path, scenario)


def test_handler_error_becomes_error_reply_and_server_keeps_serving(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    async def scenario(server: ControlServer) -> None:
        with capture_logs() as logs, pytest.raises(ctl.ControlError) as info:
            await _request(path, "broken")
        assert str(info.value) == "run 'run_at_1' is not failed"
        assert "Traceback" not in str(info.value)
        failures = [entry for entry in logs if entry["event"] == "control command failed"]
        assert failures == [
            {
                "event": "control command failed",
                "command": "broken",
                "error_type": "ValueError",
                "log_level": "warning",
            }
        ]
        assert (await _request(path, "status"))["state"] == "idle"

    _serve(path, scenario)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json\n", "request is not valid JSON"),
        (b"\xff\xfe\n", "request is not valid JSON"),
        (b"[1, 2]\n", 'string "command"'),
        (b'{"args": {}}\n', 'string "command"'),
        (b'{"command": 3}\n', 'string "command"'),
        (b'{"command": "echo", "args": [1]}\n', '"args" must be a JSON object'),
        (b"\n", "empty request"),
        (b"", "empty request"),
    ],
)
def test_bad_request_gets_error_reply_and_server_keeps_serving(
    sock_dir: Path, line: bytes, message: str
) -> None:
    path = sock_dir / "control.sock"

    async def scenario(server: ControlServer) -> None:
        reply = await asyncio.to_thread(_raw_exchange, path, line)
        assert reply["ok"] is False
        assert message in reply["error"]
        assert (await _request(path, "status"))["state"] == "idle"

    _serve(path, scenario)


def test_request_without_args_and_without_newline_is_served(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    async def scenario(server: ControlServer) -> None:
        reply = await asyncio.to_thread(_raw_exchange, path, b'{"command": "echo"}')
        assert reply == {"ok": True, "result": {}}

    _serve(path, scenario)


def test_overlong_line_gets_error_reply_and_server_keeps_serving(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    async def scenario(server: ControlServer) -> None:
        line = json.dumps({"command": "echo", "args": {"x": "a" * 4000}}).encode() + b"\n"
        reply = await asyncio.to_thread(_raw_exchange, path, line)
        assert reply == {"ok": False, "error": "request too long: the limit is 1024 bytes per line"}
        with pytest.raises(ctl.ControlError, match="request too long"):
            await _request(path, "echo", {"x": "b" * 4000})
        assert await _request(path, "echo", {"x": "short"}) == {"x": "short"}

    _serve(path, scenario, max_line=1024)


def test_silent_client_is_disconnected(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    def silent() -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(path))
            answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
            return answer

    async def scenario(server: ControlServer) -> None:
        reply = await asyncio.to_thread(silent)
        assert reply == {"ok": False, "error": "no request line within 0.2 s"}
        assert (await _request(path, "status"))["state"] == "idle"

    _serve(path, scenario, read_timeout=0.2)


def test_unencodable_result_gets_error_reply(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    async def bad_keys(args: dict[str, Any]) -> Any:
        return {(1, 2): "tuple keys cannot be JSON"}

    async def scenario(server: ControlServer) -> None:
        with pytest.raises(ctl.ControlError, match="could not be encoded as JSON"):
            await _request(path, "bad")

    _serve(path, scenario, {"bad": bad_keys})


def test_socket_mode_and_new_parent_folder(sock_dir: Path) -> None:
    path = sock_dir / "run" / "control.sock"

    async def scenario(server: ControlServer) -> None:
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750

    _serve(path, scenario)
    assert not path.exists()


def test_world_accessible_mode_is_refused(sock_dir: Path) -> None:
    with pytest.raises(ValueError, match="gives access to all users"):
        ControlServer(sock_dir / "control.sock", HANDLERS, mode=0o666)


def test_stale_socket_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(str(path))  # bound, never listening, then gone: what a crash leaves
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    async def scenario(server: ControlServer) -> None:
        assert (await _request(path, "status"))["state"] == "idle"

    _serve(path, scenario)
    assert not path.exists()


def test_live_daemon_is_not_displaced(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    async def scenario(server: ControlServer) -> None:
        second = ControlServer(path, HANDLERS)
        with pytest.raises(RuntimeError, match="another anonpipe daemon is listening on"):
            await second.start()
        assert not second.serving
        await second.stop()  # a no-op: it never started, and must not remove the first's file
        assert (await _request(path, "status"))["state"] == "idle"

    _serve(path, scenario)


def test_path_that_is_not_a_socket_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    path.write_text("not a socket")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="exists and is not a socket"):
            await ControlServer(path, HANDLERS).start()

    asyncio.run(main())
    assert path.read_text() == "not a socket"


def test_stop_removes_only_its_own_socket(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    async def main() -> None:
        first = ControlServer(path, HANDLERS)
        await first.start()
        await first.stop()
        assert not path.exists()
        await first.stop()  # twice is harmless

        first = ControlServer(path, HANDLERS)
        await first.start()
        path.unlink()  # an operator removed it; a successor bound the same path
        successor = ControlServer(path, HANDLERS)
        await successor.start()
        await first.stop()
        assert path.exists()
        assert (await _request(path, "status"))["state"] == "idle"
        await successor.stop()
        assert not path.exists()

    asyncio.run(main())


def test_start_twice_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    async def scenario(server: ControlServer) -> None:
        with pytest.raises(RuntimeError, match="already started"):
            await server.start()

    _serve(path, scenario)


def test_concurrent_requests_are_served_together(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    clients = 10
    arrived = 0
    everyone: asyncio.Event | None = None

    async def gather_all(args: dict[str, Any]) -> Any:
        # Each handler waits until all ten are in: served one by one, this would time out.
        nonlocal arrived
        assert everyone is not None
        arrived += 1
        if arrived == clients:
            everyone.set()
        await asyncio.wait_for(everyone.wait(), 5.0)
        return args["n"]

    async def scenario(server: ControlServer) -> None:
        nonlocal everyone
        everyone = asyncio.Event()
        loop = asyncio.get_running_loop()
        # One thread per client: the default executor may have fewer workers than clients.
        with ThreadPoolExecutor(max_workers=clients) as pool:
            results = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, ctl.request, path, "gather", {"n": n}, 10.0)
                    for n in range(clients)
                )
            )
        assert results == list(range(clients))

    _serve(path, scenario, {"gather": gather_all})


def test_stop_lets_requests_in_progress_finish(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    started = asyncio.Event()

    async def slow(args: dict[str, Any]) -> Any:
        started.set()
        await asyncio.sleep(0.2)
        return "done"

    async def main() -> None:
        server = ControlServer(path, {"slow": slow})
        await server.start()
        pending = asyncio.create_task(_request(path, "slow"))
        await asyncio.wait_for(started.wait(), 5.0)
        await server.stop()
        assert await pending == "done"
        assert not path.exists()

    asyncio.run(main())


def test_stop_cancels_requests_beyond_the_drain_timeout(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    started = asyncio.Event()

    async def stuck(args: dict[str, Any]) -> Any:
        started.set()
        await asyncio.sleep(60)

    async def main() -> None:
        server = ControlServer(path, {"stuck": stuck}, drain_timeout=0.1)
        await server.start()
        pending = asyncio.create_task(_request(path, "stuck"))
        await asyncio.wait_for(started.wait(), 5.0)
        await asyncio.wait_for(server.stop(), 5.0)
        with pytest.raises(ctl.ControlError, match="closed the connection without a reply"):
            await pending

    asyncio.run(main())


def test_anonpipectl_exit_codes(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sock_dir / "control.sock"

    async def pause(args: dict[str, Any]) -> Any:
        raise RuntimeError("already paused")

    async def scenario(server: ControlServer) -> None:
        capsys.readouterr()  # start-up log lines
        code = await asyncio.to_thread(ctl.main, ["--socket", str(path), "status", "--json"])
        assert code == ctl.EXIT_OK
        assert json.loads(capsys.readouterr().out)["state"] == "idle"
        code = await asyncio.to_thread(ctl.main, ["--socket", str(path), "pause"])
        assert code == ctl.EXIT_FAILURE
        assert capsys.readouterr().err == "anonpipectl: already paused\n"

    _serve(path, scenario, {"status": _status, "pause": pause})
    assert ctl.main(["--socket", str(path), "status"]) == ctl.EXIT_UNREACHABLE
    assert "no control socket" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("uid", "gid", "groups", "allowed"),
    [
        (1000, 1000, (), True),  # the daemon's own user
        (0, 0, (), True),  # root
        (2000, 1000, (), True),  # primary group is the daemon's group
        (2000, 2000, (5, 1000), True),  # supplementary member of the daemon's group
        (2000, 2000, (), False),
        (2000, 2000, (5, 6), False),
    ],
)
def test_peer_allowed(uid: int, gid: int, groups: tuple[int, ...], allowed: bool) -> None:
    assert peer_allowed(uid, gid, our_uid=1000, our_gid=1000, groups=groups) is allowed


def test_peer_credentials_of_a_real_socket() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_credentials(left) == (os.getpid(), os.getuid(), os.getgid())
