"""The command-set codec against pynetdicom's own path: same bytes, same primitives, same errors.

The reference is always pynetdicom's ``DIMSEMessage`` methods (which the codec leaves alone: it
only overrides them on the message subclasses) and ``dsutils`` (pydicom), called directly.
"""

from __future__ import annotations

import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import dimse_messages, dsutils
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_MOVE, C_STORE

from anonpipe import commandset
from anonpipe.commandset import MESSAGES, CommandSet, MessageType
from anonpipe.config import LocalSettings, ResearchSettings, StagingSettings
from anonpipe.scp import LandingRegistry, StorageSCP
from anonpipe.scu import pull_study, push_files
from tests.harness.dcmtk import echoscu, storescu
from tests.harness.orthanc import OrthancServer
from tests.harness.studygen import ALL_TRANSFER_SYNTAXES, Manifest
from tests.net.conftest import OUR_AE

pytestmark = pytest.mark.timeout(180)

DIMSEMessage = dimse_messages.DIMSEMessage
BY_NAME = {m.name: m for m in MESSAGES.values()}
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(autouse=True)
def _installed() -> None:
    commandset.install()


# -- references: pynetdicom's own path --------------------------------------------------------


def outcome(action: Callable[[], Any]) -> Any:
    """The result of *action*, or the type of the exception it raised (warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return action()
        except Exception as exc:
            return type(exc)


def message_class(message: MessageType) -> type:
    cls: type = getattr(dimse_messages, message.name)
    return cls


def reference_bytes(message: MessageType, primitive: Any) -> bytes:
    msg: Any = DIMSEMessage.__new__(message_class(message))
    DIMSEMessage.__init__(msg)
    DIMSEMessage.primitive_to_message(msg, primitive)
    encoded = dsutils.encode(msg.command_set, True, True)
    assert encoded is not None
    return encoded


def our_bytes(message: MessageType, primitive: Any) -> bytes | None:
    """Through the installed hook, as pynetdicom's DIMSE provider sends a message."""
    msg = message_class(message)()
    msg.primitive_to_message(primitive)
    encoded: bytes | None = dimse_messages.encode(msg.command_set, True, True)  # type: ignore[attr-defined]
    return encoded


def primitive_state(primitive: Any) -> dict[str, Any]:
    """Everything a primitive holds, values with their types (a data set by content)."""
    state = {}
    for name, value in vars(primitive).items():
        if isinstance(value, BytesIO):
            value = ("BytesIO", value.getvalue())
        state[name] = (type(value).__name__, value)
    return state


def receive(raw: bytes, decode: Callable[[BytesIO, bool, bool], Dataset], base: bool) -> Any:
    """What pynetdicom's receiving side makes of a command set: the class, the data set flag,
    the primitive (and the Dataset's elements), as ``decode_msg`` then ``message_to_primitive``
    do; *base* uses ``DIMSEMessage``'s own ``message_to_primitive``."""
    msg = DIMSEMessage()
    msg.command_set = decode(BytesIO(raw), True, True)
    msg.__class__ = dimse_messages._MESSAGE_TYPES[msg.command_set.CommandField][1]
    has_data_set = msg.command_set.CommandDataSetType != 0x0101
    msg.context_id = 3
    msg.data_set = BytesIO(b"data")
    convert = DIMSEMessage.message_to_primitive if base else type(msg).message_to_primitive
    primitive = primitive_state(convert(msg))
    elements = [(e.tag, e.VR, e.VM, e.value) for e in msg.command_set]
    return type(msg).__name__, has_data_set, primitive, elements


def reference_receive(raw: bytes) -> Any:
    return outcome(lambda: receive(raw, dsutils.decode, base=True))


def our_receive(raw: bytes) -> Any:
    hook = dimse_messages.decode  # type: ignore[attr-defined]
    return outcome(lambda: receive(raw, hook, base=False))


# -- primitives -------------------------------------------------------------------------------

conformant_uid = st.lists(
    st.one_of(st.just(0), st.integers(1, 10**12)), min_size=2, max_size=14
).map(lambda parts: ".".join(map(str, parts)))
odd_uid = st.sampled_from(
    ["1.02.3", "1.2.", "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21.22.23.24.25"]
)
uids = st.one_of(conformant_uid, conformant_uid, odd_uid)
ae_titles = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=17)
comments = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=70),
    st.text(max_size=10),
)
tags = st.integers(0, 0xFFFFFFFF)
offending = st.one_of(tags, st.lists(tags, min_size=0, max_size=3))
ushort = st.integers(0, 0xFFFF)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def build(cls: type, **values: Any) -> Any:
    """A primitive with *values* set through its setters (None where a setter refuses one)."""
    primitive = cls()
    for name, value in values.items():
        if value is None:
            continue
        try:
            setattr(primitive, name, value)
        except Exception:
            return None
    return primitive


