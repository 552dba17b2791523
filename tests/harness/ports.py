"""Free loopback TCP ports for test peers.

Every PACS, SCP and service started by the tests listens on a port chosen here, so that test runs
never collide with each other, with a system Orthanc on 4242 or with a previous run's leftovers.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["LOOPBACK", "free_port", "free_ports"]

#: The only address test peers are contacted on.
LOOPBACK = "127.0.0.1"

_lock = threading.Lock()
# Ports handed out by this process: the kernel may offer a port again as soon as our probe socket
# is closed, before the server meant to use it has bound it, so never hand out the same one twice.
_issued: set[int] = set()


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return `count` distinct TCP ports that are currently free on `host`.

    The ports are found by binding port 0 (the kernel picks a free one), with all probe sockets
    held open together so the ports differ, then closed. There is a small window in which another
    process could take a port before the caller binds it; servers started by the harness retry
    with new ports if that happens.

    Parameters
    ----------
    count : int
        How many ports are needed (at least 1).
    host : str, optional
        Interface to probe; the loopback address by default.

    Returns
    -------
    list of int
        Distinct free ports, never returned before by this process.

    Raises
    ------
    ValueError
        If `count` is less than 1.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    with _lock:
        probes: list[socket.socket] = []
        ports: list[int] = []
        try:
            # Bounded: the ephemeral range is large, so repeats are rare.
            for _ in range(count * 20):
                if len(ports) == count:
                    break
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(sock)
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
                if port not in _issued:
                    ports.append(port)
        finally:
            for sock in probes:
                sock.close()
        if len(ports) < count:
            raise OSError(f"could not find {count} unused ports on {host}")
        _issued.update(ports)
        return ports


def free_port(host: str = LOOPBACK) -> int:
    """Return one free TCP port on `host` (see :func:`free_ports`)."""
    return free_ports(1, host)[0]
