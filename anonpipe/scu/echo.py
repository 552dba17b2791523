"""C-ECHO: is the peer there and does it accept us?"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pynetdicom.presentation import build_context

from anonpipe.config import LocalSettings, Settings
from anonpipe.dimse import VERIFICATION, Endpoint
from anonpipe.scu.association import PeerUnavailable, associate, describe, ended

__all__ = ["EchoResult", "echo", "remote_peers"]


@dataclass(frozen=True, slots=True)
class EchoResult:
    """The answer of one C-ECHO: ``ok`` with the round trip in seconds, or the reason it failed."""

    peer: str
    ok: bool
    seconds: float
    status: int | None = None
    error: str = ""


def echo(local: LocalSettings, peer: Endpoint) -> EchoResult:
    """Associate with *peer* as ``local.ae_title`` and send one C-ECHO; never raises for a peer
    that is down, rejects us or answers with a failure."""
    start = time.monotonic()
    try:
        with associate(local, peer, [build_context(VERIFICATION)]) as assoc:
            answer = assoc.send_c_echo()
            ending = ended(assoc)
    except PeerUnavailable as exc:
        return EchoResult(describe(peer), False, time.monotonic() - start, error=exc.reason)
    elapsed = time.monotonic() - start
    status = answer.get("Status") if answer else None
    if status is None:  # an abort says more than the missing answer (our AE title refused?)
        why = f" ({ending.reason})" if ending is not None else ""
        return EchoResult(describe(peer), False, elapsed, error=f"no C-ECHO response{why}")
    if status != 0:
        return EchoResult(describe(peer), False, elapsed, int(status), f"status 0x{status:04X}")
    return EchoResult(describe(peer), True, elapsed, 0)


def remote_peers(settings: Settings) -> dict[str, Endpoint]:
    """The PACS we talk to, by the names operators use (``echo staging|research``)."""
    return {"staging": settings.staging, "research": settings.research}