def drawn(cls: type, **values: Any) -> Any:
    """:func:`build` in a property test: inputs the setters refuse are skipped."""
    primitive = build(cls, **values)
    assume(primitive is not None)
    return primitive


@st.composite
def store_requests(draw: st.DrawFn) -> Any:
    primitive = drawn(
        C_STORE,
        MessageID=draw(ushort),
        AffectedSOPClassUID=draw(maybe(uids)),
        AffectedSOPInstanceUID=draw(maybe(uids)),
        Priority=draw(st.sampled_from([0, 1, 2])),
        MoveOriginatorApplicationEntityTitle=draw(maybe(ae_titles)),
        MoveOriginatorMessageID=draw(maybe(ushort)),
    )
    kind = draw(st.sampled_from(["bytes", "file", "none"]))
    if kind == "bytes":
        primitive.DataSet = BytesIO(draw(st.binary(max_size=8)))
    elif kind == "file":
        primitive._dataset_path = (Path("/nonexistent.dcm"), 132)
    return primitive


@st.composite
def store_responses(draw: st.DrawFn) -> Any:
    return drawn(
        C_STORE,
        MessageIDBeingRespondedTo=draw(ushort),
        Status=draw(ushort),
        AffectedSOPClassUID=draw(maybe(uids)),
        AffectedSOPInstanceUID=draw(maybe(uids)),
        OffendingElement=draw(maybe(offending)),
        ErrorComment=draw(maybe(comments)),
    )


@st.composite
def other_responses(draw: st.DrawFn) -> tuple[MessageType, Any]:
    name = draw(st.sampled_from(["C_ECHO_RQ", "C_ECHO_RSP", "C_FIND_RSP", "C_MOVE_RSP"]))
    message = BY_NAME[name]
    if name == "C_ECHO_RQ":
        return message, drawn(C_ECHO, MessageID=draw(ushort), AffectedSOPClassUID=draw(uids))
    common = {
        "MessageIDBeingRespondedTo": draw(ushort),
        "Status": draw(ushort),
        "AffectedSOPClassUID": draw(maybe(uids)),
        "ErrorComment": draw(maybe(comments)),
    }
    if name == "C_ECHO_RSP":
        return message, drawn(C_ECHO, **common)
    common["OffendingElement"] = draw(maybe(offending))
    if name == "C_FIND_RSP":
        primitive = drawn(C_FIND, **common)
    else:
        counts = {
            f"NumberOf{kind}Suboperations": draw(maybe(ushort))
            for kind in ("Remaining", "Completed", "Failed", "Warning")
        }
        primitive = drawn(C_MOVE, **common, **counts)
    if draw(st.booleans()):
        primitive.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    return message, primitive


# -- encoding ---------------------------------------------------------------------------------

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_encoding(message: MessageType, primitive: Any) -> None:
    expected = outcome(lambda: reference_bytes(message, primitive))
    assert outcome(lambda: our_bytes(message, primitive)) == expected
    direct = commandset.encode_command_set(
        message, primitive, data_set=commandset._data_set_of(message, primitive)[2]
    )
    if direct is not None:  # the codec took it: byte for byte pynetdicom's
        assert direct == expected


@SETTINGS
@given(store_requests())
def test_c_store_rq_bytes_are_pynetdicoms(primitive: Any) -> None:
    check_encoding(BY_NAME["C_STORE_RQ"], primitive)


@SETTINGS
@given(store_responses())
def test_c_store_rsp_bytes_are_pynetdicoms(primitive: Any) -> None:
    check_encoding(BY_NAME["C_STORE_RSP"], primitive)


@SETTINGS
@given(other_responses())
def test_echo_find_move_bytes_are_pynetdicoms(case: tuple[MessageType, Any]) -> None:
    check_encoding(*case)


