"""A slow network link for tests: a TCP proxy on loopback that throttles one direction.

``SlowLink(port, rate)`` listens on a free loopback port and forwards every connection to
``127.0.0.1:port``; what the client sends reaches the server at no more than *rate* bytes per
second (the answers come back at once). A research PACS behind a WAN link, or one busy writing
to a slow disk, is slower than our disk: that is what it stands for. An end of data is passed
on (half-close); a reset on one side resets both; :meth:`SlowLink.stall` makes the peer hang.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Self

from tests.harness.ports import LOOPBACK

__all__ = ["SlowLink"]

#: Bytes read and forwarded at a time.
CHUNK = 64 << 10


class SlowLink:
    """``with SlowLink(target_port, rate) as link:`` connect to ``link.port`` instead."""

    def __init__(self, target_port: int, rate: float, *, target_host: str = LOOPBACK) -> None:
        self.target = (target_host, target_port)
        self.rate = rate
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()

    def __enter__(self) -> Self:
        self._spawn(self._accept)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def stall(self) -> None:
        """Stop forwarding, both ways, as a peer that hangs without closing anything."""
        self._flowing.clear()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        _close(self._listener)  # shutdown wakes the thread in accept()
        for sock in list(self._sockets):
            _close(sock)
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            self._spawn(self._pump, client, server, self.rate)
            self._spawn(self._pump, server, client, 0.0)

    def _pump(self, source: socket.socket, sink: socket.socket, rate: float) -> None:
        start = time.monotonic()
        sent = 0
        try:
            while True:
                self._flowing.wait()
                if self._closed.is_set():
                    break
                data = source.recv(CHUNK)
                if not data:
                    break
                if rate:
                    # Token bucket from the start: the link never runs ahead of `rate`.
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
                sink.sendall(data)
                sent += len(data)
        except OSError:
            # One side is gone (reset): so is the link, both ways, as for a real connection.
            for sock in (source, sink):
                _close(sock)
            return
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _close(sock: socket.socket) -> None:
    """Close *sock*, waking a thread blocked reading it (``close`` alone would not)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
