"""Hypothesis fuzz of our Storage SCP at the PDU level: hostile bytes on raw TCP connections.

What is fuzzed: :class:`anonpipe.scp.StorageSCP` (allowed peer: ``PYSCU`` from 127.0.0.1, its
own spool folder). Each example runs 1-3 attacks, one connection each:

- a malformed A-ASSOCIATE-RQ: random or valid fields (protocol version, AE titles, application
  context, presentation contexts, user information), then the PDU length, item lengths (0,
  0xFFFF, random) or bytes overwritten, or the PDU truncated; from the allowed peer's address
  or another loopback address (the other attacks before an association come from those);
- a PDU header with an absurd length (up to 0xFFFFFFFF), with or without part of a body;
- a P-DATA-TF before any association; a PDU of an unknown type; plain random bytes;
- a valid association of the allowed peer (A-ASSOCIATE-RQ built with pynetdicom's
  ``A_ASSOCIATE_RQ``), then a sequence of C-STORE and C-ECHO commands (some with a bit flipped),
  data set fragments on the right or wrong context, random PDVs with wrong lengths, other PDUs
  and raw garbage;
- the allowed peer stopping in the middle of a C-STORE (the stream cut anywhere), then closing
  or aborting.

Each connection then closes at once, half-closes and drains, releases or aborts.

Invariants, after every example: the SCP's acceptor thread is alive and it listens; the allowed
peer associates and C-ECHOes successfully within 5 s; once the connections are closed (a short
wait allowed) the spool folder is empty and, after that echo, no association slot is still
counted (``max_associations`` such slots lock the allowed peers out); no thread ended with an
uncaught exception (pynetdicom's network thread dying skips the SCP's connection-close handlers:
spool clean-up, per-address counts). Over the whole run the process RSS grows by less than
50 MB, and after it every association ends.

The SCP lives across examples (what one example leaves behind meets the next); after a failing
example it is restarted, so that Hypothesis shrinks from a sound SCP. Some failures are races
(the same bytes fail one time in two): Hypothesis then reports them as flaky, with the example.

The default run is short and seeded (``derandomize``). A long campaign::

    ANONPIPE_FUZZ_EXAMPLES=10000 .venv/bin/pytest tests/fuzz -p no:cacheprovider

and another one: ``ANONPIPE_FUZZ_SEED=N`` (then Hypothesis draws from seed N).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from anonpipe.config import LocalSettings, Peer
from anonpipe.scp import LandingRegistry, StorageSCP
from tests.harness.ports import LOOPBACK, free_port
from tests.net.conftest import OUR_AE, start_scp

# ---------------------------------------------------------------------------------- settings

#: Examples per run; ANONPIPE_FUZZ_EXAMPLES=10000 for a campaign.
EXAMPLES = int(os.environ.get("ANONPIPE_FUZZ_EXAMPLES", "60"))
#: None: derandomized (the same examples every run); ANONPIPE_FUZZ_SEED=N: another campaign.
_SEED = os.environ.get("ANONPIPE_FUZZ_SEED", "").strip()
SEED = int(_SEED) if _SEED else None

# A campaign gets a timeout scaled by its example count; the default run keeps the suite's.
pytestmark = (
    [pytest.mark.timeout(max(300, 10 * EXAMPLES))] if "ANONPIPE_FUZZ_EXAMPLES" in os.environ else []
)

_T = TypeVar("_T")


def _campaign(test: Callable[..., _T]) -> Callable[..., _T]:
    """The module's Hypothesis settings, and the seed of ANONPIPE_FUZZ_SEED when set."""
    configured = settings(
        max_examples=EXAMPLES,
        deadline=timedelta(seconds=30),
        derandomize=SEED is None,
        database=None,
        # no "explain" phase: each of its runs may wait out the settle time of a racy failure
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )(test)
    return configured if SEED is None else hypothesis_seed(SEED)(configured)