def test_the_codec_takes_the_usual_messages_and_pads_as_the_standard_says() -> None:
    request = build(
        C_STORE,
        MessageID=1,
        AffectedSOPClassUID=CT,
        AffectedSOPInstanceUID="1.2.3",  # odd: one NUL
        Priority=2,
        MoveOriginatorApplicationEntityTitle="STAGE",  # odd: one space
        MoveOriginatorMessageID=7,
    )
    request.DataSet = BytesIO(b"x")
    raw = commandset.encode_command_set(BY_NAME["C_STORE_RQ"], request, data_set=True)
    assert raw is not None and raw == reference_bytes(BY_NAME["C_STORE_RQ"], request)
    assert b"1.2.3\0" in raw and b"STAGE " in raw
    assert struct.unpack_from("<I", raw, 8)[0] == len(raw) - 12  # CommandGroupLength
    response = build(C_STORE, MessageIDBeingRespondedTo=1, Status=0xA700, ErrorComment="full")
    assert commandset.encode_command_set(BY_NAME["C_STORE_RSP"], response, data_set=False)


# -- decoding ---------------------------------------------------------------------------------


def check_decoding(raw: bytes, taken: bool | None = None) -> None:
    expected = reference_receive(raw)
    assert our_receive(raw) == expected
    ours = commandset.decode_command_set(raw)
    if taken is not None:
        assert (ours is not None) == taken
    if ours is not None:
        # Its values are the Dataset's, value and type, before it becomes one.
        reference = dsutils.decode(BytesIO(raw), True, True)
        for element in reference:
            value = getattr(ours, element.keyword)
            assert (type(value), value) == (type(element.value), element.value)
            assert element.keyword in ours
        assert not ours.is_dataset


@SETTINGS
@given(store_requests())
def test_c_store_rq_decodes_to_pynetdicoms_primitive(primitive: Any) -> None:
    raw = outcome(lambda: reference_bytes(BY_NAME["C_STORE_RQ"], primitive))
    assume(isinstance(raw, bytes))
    check_decoding(raw)


@SETTINGS
@given(store_responses())
def test_c_store_rsp_decodes_to_pynetdicoms_primitive(primitive: Any) -> None:
    raw = outcome(lambda: reference_bytes(BY_NAME["C_STORE_RSP"], primitive))
    assume(isinstance(raw, bytes))
    check_decoding(raw)


@SETTINGS
@given(other_responses())
def test_echo_find_move_decode_to_pynetdicoms_primitive(case: tuple[MessageType, Any]) -> None:
    raw = outcome(lambda: reference_bytes(*case))
    assume(isinstance(raw, bytes))
    check_decoding(raw)


def element(number: int, value: bytes, group: int = 0) -> bytes:
    return struct.pack("<HHI", group, number, len(value)) + value


def value_for(number: int) -> st.SearchStrategy[bytes]:
    """Bytes for element *number*: usually well formed for its VR, sometimes anything."""
    vr = next((vr for n, vr in commandset.ELEMENTS.values() if n == number), "UN")
    good: st.SearchStrategy[bytes] = {
        "US": st.integers(0, 0xFFFF).map(lambda v: struct.pack("<H", v)),
        "UL": st.integers(0, 0xFFFFFFFF).map(lambda v: struct.pack("<I", v)),
        "UI": st.sampled_from([b"1.2.840.10008.1.1\0", b"1.2.3.4 ", b"1.2\0\0", b"01.2", b""]),
        "AE": st.sampled_from([b"ORTHANC ", b" A B ", b"A\\B ", b"\xe9T", b"  "]),
        "LO": st.sampled_from([b"no space", b"back\\slash ", b"\0\0", b"x" * 66]),
        "AT": st.sampled_from([b"\x10\x00\x10\x00", b"\x10\x00\x10\x00\x10\x00\x20\x00", b"\x01"]),
    }.get(vr, st.binary(max_size=6))
    return st.one_of(good, good, good, st.binary(max_size=6))


@st.composite
def command_sets(draw: st.DrawFn) -> bytes:
    """Command sets as a peer may send them: mostly plausible, some odd, some broken."""
    message = draw(st.sampled_from([*MESSAGES.values(), None]))
    numbers = [n for n, _vr in commandset.ELEMENTS.values()] + [0x0600, 0x5010, 0x0903]
    if message is None:
        chosen = draw(st.lists(st.sampled_from(numbers), max_size=8))
        field_value = draw(st.sampled_from([0x0020, 0x0FFF, 0x8120, 0x0001]))
    else:
        chosen = [commandset.ELEMENTS[k][0] for k in message.keywords if draw(st.booleans())]
        chosen += draw(st.lists(st.sampled_from(numbers), max_size=2))
        field_value = message.command_field
    chosen = sorted(set(chosen) | {0x0100})
    if draw(st.booleans()):
        chosen = draw(st.permutations(chosen))
    parts = []
    for number in chosen:
        if number == 0x0100:
            value = struct.pack("<H", field_value)
        elif number == 0x0800:
            value = struct.pack("<H", draw(st.sampled_from([0x0101, 0x0001, 0xFEFE])))
        else:
            value = draw(value_for(number))
        group = 0 if draw(st.integers(0, 20)) else 8
        parts.append(element(number, value, group))
    raw = b"".join(parts)
    if draw(st.integers(0, 10)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_sets())
