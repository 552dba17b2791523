"""The control socket: the daemon's end of the ``anonpipectl`` protocol.

A Unix stream socket (a path, mode 0660, never the abstract namespace) under systemd's
``RuntimeDirectory=``. Each connection carries one request line and gets one reply line, then
closes: the request ``{"command": str, "args": {...}}``, the reply ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "..."}``. Peers are checked with ``SO_PEERCRED``: the daemon's own
user, root, or a member of the daemon's group. A bad client gets an error reply and never
takes the server down. The daemon's commands and what they reply are
:mod:`anonpipe.daemon.commands`; this module only carries them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from anonpipe.logs import get_logger

__all__ = ["ControlServer", "Handler", "PeerCredentials", "peer_allowed", "peer_credentials"]

#: A command handler: gets the request's ``args`` and returns a JSON-able result.
Handler = Callable[[dict[str, Any]], Awaitable[Any]]
#: ``(pid, uid, gid)`` of the process at the other end of a Unix socket.
PeerCredentials = tuple[int, int, int]

log = get_logger(__name__)

_UCRED = struct.Struct("3i")
# Linux's SO_PEERGROUPS (socket(7), since 4.13); the socket module does not name it.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("I")
_PEERGROUPS_BUFFER = 1024  # the most socket.getsockopt accepts: 256 supplementary groups
_PROBE_TIMEOUT = 1.0


def peer_allowed(
    uid: int, gid: int, *, our_uid: int, our_gid: int, groups: Collection[int] = ()
) -> bool:
    """Whether a peer with these credentials may use the control socket.

    Parameters
    ----------
    uid, gid : int
        The peer's effective user and group (``SO_PEERCRED``).
    our_uid, our_gid : int
        The daemon's user and group (the service's ``User=`` and ``Group=``).
    groups : collection of int
        The peer's supplementary groups (``SO_PEERGROUPS``), when known.

    Returns
    -------
    bool
        True for the daemon's own user, root, or a member of the daemon's group.
    """
    return uid in (our_uid, 0) or gid == our_gid or our_gid in groups


def peer_credentials(sock: Any) -> PeerCredentials:
    """The ``(pid, uid, gid)`` of the peer of a connected Unix socket (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _peer_groups(sock: Any) -> tuple[int, ...]:
    """The peer's supplementary groups, or ``()`` when the kernel cannot tell us."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _PEERGROUPS_BUFFER)
    except OSError:  # older kernel, or more groups than the buffer holds (ERANGE)
        return ()
    usable = len(raw) - len(raw) % _GID.size
    return tuple(gid for (gid,) in _GID.iter_unpack(raw[:usable]))


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


class ControlServer:
    """The control socket server: one JSON request line in, one JSON reply line out.

    Parameters
    ----------
    path : Path
        Socket path (``[control] socket``, by default ``/run/anonpipe/control.sock``); must be
        shorter than 108 bytes, the limit of ``sockaddr_un``.
    handlers : mapping of str to Handler
        The commands: each handler gets the request's ``args`` (``{}`` when absent) and returns
        a result that ``json.dumps(..., default=str)`` can encode. A handler's exception becomes
        an error reply carrying ``str(exc)``.
    mode : int
        Permission bits of the socket file; 0o660 by default. World bits are refused.
    max_line : int
        The longest request line accepted, in bytes; a longer one gets an error reply.
    read_timeout : float
        Seconds a client has to send its request line before it is disconnected.
    drain_timeout : float
        Seconds :meth:`stop` waits for requests in progress before cancelling them.

    Raises
    ------
    ValueError
        When ``mode`` grants access to others, or a limit is not positive.
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        mode: int = 0o660,
        max_line: int = 1 << 20,
        read_timeout: float = 10.0,
        drain_timeout: float = 5.0,
    ) -> None:
        if mode & 0o007:
            raise ValueError(
                f"control socket mode {mode:#o} gives access to all users; use 0o660 or tighter"
            )
        if max_line <= 0 or read_timeout <= 0 or drain_timeout < 0:
            raise ValueError(
                "max_line and read_timeout must be positive and drain_timeout not negative, "
                f"got {max_line}, {read_timeout}, {drain_timeout}"
            )
        self._path = Path(path)
        self._handlers = dict(handlers)
        self._mode = mode
        self._max_line = max_line
        self._read_timeout = read_timeout
        self._drain_timeout = drain_timeout
        self._server: asyncio.Server | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._connections: set[asyncio.Task[Any]] = set()
        self._uid = os.getuid()
        self._gid = os.getgid()

    @property
    def path(self) -> Path:
        """The socket path."""
        return self._path

    @property
    def serving(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    async def start(self) -> None:
        """Bind the socket and start answering.

        Creates the parent folder (mode 0o750) when missing and replaces a stale socket left by a
        crash. The socket file gets its mode before the socket listens, so no client can connect
        through looser permissions.

        Raises
        ------
        RuntimeError
            When already started, when another daemon answers on the path, or when the path is
            taken by something that is not a socket.
        OSError
            When the folder cannot be created or the socket cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError(f"the control server on {self._path} is already started")
        self._prepare_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self._path))
            os.chmod(self._path, self._mode)
            info = os.stat(self._path)
            self._identity = (info.st_dev, info.st_ino)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(
                self._on_connection, sock=sock, limit=self._max_line
            )
        except BaseException:
            sock.close()
            self._unlink_if_ours()
            raise
        log.info("control socket listening", path=str(self._path), mode=f"{self._mode:#o}")

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish, and remove the socket file.

        Requests still running after ``drain_timeout`` are cancelled. The file is removed only if
        it is still the one :meth:`start` bound (a successor's socket is left alone). Calling it
        twice, or before :meth:`start`, does nothing.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        current = asyncio.current_task()
        pending = {task for task in self._connections if task is not current}
        if pending and self._drain_timeout > 0:
            _, pending = await asyncio.wait(pending, timeout=self._drain_timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._unlink_if_ours()
        log.info("control socket closed", path=str(self._path))

    def _prepare_path(self) -> None:
        """Create the parent folder, clear a stale socket, refuse a live one or a non-socket."""
        parent = self._path.parent
        if not parent.exists():
            parent.mkdir(mode=0o750, parents=True)
            os.chmod(parent, 0o750)  # mkdir's mode is filtered by the umask
        try:
            info = os.lstat(self._path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise RuntimeError(
                f"{self._path} exists and is not a socket: remove it or set [control] socket "
                "to another path"
            )
        if self._answers():
            raise RuntimeError(f"another anonpipe daemon is listening on {self._path}")
        log.warning("removing stale control socket", path=str(self._path))
        self._path.unlink(missing_ok=True)

    def _answers(self) -> bool:
        """Whether a process accepts connections on the existing socket file."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(_PROBE_TIMEOUT)
            try:
                probe.connect(str(self._path))
            except (ConnectionRefusedError, FileNotFoundError):
                return False
            except OSError as exc:
                raise RuntimeError(
                    f"cannot tell whether a daemon listens on {self._path}: {exc.strerror}"
                ) from None
        return True

    def _unlink_if_ours(self) -> None:
        identity, self._identity = self._identity, None
        if identity is None:
            return
        try:
            info = os.lstat(self._path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == identity:
            self._path.unlink(missing_ok=True)

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One client: check the peer, read one line, dispatch, reply, close."""
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            reply = await self._serve(reader, writer)
            await self._reply(writer, reply)
        except Exception as exc:  # the server outlives any one client
            log.warning("control connection failed", error_type=type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any]:
        sock = writer.get_extra_info("socket")
        pid, uid, gid = peer_credentials(sock)
        if not peer_allowed(
            uid, gid, our_uid=self._uid, our_gid=self._gid, groups=_peer_groups(sock)
        ):
            log.warning("control peer refused", peer_uid=uid, peer_pid=pid)
            return _error(
                f"permission denied: uid {uid} is not the daemon's user, root, "
                "or a member of the daemon's group"
            )
        try:
            line = await asyncio.wait_for(reader.readline(), self._read_timeout)
        except ValueError:  # the stream's limit: no newline within max_line bytes
            return _error(f"request too long: the limit is {self._max_line} bytes per line")
        except TimeoutError:
            return _error(f"no request line within {self._read_timeout:g} s")
        return await self._dispatch(line)

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        """Parse one request line and run its handler; every failure becomes an error reply."""
        if not line.strip():
            return _error("empty request: send one JSON object and a newline")
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return _error(f"request is not valid JSON: {exc}")
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return _error('request must be a JSON object with a string "command"')
        command: str = request["command"]
        args = request.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return _error(f'"args" must be a JSON object, got {type(args).__name__}')
        handler = self._handlers.get(command)
        if handler is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            return _error(f"unknown command {command[:64]!r}; known commands: {known}")
        try:
            result = await handler(args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("control command failed", command=command, error_type=type(exc).__name__)
            return _error(str(exc) or type(exc).__name__)
        return {"ok": True, "result": result}

    async def _reply(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        try:
            data = json.dumps(reply, default=str)
        except (TypeError, ValueError) as exc:
            log.warning("control reply not serialisable", error_type=type(exc).__name__)
            data = json.dumps(_error(f"the result could not be encoded as JSON: {exc}"))
        writer.write(data.encode() + b"\n")
        await writer.drain()
