"""The resident Storage SCP: peer checks, landing received objects where a pull expects them.

Knows DICOM networking and files; nothing of de-identification.
"""

from anonpipe.scp.lander import Lander, Refused, StoreRequest
from anonpipe.scp.landing import Arrival, ArrivalHandler, Landing, LandingError, LandingRegistry
from anonpipe.scp.peers import PeerPolicy, PeerRejection
from anonpipe.scp.server import ScpStatus, StorageSCP

__all__ = [
    "Arrival",
    "ArrivalHandler",
    "Lander",
    "Landing",
    "LandingError",
    "LandingRegistry",
    "PeerPolicy",
    "PeerRejection",
    "Refused",
    "ScpStatus",
    "StorageSCP",
    "StoreRequest",
]