def test_any_command_set_decodes_as_pynetdicom_decodes_it(raw: bytes) -> None:
    check_decoding(raw)


def test_unknown_or_extra_elements_go_to_pynetdicom() -> None:
    request = build(
        C_STORE, MessageID=5, AffectedSOPClassUID=CT, AffectedSOPInstanceUID="1.2.3.4", Priority=0
    )
    raw = reference_bytes(BY_NAME["C_STORE_RQ"], request)
    check_decoding(raw, taken=True)
    # A Status in a request (the primitive has one), a private-looking element, a value too
    # long for its VR: each is left to pynetdicom, which keeps it.
    for extra in (element(0x0900, b"\0\0"), element(0x5010, b"ab"), element(0x0110, b"\1\0\0\0")):
        odd = raw + extra
        check_decoding(odd, taken=False)
        assert isinstance(dimse_messages.decode(BytesIO(odd), True, True), Dataset)  # type: ignore[attr-defined]
        assert type(dimse_messages.decode(BytesIO(odd), True, True)) is Dataset  # type: ignore[attr-defined]
    status = reference_receive(raw + element(0x0900, b"\x01\x00"))
    assert status[2]["_status"] == ("int", 1)


def test_a_malformed_command_set_fails_as_before() -> None:
    no_uid = element(0x0100, b"\1\0") + element(0x0800, b"\1\0")
    assert reference_receive(b"\0\0\0\0\4\0\0\0") is AttributeError  # no CommandField
    check_decoding(b"\0\0\0\0\4\0\0\0", taken=False)
    check_decoding(no_uid, taken=True)
    # pynetdicom's decode_msg then needs the UIDs for the spool file: the same AttributeError.
    ours = commandset.decode_command_set(no_uid)
    assert ours is not None
    with pytest.raises(AttributeError):
        _ = ours.AffectedSOPInstanceUID
    with pytest.raises(AttributeError):
        _ = dsutils.decode(BytesIO(no_uid), True, True).AffectedSOPInstanceUID


# -- the command set as a Dataset -------------------------------------------------------------


def test_a_command_set_is_the_dataset_pynetdicom_had_once_used_as_one() -> None:
    response = build(
        C_STORE, MessageIDBeingRespondedTo=9, Status=0, AffectedSOPInstanceUID="1.2.3.4"
    )
    msg = dimse_messages.C_STORE_RSP()
    assert isinstance(msg.command_set, CommandSet)
    assert msg.command_set.Status is None  # as pynetdicom's blank Dataset
    msg.primitive_to_message(response)
    command_set = msg.command_set
    raw = reference_bytes(BY_NAME["C_STORE_RSP"], response)
    assert command_set.encoded == raw and not command_set.is_dataset
    assert command_set.Status == 0 and "ErrorComment" not in command_set
    assert dsutils.encode(command_set, True, True) == raw  # pydicom's encode: becomes a Dataset
    assert command_set.is_dataset and command_set.encoded is None
    assert command_set == dsutils.decode(BytesIO(raw), True, True)
    assert [e.keyword for e in command_set][:3] == [
        "CommandGroupLength",
        "CommandField",
        "MessageIDBeingRespondedTo",
    ]
    # Changed as a Dataset: encoded as one (pynetdicom's own path), the change is sent.
    command_set.Status = 0xC000
    sent = dimse_messages.encode(command_set, True, True)
    assert sent == dsutils.encode(command_set, True, True) and sent != raw
    assert dsutils.decode(BytesIO(sent), True, True).Status == 0xC000


def test_install_is_idempotent_and_uninstall_gives_pynetdicom_back() -> None:
    commandset.install()
    assert dimse_messages.decode is commandset._decode_hook  # type: ignore[attr-defined]
    assert "primitive_to_message" in vars(dimse_messages.C_STORE_RQ)
    try:
        commandset.uninstall()
        assert not commandset.installed()
        assert "primitive_to_message" not in vars(dimse_messages.C_STORE_RQ)
        assert dimse_messages.decode is dsutils.decode  # type: ignore[attr-defined]
        assert type(dimse_messages.C_STORE_RSP().command_set) is Dataset
    finally:
        commandset.install()
    assert commandset.installed()


