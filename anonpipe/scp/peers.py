"""Who may associate with our SCP: an allowed calling AE title *from* its allowed host.

pynetdicom can check calling AE titles but not addresses, so the whole decision is made here, at
association time (A-ASSOCIATE-RQ), before any data set is sent. Host names are resolved once when
the SCP starts; an allowed peer whose name does not resolve stops start-up with a clear error.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Iterable

from anonpipe.config import Peer

__all__ = ["PeerPolicy", "PeerRejection", "resolve_host"]


class PeerRejection(enum.Enum):
    """Why an association request is rejected, with its A-ASSOCIATE-RJ reason (PS3.8 9.3.4)."""

    CALLED_AE = (0x07, "called AE title is not ours")
    CALLING_AE = (0x03, "calling AE title is not an allowed peer")
    HOST = (0x03, "calling AE title is allowed, but not from this address")

    @property
    def reason(self) -> int:
        return self.value[0]

    @property
    def message(self) -> str:
        return self.value[1]


def resolve_host(host: str) -> frozenset[str]:
    """All addresses *host* stands for, normalised (``::ffff:10.0.0.5`` → ``10.0.0.5``).

    Raises
    ------
    OSError
        If the name does not resolve.
    """
    try:
        return frozenset({_normalise(host)})
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return frozenset(_normalise(str(info[4][0])) for info in infos)


def _normalise(address: str) -> str:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class PeerPolicy:
    """The allow-list, resolved: calling AE title → the addresses it may connect from.

    Parameters
    ----------
    ae_title : str
        Our own AE title; an association must call exactly this (after stripping spaces).
    peers : iterable of Peer
        The allowed calling AEs (``Settings.allowed_peers``).
    """

    def __init__(self, ae_title: str, peers: Iterable[Peer]) -> None:
        self.ae_title = ae_title.strip()
        allowed: dict[str, set[str]] = {}
        for peer in peers:
            try:
                addresses = resolve_host(peer.host)
            except OSError as exc:
                raise ValueError(
                    f"allowed peer {peer.ae_title}: host {peer.host!r} does not resolve "
                    f"({exc.strerror or exc}); fix [local] allowed_peers or DNS"
                ) from exc
            allowed.setdefault(peer.ae_title.strip(), set()).update(addresses)
        self._allowed = {title: frozenset(addrs) for title, addrs in allowed.items()}

    @property
    def allowed_titles(self) -> tuple[str, ...]:
        return tuple(sorted(self._allowed))

    def check(self, called_ae: str, calling_ae: str, address: str) -> PeerRejection | None:
        """None when the association may proceed, else why it must be rejected."""
        if called_ae.strip() != self.ae_title:
            return PeerRejection.CALLED_AE
        addresses = self._allowed.get(calling_ae.strip())
        if addresses is None:
            return PeerRejection.CALLING_AE
        try:
            if _normalise(address) not in addresses:
                return PeerRejection.HOST
        except ValueError:
            return PeerRejection.HOST
        return None