ALLOWED_AE = "PYSCU"
VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: Context IDs the valid association proposes: CT Image Storage (explicit) and Verification.
STORE_CONTEXT, ECHO_CONTEXT = 1, 3
#: How long the allowed peer may take to associate and echo, and the SCP to clean up.
ECHO_WITHIN = 5.0
SETTLE_WITHIN = 5.0
#: Connections that never associate hold pynetdicom's association thread for the guard's 5 s.
ASSOCIATIONS_END_WITHIN = 10.0
RSS_GROWTH_MIB = 50.0
#: PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ_TYPE, P_DATA_TF_TYPE, A_RELEASE_RQ_TYPE, A_ABORT_TYPE = 0x01, 0x04, 0x05, 0x07

#: Hostile connections come from their own loopback addresses (127.0.5.1 ...), so they never
#: count against the allowed peer's address (the SCP limits waiting connections per address).
_HOSTILE_HOSTS = (f"127.0.{5 + n // 250}.{1 + n % 250}" for n in itertools.cycle(range(2500)))


# ---------------------------------------------------------------------------------- encoding


def _pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return struct.pack(">BBL", kind, 0, size & 0xFFFFFFFF) + body


def _item(kind: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return struct.pack(">BBH", kind, 0, size & 0xFFFF) + body


def _associate_rq_fields(called: bytes, calling: bytes, version: int, items: list[bytes]) -> bytes:
    """An A-ASSOCIATE-RQ with any field values (PS3.8 9.3.2), items as given."""
    body = struct.pack(">HH", version, 0) + called[:16].ljust(16) + calling[:16].ljust(16)
    return _pdu(A_ASSOCIATE_RQ_TYPE, body + bytes(32) + b"".join(items))


def valid_associate_rq(calling: str = ALLOWED_AE, called: str = OUR_AE) -> bytes:
    """The allowed peer's A-ASSOCIATE-RQ, encoded by pynetdicom: CT Image Storage (explicit VR)
    as context 1, Verification as context 3."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    store = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    store.context_id = STORE_CONTEXT
    echo = build_context(VERIFICATION, [ImplicitVRLittleEndian])
    echo.context_id = ECHO_CONTEXT
    primitive.presentation_context_definition_list = [store, echo]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def item_length_offsets(rq: bytes) -> list[int]:
    """Offsets of the 2-byte length fields of an A-ASSOCIATE-RQ's items and sub-items."""
    offsets: list[int] = []

    def walk(pos: int, end: int, nested: bool) -> None:
        while pos + 4 <= end:
            kind, length = rq[pos], struct.unpack_from(">H", rq, pos + 2)[0]
            offsets.append(pos + 2)
            if not nested and kind == 0x20:
                walk(pos + 8, min(pos + 4 + length, end), True)
            elif not nested and kind == 0x50:
                walk(pos + 4, min(pos + 4 + length, end), True)
            pos += 4 + length

    walk(74, len(rq), False)
    return offsets


def _command(message: C_STORE_RQ | C_ECHO_RQ) -> bytes:
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


def store_command(sop_instance_uid: str) -> bytes:
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = sop_instance_uid
    request.Priority = 2
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return _command(message)


def echo_command() -> bytes:
    request = C_ECHO()
    request.MessageID = 2
    request.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(request)
    return _command(message)


SOP_INSTANCE_UID = "1.2.826.0.1.3680043.9.9999.2.1"


def _dataset_bytes() -> bytes:
    """A CT object of a study no pull expects (explicit VR LE, 32 KiB of pixels)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = SOP_INSTANCE_UID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.9999.3"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.9999.4"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 128
    ds.BitsAllocated = 16
    ds.PixelData = bytes(range(256)) * 128
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


DATASET = _dataset_bytes()
STORE_COMMAND = store_command(SOP_INSTANCE_UID)
ECHO_COMMAND = echo_command()


def p_data(items: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF of PDVs (context ID, message control header, fragment)."""
    body = b"".join(struct.pack(">LBB", len(d) + 2, ctx, ctrl) + d for ctx, ctrl, d in items)
    return _pdu(P_DATA_TF_TYPE, body)


def store_stream(fragment: int) -> bytes:
    """A whole C-STORE of :data:`DATASET` on context 1, in PDVs of at most `fragment` bytes."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = SOP_INSTANCE_UID
    request.Priority = 2
    request.DataSet = io.BytesIO(DATASET)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(STORE_CONTEXT, fragment):
        pdus.append(
            p_data(
                [
                    (ctx, data[0], bytes(data[1:]))
                    for ctx, data in primitive.presentation_data_value_list
                ]
            )
        )
    return b"".join(pdus)


def _flip(data: bytes, flip: int | None) -> bytes:
    if flip is None or not data:
        return data
    buf = bytearray(data)
    buf[(flip >> 3) % len(buf)] ^= 1 << (flip & 7)
    return bytes(buf)


# ---------------------------------------------------------------------------------- connections


@dataclass(frozen=True)
class Ending:
    """How a connection ends: ``close`` at once, ``drain`` (half-close, read until the SCP
    closes), ``release`` (A-RELEASE-RQ, then drain) or ``abort`` (A-ABORT, then close)."""

    how: str


def _drain(sock: socket.socket, within: float = 3.0) -> bytes:
    """Read what the SCP sends until it closes (or `within` seconds pass)."""
    received = bytearray()
    deadline = time.monotonic() + within
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return bytes(received)


def _send(sock: socket.socket, data: bytes) -> bool:
    """Send, False once the SCP has closed the connection (which it may do at any point)."""
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True


def _finish(sock: socket.socket, ending: Ending) -> None:
    try:
        if ending.how == "release":
            _send(sock, _pdu(A_RELEASE_RQ_TYPE, bytes(4)))
        if ending.how in ("drain", "release"):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            _drain(sock)
        elif ending.how == "abort":
            _send(sock, _pdu(A_ABORT_TYPE, bytes(4)))
    finally:
        sock.close()


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.settimeout(5)
    sock.connect((LOOPBACK, port))
    return sock


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU from the SCP: (type, body); (0, b"") when it closed the connection."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    kind, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            break
        body += chunk
    return kind, body


def _associate(port: int) -> socket.socket:
    """A raw connection of the allowed peer with an established association."""
    sock = _connect(LOOPBACK, port)
    sock.sendall(valid_associate_rq())
    kind, body = _read_pdu(sock)
    if kind != 0x02:
        sock.close()
        raise AssertionError(f"the allowed peer's association was answered with PDU type {kind}")
    # the presentation context results: both of ours must be accepted (result 0)
    results = {}
    pos = 68
    while pos + 4 <= len(body):
        item, length = body[pos], struct.unpack_from(">H", body, pos + 2)[0]
        if item == 0x21:
            results[body[pos + 4]] = body[pos + 6]
        pos += 4 + length
    if results.get(STORE_CONTEXT) != 0 or results.get(ECHO_CONTEXT) != 0:
        sock.close()
        raise AssertionError(f"contexts not accepted: {results}")
    return sock


# ---------------------------------------------------------------------------------- attacks


@dataclass(frozen=True)
class Edit:
    """A byte-level change to an A-ASSOCIATE-RQ: ``pdu_length``, ``item_length`` (the
    `index`-th item or sub-item length field), ``overwrite`` or ``truncate``."""

    kind: str
    index: int
    value: int
    data: bytes = b""

    def apply(self, rq: bytes) -> bytes:
        if self.kind == "pdu_length":
            return rq[:2] + struct.pack(">L", self.value & 0xFFFFFFFF) + rq[6:]
        if self.kind == "item_length":
            offsets = item_length_offsets(rq)
            if not offsets:
                return rq
            at = offsets[self.index % len(offsets)]
            return rq[:at] + struct.pack(">H", self.value & 0xFFFF) + rq[at + 2 :]
        if self.kind == "overwrite":
            at = self.index % max(1, len(rq))
            return rq[:at] + self.data + rq[at + len(self.data) :]
        return rq[: self.index % max(1, len(rq))]  # truncate


@dataclass(frozen=True)
class MalformedAssociate:
    """An A-ASSOCIATE-RQ, valid (pynetdicom) or with random fields, then edited; from the
    allowed peer's address (an edited RQ may still be accepted) or another one."""

    base: bytes
    edits: tuple[Edit, ...]
    from_allowed_host: bool
    ending: Ending

    def run(self, port: int) -> None:
        rq = self.base
        for edit in self.edits:
            rq = edit.apply(rq)
        sock = _connect(LOOPBACK if self.from_allowed_host else next(_HOSTILE_HOSTS), port)
        _send(sock, rq)
        _finish(sock, self.ending)


@dataclass(frozen=True)
class RawPdu:
    """Bytes before any association, from a hostile address: a PDU header with any type and
    length (up to 0xFFFFFFFF) and a body of any size, a P-DATA-TF, or plain garbage."""

    data: bytes
    ending: Ending

    def run(self, port: int) -> None:
        sock = _connect(next(_HOSTILE_HOSTS), port)
        _send(sock, self.data)
        _finish(sock, self.ending)


@dataclass(frozen=True)
class AssociatedGarbage:
    """The allowed peer associates properly, then sends `segments` (raw bytes each)."""

    segments: tuple[bytes, ...]
    ending: Ending

    def run(self, port: int) -> None:
        sock = _associate(port)
        for segment in self.segments:
            if not _send(sock, segment):
                break
        _finish(sock, self.ending)


@dataclass(frozen=True)
class StopMidObject:
    """The allowed peer sends the first `cut` bytes of a C-STORE, then stops."""

    fragment: int
    cut: int
    ending: Ending

    def run(self, port: int) -> None:
        stream = store_stream(self.fragment)
        sock = _associate(port)
        _send(sock, stream[: self.cut % (len(stream) + 1)])
        _finish(sock, self.ending)


Attack = MalformedAssociate | RawPdu | AssociatedGarbage | StopMidObject

# ---------------------------------------------------------------------------------- strategies

_ENDINGS = st.builds(Ending, st.sampled_from(("close", "drain", "release", "abort")))
_U16 = st.one_of(st.sampled_from((0, 1, 0xFFFF)), st.integers(0, 0xFFFF))
_U32 = st.one_of(
    st.sampled_from((0, 1, 6, 0xFFFF, 1 << 20, (1 << 20) + 1, 0xFFFFFFF0, 0xFFFFFFFF)),
    st.integers(0, 0xFFFFFFFF),
)
_UIDS = st.one_of(
    st.sampled_from((CTImageStorage, VERIFICATION, ExplicitVRLittleEndian, APPLICATION_CONTEXT)),
    st.binary(max_size=70).map(lambda b: b.decode("latin-1")),
)
_AE_TITLES = st.one_of(
    st.sampled_from((OUR_AE, ALLOWED_AE, "")),
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
)


def _text(value: str) -> bytes:
    return value.encode("latin-1")


@st.composite
def _random_fields_rq(draw: st.DrawFn) -> bytes:
    """An A-ASSOCIATE-RQ whose fields and items are drawn, lengths consistent."""
    items = []
    if draw(st.booleans()):
        items.append(_item(0x10, _text(draw(_UIDS))))
    for _ in range(draw(st.integers(0, 4))):
        sub = _item(0x30, _text(draw(_UIDS)))
        for _ in range(draw(st.integers(0, 3))):
            sub += _item(0x40, _text(draw(_UIDS)))
        context = struct.pack(">BBBB", draw(st.integers(0, 255)), 0, 0, 0) + sub
        items.append(_item(0x20, context))
    if draw(st.booleans()):
        user = _item(0x51, struct.pack(">L", draw(_U32)))
        user += _item(0x52, _text(draw(_UIDS)))
        if draw(st.booleans()):
            user += _item(draw(st.integers(0x51, 0x5F)), draw(st.binary(max_size=40)))
        items.append(_item(0x50, user))
    if draw(st.booleans()):
        items.append(_item(draw(st.integers(0, 255)), draw(st.binary(max_size=40))))
    version = draw(st.one_of(st.just(1), st.integers(0, 0xFFFF)))
    called, calling = draw(_AE_TITLES), draw(_AE_TITLES)
    return _associate_rq_fields(_text(called), _text(calling), version, items)


_EDITS = st.one_of(
    st.builds(Edit, st.just("pdu_length"), st.just(0), _U32),
    st.builds(Edit, st.just("item_length"), st.integers(0, 64), _U16),
    st.builds(
        Edit,
        st.just("overwrite"),
        st.integers(0, 4096),
        st.just(0),
        st.binary(min_size=1, max_size=8),
    ),
    st.builds(Edit, st.just("truncate"), st.integers(0, 4096), st.just(0)),
)
_BASE_RQ = st.one_of(
    st.builds(valid_associate_rq, st.sampled_from((ALLOWED_AE, "STAGING")), st.just(OUR_AE)),
    _random_fields_rq(),
)
MALFORMED_ASSOCIATE = st.builds(
    MalformedAssociate,
    base=_BASE_RQ,
    edits=st.lists(_EDITS, max_size=3).map(tuple),
    from_allowed_host=st.booleans(),
    ending=_ENDINGS,
)

_BODY = st.one_of(
    st.binary(max_size=256),
    st.integers(0, 1 << 17).map(bytes),  # zeros, up to 128 KiB
)
_PDV = st.builds(
    lambda length, ctx, ctrl, data: (
        struct.pack(">L", (len(data) + 2 + length) & 0xFFFFFFFF) + bytes((ctx, ctrl)) + data
    ),
    st.one_of(st.just(0), st.integers(-8, 8), _U32),
    st.one_of(st.sampled_from((STORE_CONTEXT, ECHO_CONTEXT)), st.integers(0, 255)),
    st.one_of(st.integers(0, 3), st.integers(0, 255)),
    st.one_of(
        st.binary(max_size=200),
        st.builds(_flip, st.sampled_from((STORE_COMMAND, ECHO_COMMAND)), st.integers(0, 1 << 12)),
    ),
)
_P_DATA = st.lists(_PDV, max_size=4).map(lambda pdvs: _pdu(P_DATA_TF_TYPE, b"".join(pdvs)))
RAW_PDU = st.builds(
    RawPdu,
    data=st.one_of(
        # an absurd length, with or without (part of) a body
        st.builds(
            lambda kind, length, body: struct.pack(">BBL", kind, 0, length) + body,
            st.integers(1, 7),
            _U32,
            _BODY,
        ),
        _P_DATA,  # P-DATA-TF before any association
        st.builds(  # unknown PDU types
            lambda kind, body: _pdu(kind, body),
            st.one_of(st.just(0), st.integers(8, 255)),
            st.binary(max_size=256),
        ),
        st.binary(min_size=1, max_size=512),
    ),
    ending=_ENDINGS,
)


def _fragment(start: int, size: int, last: bool, ctx: int) -> bytes:
    begin = start % len(DATASET)
    return p_data([(ctx, 0x02 if last else 0x00, DATASET[begin : begin + size])])


_SEGMENT = st.one_of(
    # the C-STORE command, sometimes with a bit flipped
    st.builds(
        lambda flip: p_data([(STORE_CONTEXT, 0x03, _flip(STORE_COMMAND, flip))]),
        st.one_of(st.none(), st.integers(0, 1 << 12)),
    ),
    # a fragment of the data set, on the store context or another one
    st.builds(
        _fragment,
        st.integers(0, len(DATASET)),
        st.integers(0, 1 << 14),
        st.booleans(),
        st.one_of(st.just(STORE_CONTEXT), st.integers(0, 255)),
    ),
    # a C-ECHO command, sometimes with a bit flipped
    st.builds(
        lambda flip: p_data([(ECHO_CONTEXT, 0x03, _flip(ECHO_COMMAND, flip))]),
        st.one_of(st.none(), st.integers(0, 1 << 12)),
    ),
    _P_DATA,
    st.builds(lambda kind, body: _pdu(kind, body), st.integers(0, 255), st.binary(max_size=64)),
    st.builds(lambda length: struct.pack(">BBL", 4, 0, length), _U32),  # a header alone
    st.binary(min_size=1, max_size=256),
)
ASSOCIATED_GARBAGE = st.builds(
    AssociatedGarbage,
    segments=st.lists(_SEGMENT, min_size=1, max_size=6).map(tuple),
    ending=_ENDINGS,
)
STOP_MID_OBJECT = st.builds(
    StopMidObject,
    fragment=st.sampled_from((1024, 4096, 16384)),
    cut=st.integers(0, 1 << 20),
    ending=st.builds(Ending, st.sampled_from(("close", "abort"))),
)
ATTACKS: st.SearchStrategy[Attack] = st.one_of(
    MALFORMED_ASSOCIATE, RAW_PDU, ASSOCIATED_GARBAGE, STOP_MID_OBJECT
)

# ---------------------------------------------------------------------------------- fixtures


class Fuzzed:
    """Our SCP on a free loopback port with its own spool folder; PYSCU from 127.0.0.1 only.

    It runs across examples (what one leaves behind meets the next). After a failed example it
    is restarted, so that the next one (Hypothesis shrinking) starts from a sound SCP.
    Exceptions that end any thread (pynetdicom's reactor and association threads included)
    are recorded in `thread_errors`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.starts = 0
        self.thread_errors: list[str] = []
        self.scp = self._start()

    @property
    def spool_dir(self) -> Path:
        return self.folder / f"spool-{self.starts}"

    def _start(self) -> StorageSCP:
        self.starts += 1
        local = LocalSettings(
            ae_title=OUR_AE,
            bind=LOOPBACK,
            port=free_port(),
            acse_timeout=10,
            dimse_timeout=30,
            network_timeout=30,
            min_free_mb=0,
        )
        peers = [Peer(ALLOWED_AE, LOOPBACK)]
        return start_scp(local, LandingRegistry(), peers, spool_dir=self.spool_dir)

    def restart(self) -> None:
        self.scp.stop(drain_timeout=1)
        self.thread_errors.clear()
        self.scp = self._start()

    def on_thread_exception(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        self.thread_errors.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")


@pytest.fixture
def fuzzed(tmp_path: Path) -> Iterator[Fuzzed]:
    held = Fuzzed(tmp_path)
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        held.on_thread_exception(args)
        previous(args)

    threading.excepthook = hook
    try:
        yield held
        _associations_end(held.scp)  # after the run: no connection is kept for good
    finally:
        threading.excepthook = previous
        held.scp.stop(drain_timeout=5)


# ---------------------------------------------------------------------------------- checks


def _rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _echo(port: int) -> None:
    """The allowed peer associates and C-ECHOes successfully, all within ECHO_WITHIN seconds."""
    started = time.monotonic()
    ae = AE(ae_title=ALLOWED_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_WITHIN
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(LOOPBACK, port, ae_title=OUR_AE)
    assert assoc.is_established, "the allowed peer could not associate"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    assert "Status" in status and int(status.Status) == 0, f"C-ECHO answered {status}"
    took = time.monotonic() - started
    assert took < ECHO_WITHIN, f"associate + C-ECHO took {took:.1f} s"


def _settle(fuzzed: Fuzzed, slots: bool) -> None:
    """Once our connections closed (a short wait allowed): nothing in the spool folder; with
    `slots`, also no allowed peer's association slot still counted (``max_associations`` of them
    lock the allowed peers out; checked after an admission, which may forget dead ones)."""
    deadline = time.monotonic() + SETTLE_WITHIN
    while any(fuzzed.spool_dir.iterdir()) or (slots and fuzzed.scp.guard.accepted):
        if time.monotonic() > deadline:
            left = sorted(p.name for p in fuzzed.spool_dir.iterdir())
            raise AssertionError(
                f"{SETTLE_WITHIN:.0f} s after the close: spool files {left}, "
                f"{fuzzed.scp.guard.accepted} association slots still taken "
                f"({fuzzed.scp.active_associations()} associations alive); "
                f"threads ended by an exception: {fuzzed.thread_errors}"
            )
        time.sleep(0.01)


def _associations_end(scp: StorageSCP) -> None:
    """Every association and connection ends once the peers closed: those that never associated
    within the guard's 5 s (pynetdicom's association thread waits that long on its ACSE timer
    even after the socket closed), the others at once."""
    deadline = time.monotonic() + ASSOCIATIONS_END_WITHIN
    while scp.active_associations():
        if time.monotonic() > deadline:
            count = scp.active_associations()
            raise AssertionError(
                f"{count} associations {ASSOCIATIONS_END_WITHIN:.0f} s after the close"
            )
        time.sleep(0.05)


def _check(fuzzed: Fuzzed) -> None:
    acceptors = [
        t for t in threading.enumerate() if t.name.startswith("AcceptorServer") and t.is_alive()
    ]
    assert acceptors, "the SCP's acceptor thread died"
    assert fuzzed.scp.is_listening, "the SCP stopped listening"
    _settle(fuzzed, slots=False)
    _echo(fuzzed.scp.port)
    _settle(fuzzed, slots=True)
    # Checked last: the SCP has handled this example's connections by now (the echo came after).
    assert not fuzzed.thread_errors, f"threads ended by an exception: {fuzzed.thread_errors}"


# ---------------------------------------------------------------------------------- tests


def test_the_valid_messages_are_valid(fuzzed: Fuzzed) -> None:
    """The baseline: the allowed peer's raw association is accepted and released, a whole
    C-STORE is answered (0x0124: no pull expects the study) and nothing stays in the spool."""
    sock = _associate(fuzzed.scp.port)
    try:
        sock.sendall(store_stream(4096))
        kind, body = _read_pdu(sock)
        assert kind == P_DATA_TF_TYPE
        assert struct.pack("<HHLH", 0x0000, 0x0900, 2, 0x0124) in body  # Status: 0x0124
        sock.sendall(p_data([(ECHO_CONTEXT, 0x03, ECHO_COMMAND)]))
        kind, body = _read_pdu(sock)
        assert kind == P_DATA_TF_TYPE
        assert struct.pack("<HHLH", 0x0000, 0x0900, 2, 0x0000) in body
    finally:
        _finish(sock, Ending("release"))
    assert item_length_offsets(valid_associate_rq())  # the walker finds the items
    _check(fuzzed)
    _associations_end(fuzzed.scp)


@_campaign
@given(attacks=st.lists(ATTACKS, min_size=1, max_size=3))
def test_hostile_connections_leave_the_scp_serving(
    fuzzed: Fuzzed, rss_at_start: float, attacks: list[Attack]
) -> None:
    try:
        for attack in attacks:
            note(f"attack: {attack!r}"[:4000])
            attack.run(fuzzed.scp.port)
        _check(fuzzed)
    except BaseException:
        fuzzed.restart()
        raise
    grown = _rss_mib() - rss_at_start
    assert grown < RSS_GROWTH_MIB, f"RSS grew by {grown:.0f} MiB during the run"


@pytest.fixture
def rss_at_start(fuzzed: Fuzzed) -> float:
    """RSS once the SCP served one association (pynetdicom's imports and caches are loaded)."""
    _echo(fuzzed.scp.port)
    return _rss_mib()