# -- what real peers send ---------------------------------------------------------------------


@dataclass
class Capture:
    """Command sets the codec saw, in both directions, with pynetdicom's answer beside each."""

    received: list[bytes] = field(default_factory=list)
    sent: list[tuple[str, bytes | None, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received_by(self, name: str) -> list[bytes]:
        out = []
        with self.lock:
            received = list(self.received)
        for raw in received:
            parsed = commandset._parse(raw)
            if parsed is not None and parsed[0].name == name:
                out.append(raw)
        return out


@pytest.fixture
def capture(monkeypatch: pytest.MonkeyPatch) -> Iterator[Capture]:
    seen = Capture()
    decode = commandset.decode_command_set
    encode = commandset.encode_command_set

    def decode_command_set(data: bytes) -> CommandSet | None:
        with seen.lock:
            seen.received.append(data)
        return decode(data)

    def encode_command_set(message: MessageType, primitive: Any, *, data_set: bool) -> Any:
        result = encode(message, primitive, data_set=data_set)
        expected = outcome(lambda: reference_bytes(message, primitive))
        with seen.lock:
            seen.sent.append((message.name, result, expected))
        return result

    monkeypatch.setattr(commandset, "decode_command_set", decode_command_set)
    monkeypatch.setattr(commandset, "encode_command_set", encode_command_set)
    yield seen


def check_capture(seen: Capture, received: set[str], sent: set[str]) -> None:
    """Every command set seen decodes (and every one we sent encoded) as pynetdicom's did, and
    the codec took (not left to pynetdicom) each of the message types named."""
    with seen.lock:
        received_sets, sent_sets = list(seen.received), list(seen.sent)
    taken_in = set()
    for raw in received_sets:
        check_decoding(raw)
        parsed = commandset._parse(raw)
        if parsed is not None:
            taken_in.add(parsed[0].name)
    assert received <= taken_in
    taken_out = set()
    for name, result, expected in sent_sets:
        assert result is None or result == expected
        if result is not None:
            taken_out.add(name)
    assert sent <= taken_out


def test_dcmtk_storescu_and_echoscu_command_sets(
    scp: StorageSCP,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
    capture: Capture,
) -> None:
    manifest = study_factory(
        series_per_study=2, instances_per_series=3, transfer_syntaxes=ALL_TRANSFER_SYNTAXES
    )
    (study,) = manifest.studies
    with registry.expect(study.study_instance_uid, tmp_path / "in") as landing:
        storescu(scp.port, [manifest.root], called_aet=OUR_AE)
        assert landing.landed == 6
    echoscu(scp.port, called_aet=OUR_AE, calling_aet="STORESCU")
    requests = capture.received_by("C_STORE_RQ")
    assert len(requests) == 6
    assert {str(commandset.decode_command_set(r).AffectedSOPInstanceUID) for r in requests} == set(  # type: ignore[union-attr]
        manifest.sop_instance_uids
    )
    check_capture(capture, {"C_STORE_RQ", "C_ECHO_RQ"}, {"C_STORE_RSP", "C_ECHO_RSP"})


def test_orthanc_move_suboperations_and_store_responses(
    scp: StorageSCP,
    registry: LandingRegistry,
    local: LocalSettings,
    staging: StagingSettings,
    staging_orthanc: OrthancServer,
    research: ResearchSettings,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
    capture: Capture,
) -> None:
    manifest = study_factory(series_per_study=2, instances_per_series=2)
    staging_orthanc.upload(manifest.paths)
    (study_uid,) = manifest.study_uids
    result = pull_study(local, staging, registry, study_uid, tmp_path / "pulled")
    assert result.status == "complete", result.detail
    moved = capture.received_by("C_STORE_RQ")
    assert len(moved) == 4
    for raw in moved:
        request = commandset.decode_command_set(raw)
        assert request is not None
        assert request.MoveOriginatorApplicationEntityTitle == OUR_AE
        assert isinstance(request.MoveOriginatorMessageID, int)
        assert isinstance(request.AffectedSOPClassUID, UID)
    report = push_files(local, research, sorted((tmp_path / "pulled").iterdir()))
    assert len(report.stored) == 4 and not report.failed
    check_capture(
        capture, {"C_STORE_RQ", "C_MOVE_RSP", "C_STORE_RSP"}, {"C_STORE_RSP", "C_STORE_RQ"}
    )
