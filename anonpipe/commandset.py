"""DIMSE command sets of C-STORE (and C-ECHO, C-FIND and C-MOVE responses) without pydicom.

Every DIMSE message starts with a command set: a handful of group 0000 elements, always encoded
implicit VR little endian (PS3.7 6.3.1, PS3.5 7.1.3: tag group, tag element, 4-byte length,
value; (0000,0000) CommandGroupLength first, the length of what follows it). pynetdicom 3.0
builds, encodes and decodes each one as a pydicom ``Dataset``: receiving 400 objects from
``storescu``, about 40 % of our SCP's CPU went there (``C_STORE_RSP.__init__`` filling a
Dataset with ``None`` values, ``primitive_to_message`` encoding it twice for the group length,
``decode_msg`` reading the request with pydicom, ``message_to_primitive`` walking its elements).
This module encodes a primitive straight to those bytes and decodes them straight into the
primitive, from a table of the elements (:data:`ELEMENTS`) and of the messages it knows
(:data:`MESSAGES`: C-STORE-RQ/RSP, C-ECHO-RQ/RSP, C-FIND-RSP, C-MOVE-RSP).

**It never decides differently from pynetdicom.** The codec only takes what it can reproduce
exactly; for anything else it answers None and pynetdicom's own path runs unchanged:

- encoding: a value that pydicom would warn about or refuse (a UID that is not of digits and
  dots or longer than 64 characters, an AE title or comment that is not printable ASCII or has
  a backslash, a comment of more than 64 characters, an empty string, an unexpected type);
- decoding: an element not in the message's own list, not of group 0000, out of order or
  repeated, of the wrong length for its VR, empty, truncated, multi-valued text, a UID or AE
  that pydicom would warn about, non-ASCII text, trailing bytes, an unknown CommandField. So an
  odd command set keeps every element, warning and error it had (a malformed one still fails in
  ``decode_msg``, where :mod:`anonpipe.scp.decoding` catches it).

**The command set is still a pydicom Dataset, built when someone looks.** The message's
``command_set`` is a :class:`CommandSet`, a ``Dataset`` subclass holding the element values
(the exact values and types pydicom would give: ``UID``, ``int``, ``str``, ``BaseTag``) as plain
attributes, so ``command_set.CommandField`` or ``.AffectedSOPInstanceUID`` (what ``decode_msg``
reads, and what pynetdicom's logging handlers read when ``LOG_HANDLER_LEVEL`` is "standard")
costs an attribute lookup, and ``"MoveOriginatorApplicationEntityTitle" in command_set`` a dict
lookup. Anything else (iterating, indexing, ``_dict``, ``dsutils.encode``, setting a value)
first turns it into the Dataset pynetdicom would have had: pydicom decodes the same bytes.
From then on the Dataset is the truth: such a command set is encoded and turned into a
primitive by pynetdicom's own code, so a handler that changed it changes the message.

**The hook** (:func:`install`, once per process, idempotent; pynetdicom 3.0) touches only what
carries the command set, and keeps every other step of pynetdicom's DIMSE provider (P-DATA
fragments, the chunked data set spooled to a file with its file meta, events, C-CANCEL,
:mod:`anonpipe.scp.decoding`'s guard around ``decode_msg``):

- the names ``encode`` and ``decode`` in ``pynetdicom.dimse_messages``, which that module uses
  for command sets only (``encode_msg``, ``_set_command_group_length``; ``decode_msg``): a
  :class:`CommandSet` not yet turned into a Dataset encodes to its bytes, received bytes decode
  to a :class:`CommandSet` when the codec takes them; everything else goes to ``dsutils``;
- ``__init__``, ``primitive_to_message`` and ``message_to_primitive`` of the message classes in
  :data:`MESSAGES` (``C_STORE_RQ``, ``C_STORE_RSP``...), which inherit them from
  ``DIMSEMessage``: an empty :class:`CommandSet` instead of a Dataset of ``None`` values, the
  bytes encoded once, the primitive set from the values. Each falls back to ``DIMSEMessage``'s.

Wrapping ``DIMSEServiceProvider.send_msg`` / ``receive_primitive`` instead would mean redoing
the provider's work (fragments, spool file, events) beside pynetdicom's. A message type whose
pynetdicom definition (its element list, primitive, data set parameter) differs from our table
is left alone, so a pynetdicom release that changes one degrades to its own path.
``tests/net/test_commandset.py`` checks bytes and primitives against pynetdicom's.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from anonpipe.logs import get_logger

__all__ = [
    "ELEMENTS",
    "MESSAGES",
    "CommandSet",
    "MessageType",
    "decode_command_set",
    "encode_command_set",
    "install",
    "installed",
    "to_primitive",
    "uninstall",
]

log = get_logger(__name__)

#: Command elements (PS3.7 E.1) by keyword: (element number in group 0000, VR).
ELEMENTS: dict[str, tuple[int, str]] = {
    "CommandGroupLength": (0x0000, "UL"),
    "AffectedSOPClassUID": (0x0002, "UI"),
    "CommandField": (0x0100, "US"),
    "MessageID": (0x0110, "US"),
    "MessageIDBeingRespondedTo": (0x0120, "US"),
    "Priority": (0x0700, "US"),
    "CommandDataSetType": (0x0800, "US"),
    "Status": (0x0900, "US"),
    "OffendingElement": (0x0901, "AT"),
    "ErrorComment": (0x0902, "LO"),
    "AffectedSOPInstanceUID": (0x1000, "UI"),
    "NumberOfRemainingSuboperations": (0x1020, "US"),
    "NumberOfCompletedSuboperations": (0x1021, "US"),
    "NumberOfFailedSuboperations": (0x1022, "US"),
    "NumberOfWarningSuboperations": (0x1023, "US"),
    "MoveOriginatorApplicationEntityTitle": (0x1030, "AE"),
    "MoveOriginatorMessageID": (0x1031, "US"),
}

#: Set by the message itself, not taken from the primitive.
_STRUCTURAL = ("CommandGroupLength", "CommandField", "CommandDataSetType")

#: CommandDataSetType: no data set follows (PS3.7 E.1); pynetdicom writes 0x0001 otherwise.
NO_DATA_SET = 0x0101
DATA_SET = 0x0001


@dataclass(frozen=True, slots=True)
class MessageType:
    """One DIMSE message as PS3.7 chapter 9 defines its command set."""

    #: pynetdicom's class name in ``dimse_messages`` (``C_STORE_RQ``).
    name: str
    command_field: int
    #: pynetdicom's primitive class in ``dimse_primitives`` (``C_STORE``).
    primitive: str
    #: The primitive's parameter holding the data set, or None for a message without one.
    data_set: str | None
    #: Elements besides the structural ones (CommandGroupLength, CommandField,
    #: CommandDataSetType), each a parameter of the primitive.
    parameters: tuple[str, ...]

    @property
    def keywords(self) -> frozenset[str]:
        return frozenset((*_STRUCTURAL, *self.parameters))


_RESPONSE = ("AffectedSOPClassUID", "MessageIDBeingRespondedTo", "Status")
_SUBOPERATIONS = (
    "NumberOfRemainingSuboperations",
    "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations",
    "NumberOfWarningSuboperations",
)

#: The messages this codec handles (PS3.7 9.3.1, 9.3.2, 9.3.4, 9.3.5), by CommandField.
MESSAGES: dict[int, MessageType] = {
    m.command_field: m
    for m in (
        MessageType(
            "C_STORE_RQ",
            0x0001,
            "C_STORE",
            "DataSet",
            (
                "AffectedSOPClassUID",
                "MessageID",
                "Priority",
                "AffectedSOPInstanceUID",
                "MoveOriginatorApplicationEntityTitle",
                "MoveOriginatorMessageID",
            ),
        ),
        MessageType(
            "C_STORE_RSP",
            0x8001,
            "C_STORE",
            None,
            (*_RESPONSE, "AffectedSOPInstanceUID", "OffendingElement", "ErrorComment"),
        ),
        MessageType("C_ECHO_RQ", 0x0030, "C_ECHO", None, ("AffectedSOPClassUID", "MessageID")),
        MessageType("C_ECHO_RSP", 0x8030, "C_ECHO", None, (*_RESPONSE, "ErrorComment")),
        MessageType(
            "C_FIND_RSP",
            0x8020,
            "C_FIND",
            "Identifier",
            (*_RESPONSE, "OffendingElement", "ErrorComment"),
        ),
        MessageType(
            "C_MOVE_RSP",
            0x8021,
            "C_MOVE",
            "Identifier",
            (*_RESPONSE, *_SUBOPERATIONS, "OffendingElement", "ErrorComment"),
        ),
    )
}

_BY_NAME: dict[str, MessageType] = {m.name: m for m in MESSAGES.values()}
_BY_ELEMENT: dict[int, tuple[str, str]] = {
    element: (keyword, vr) for keyword, (element, vr) in ELEMENTS.items()
}
#: Tag order of each message's parameters, with the structural elements among them.
_ORDER: dict[str, tuple[str, ...]] = {
    m.name: tuple(sorted(m.keywords - {"CommandGroupLength"}, key=lambda k: ELEMENTS[k][0]))
    for m in MESSAGES.values()
}
_HEADER = struct.Struct("<HHI")
_PREFIX: dict[str, bytes] = {k: struct.pack("<HH", 0, e) for k, (e, _vr) in ELEMENTS.items()}

# What pydicom accepts without a warning (its VR validators), and we therefore take as is.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")
_UID_BYTES = re.compile(rb"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")
#: Printable ASCII without the backslash (the value delimiter): AE and LO text we take.
_TEXT = re.compile(r"[\x20-\x5b\x5d-\x7e]*\Z")
_TEXT_BYTES = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\Z")
_MAX_LENGTH = {"UI": 64, "AE": 16, "LO": 64}


# -- encoding ---------------------------------------------------------------------------------


def _encode_value(vr: str, value: Any) -> bytes | None:
    """A value as pydicom writes it (implicit VR, little endian), or None if we do not take it."""
    if vr == "US" or vr == "UL":
        if not isinstance(value, int):
            return None
        top = 0xFFFF if vr == "US" else 0xFFFFFFFF
        if not 0 <= value <= top:
            return None
        return value.to_bytes(2 if vr == "US" else 4, "little")
    if vr == "AT":
        tags = value if isinstance(value, list) else [value]
        if not tags or not all(isinstance(t, int) and 0 <= t <= 0xFFFFFFFF for t in tags):
            return None
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in tags)
    if not isinstance(value, str) or not value or len(value) > _MAX_LENGTH[vr]:
        return None
    if vr == "UI":
        if _UID.match(value) is None:
            return None
        data = value.encode("ascii")
        return data + b"\0" if len(data) % 2 else data
    if _TEXT.match(value) is None:  # AE, LO
        return None
    data = value.encode("ascii")
    return data + b" " if len(data) % 2 else data


def _data_set_of(message: MessageType, primitive: Any) -> tuple[Any, Any, bool]:
    """(the message's data set, its file path, whether one is sent), as pynetdicom decides."""
    data_set: Any = BytesIO()
    present = False
    if message.data_set is not None:
        data_set = getattr(primitive, message.data_set)
        present = bool(data_set)
    path = getattr(primitive, "_dataset_path", None)
    return data_set, path, present or bool(path)


def encode_command_set(message: MessageType, primitive: Any, *, data_set: bool) -> bytes | None:
    """The command set of *message* for *primitive*, implicit VR little endian, or None.

    Parameters
    ----------
    message : MessageType
        Which message (``MESSAGES[0x0001]`` is a C-STORE-RQ).
    primitive : pynetdicom.dimse_primitives primitive
        Its parameters; those that are None are left out, as pynetdicom does.
    data_set : bool
        Whether a data set follows (CommandDataSetType 0x0001, else 0x0101).

    Returns
    -------
    bytes or None
        CommandGroupLength first, then the elements in tag order; None when a value is one
        pynetdicom's path must handle (see the module docstring).
    """
    parts: list[bytes] = []
    for keyword in _ORDER[message.name]:
        if keyword == "CommandField":
            value: Any = message.command_field
        elif keyword == "CommandDataSetType":
            value = DATA_SET if data_set else NO_DATA_SET
        else:
            value = getattr(primitive, keyword)
            if value is None:
                continue
        encoded = _encode_value(ELEMENTS[keyword][1], value)
        if encoded is None:
            return None
        parts.append(_PREFIX[keyword])
        parts.append(len(encoded).to_bytes(4, "little"))
        parts.append(encoded)
    body = b"".join(parts)
    return b"\0\0\0\0\x04\0\0\0" + len(body).to_bytes(4, "little") + body


# -- decoding ---------------------------------------------------------------------------------


def _decode_value(vr: str, data: bytes) -> Any:
    """The value pydicom would give for *data* (without a warning), or None if we do not take
    it."""
    if vr == "US":
        return data[0] | data[1] << 8 if len(data) == 2 else None
    if vr == "UL":
        return int.from_bytes(data, "little") if len(data) == 4 else None
    if vr == "AT":
        if not data or len(data) % 4:
            return None
        tags = [BaseTag(g << 16 | e) for g, e in struct.iter_unpack("<HH", data)]
        return tags[0] if len(tags) == 1 else MultiValue(Tag, tags)
    if not data:
        return None
    if vr == "UI":
        text = data.rstrip(b"\0 ")
        if len(text) > 64 or _UID_BYTES.match(text) is None:
            return None
        return UID(text.decode("ascii"))
    if vr == "AE":
        if _TEXT_BYTES.match(data) is None:
            return None
        value = data.decode("ascii").strip(" ")
        return value if len(value) <= 16 else None
    # LO: pydicom checks the length before it strips trailing spaces and NULs
    text = data.rstrip(b"\0 ")
    if len(data) > 64 or _TEXT_BYTES.match(text) is None:
        return None
    return text.decode("ascii")


def _parse(data: bytes) -> tuple[MessageType, dict[str, Any]] | None:
    """The message and its element values by keyword (tag order), or None (see module)."""
    values: dict[str, Any] = {}
    end = len(data)
    position = 0
    previous = -1
    while position < end:
        if end - position < 8:
            return None
        group, element, length = _HEADER.unpack_from(data, position)
        position += 8
        known = _BY_ELEMENT.get(element)
        if group or known is None or element <= previous or length > end - position:
            return None
        keyword, vr = known
        value = _decode_value(vr, data[position : position + length])
        if value is None:
            return None
        values[keyword] = value
        position += length
        previous = element
    message = MESSAGES.get(values.get("CommandField", -1))
    if message is None or not message.keywords >= set(values):
        return None
    return message, values


def decode_command_set(data: bytes) -> CommandSet | None:
    """A received command set (implicit VR little endian) as a :class:`CommandSet`, or None
    when pynetdicom's own decoding must handle it (see the module docstring)."""
    parsed = _parse(data)
    if parsed is None:
        return None
    return CommandSet(parsed[0], data, parsed[1])


def to_primitive(command_set: CommandSet) -> Any:
    """A new pynetdicom primitive with *command_set*'s parameters, set as pynetdicom sets them
    (through its setters, in tag order); its data set, context ID and file are the caller's."""
    from pynetdicom import dimse_primitives

    message = command_set.message
    primitive = getattr(dimse_primitives, message.primitive)()
    parameters = message.parameters
    for keyword, value in command_set.element_values().items():
        if keyword in parameters:
            setattr(primitive, keyword, value)
    return primitive


# -- the command set as pynetdicom's messages carry it ----------------------------------------

_MESSAGE = "_commandset_message"
_RAW = "_commandset_raw"
_VALUES = "_commandset_values"


class CommandSet(Dataset):
    """A DIMSE command set: its values as attributes, a pydicom ``Dataset`` on first other use.

    Built by :func:`decode_command_set`, by a message's ``primitive_to_message`` (encoded
    bytes, values read from them on first use) or its ``__init__`` (every element None, as
    pynetdicom's). ``Dataset.__init__`` is deliberately not called: any use of the Dataset's
    own state (``_dict`` and the rest) reaches :meth:`__getattr__`, which makes it then.
    """

    def __init__(
        self, message: MessageType, raw: bytes | None, values: dict[str, Any] | None
    ) -> None:
        state = self.__dict__
        state[_MESSAGE] = message
        state[_RAW] = raw
        state[_VALUES] = values
        if values is not None:
            state.update(values)

    @property
    def message(self) -> MessageType:
        message: MessageType = self.__dict__[_MESSAGE]
        return message

    @property
    def is_dataset(self) -> bool:
        """Whether it was turned into a pydicom Dataset (then pynetdicom's code handles it)."""
        return "_dict" in self.__dict__

    @property
    def encoded(self) -> bytes | None:
        """Its implicit VR little endian bytes while it is ours (not yet a Dataset)."""
        state = self.__dict__
        return None if "_dict" in state else state.get(_RAW)

    def element_values(self) -> dict[str, Any]:
        """Element values by keyword, in tag order (a copy)."""
        if self.is_dataset:
            return {e.keyword: e.value for e in Dataset.__iter__(self)}
        return dict(self._values())

    def _values(self) -> dict[str, Any]:
        state = self.__dict__
        values: dict[str, Any] | None = state[_VALUES]
        if values is None:
            parsed = _parse(state[_RAW]) if state[_RAW] is not None else None
            if parsed is None:  # not ours after all: the Dataset knows
                self._make_dataset()
                return {e.keyword: e.value for e in Dataset.__iter__(self)}
            values = parsed[1]
            state[_VALUES] = values
            state.update(values)
        return values

    def _make_dataset(self) -> None:
        """Become the Dataset pynetdicom would have had (idempotent)."""
        state = self.__dict__
        if "_dict" in state:
            return
        raw: bytes | None = state[_RAW]
        if raw is not None:
            dataset = _pynetdicom_decode(BytesIO(raw), True, True)
        else:
            dataset = blank_dataset(state[_MESSAGE])
        for keyword in state[_VALUES] or ():
            state.pop(keyword, None)
        state.update(dataset.__dict__)

    def __getattr__(self, name: str) -> Any:
        # Only reached when ordinary lookup fails: a keyword this set lacks, or Dataset state.
        state = self.__dict__
        if "_dict" in state or _MESSAGE not in state:
            return super().__getattr__(name)
        if name in ELEMENTS:
            values = self._values()
            if "_dict" not in state:
                if name in values:
                    return values[name]
                raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        self._make_dataset()
        return getattr(self, name)

    def __contains__(self, name: Any) -> bool:
        state = self.__dict__
        if (
            "_dict" not in state
            and _MESSAGE in state
            and isinstance(name, str)
            and name in ELEMENTS
        ):
            values = self._values()
            if "_dict" not in state:
                return name in values
        return super().__contains__(name)


def blank_dataset(message: MessageType) -> Dataset:
    """The command set pynetdicom's message ``__init__`` makes: every element, None."""
    dataset = Dataset()
    for keyword in message.keywords:
        setattr(dataset, keyword, None)
    return dataset


# -- the hook ---------------------------------------------------------------------------------

_lock = threading.Lock()
#: Message class name -> installed (only what passed :func:`_agrees` at install).
_ENABLED: set[str] = set()
#: (class, attribute) pairs set by install, removed by uninstall.
_patched: list[tuple[type, str]] = []
_saved_codec: dict[str, Any] = {}


def _pynetdicom_decode(
    bytestring: BytesIO, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> Dataset:
    from pynetdicom import dsutils

    dataset: Dataset = dsutils.decode(bytestring, is_implicit_vr, is_little_endian, deflated)
    return dataset


def _decode_hook(
    bytestring: BytesIO, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> Dataset:
    """``dimse_messages.decode``: a received command set, ours if the codec takes it."""
    if is_implicit_vr and is_little_endian and not deflated:
        command_set = decode_command_set(bytestring.getvalue())
        if command_set is not None and command_set.message.name in _ENABLED:
            return command_set
    return _pynetdicom_decode(bytestring, is_implicit_vr, is_little_endian, deflated)


def _encode_hook(
    dataset: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> bytes | None:
    """``dimse_messages.encode``: our bytes for a command set still ours, else pydicom's."""
    if isinstance(dataset, CommandSet) and is_implicit_vr and is_little_endian and not deflated:
        encoded = dataset.encoded
        if encoded is not None:
            return encoded
    from pynetdicom import dsutils

    result: bytes | None = dsutils.encode(dataset, is_implicit_vr, is_little_endian, deflated)
    return result


def _methods(base: Any) -> dict[str, Callable[..., Any]]:
    """The three message methods, each falling back to ``DIMSEMessage``'s (*base*)."""

    def __init__(self: Any) -> None:
        message = _BY_NAME[type(self).__name__]
        self.context_id = None
        self.encoded_command_set = BytesIO()
        self.data_set = BytesIO()
        self.command_set = CommandSet(message, None, dict.fromkeys(message.keywords))
        self._data_set_path = None
        self._data_set_file = None

    def primitive_to_message(self: Any, primitive: Any) -> None:
        message = _BY_NAME[type(self).__name__]
        command_set = self.command_set
        if not (
            isinstance(command_set, CommandSet)
            and command_set.encoded is None
            and not command_set.is_dataset
        ):
            base.primitive_to_message(self, primitive)  # a command set someone built or used
            return
        data_set, path, present = _data_set_of(message, primitive)
        raw = encode_command_set(message, primitive, data_set=present)
        if raw is None:
            self.command_set = blank_dataset(message)
            base.primitive_to_message(self, primitive)
            return
        self.data_set = data_set
        self._data_set_path = path
        self.command_set = CommandSet(message, raw, None)

    def message_to_primitive(self: Any) -> Any:
        command_set = self.command_set
        if (
            not isinstance(command_set, CommandSet)
            or command_set.is_dataset
            or command_set.message.name != type(self).__name__
        ):
            return base.message_to_primitive(self)
        primitive = to_primitive(command_set)
        message = command_set.message
        if message.data_set is not None:
            setattr(primitive, message.data_set, self.data_set)
        primitive._context_id = self.context_id
        primitive._dataset_path = self._data_set_path
        primitive._dataset_file = self._data_set_file
        return primitive

    return {
        "__init__": __init__,
        "primitive_to_message": primitive_to_message,
        "message_to_primitive": message_to_primitive,
    }


def _agrees(message: MessageType, dimse_messages: Any, dimse_primitives: Any) -> bool:
    """Whether pynetdicom defines *message* as our table does (else we leave it alone)."""
    try:
        cls = getattr(dimse_messages, message.name)
        listed = dimse_messages._COMMAND_SET_KEYWORDS[message.name.replace("_", "-")]
        registered = dimse_messages._MESSAGE_TYPES[message.command_field][1]
        data_set = dimse_messages._DATASET_KEYWORDS.get(message.name)
        primitive = getattr(dimse_primitives, message.primitive)()
    except (AttributeError, KeyError, TypeError, IndexError):
        return False
    return (
        registered is cls
        and set(listed) == message.keywords
        and len(listed) == len(message.keywords)
        and data_set == message.data_set
        and all(hasattr(primitive, keyword) for keyword in message.parameters)
        and not any(hasattr(primitive, keyword) for keyword in _STRUCTURAL)
        and all(name not in vars(cls) for name in _methods(None))
    )


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return bool(_saved_codec)


def install() -> None:
    """Make pynetdicom's DIMSE provider use this codec for :data:`MESSAGES` (idempotent,
    thread-safe, process-wide; see the module docstring)."""
    from pynetdicom import dimse_messages, dimse_primitives

    with _lock:
        if _saved_codec:
            return
        methods = _methods(dimse_messages.DIMSEMessage)
        skipped = []
        for message in MESSAGES.values():
            if not _agrees(message, dimse_messages, dimse_primitives):
                skipped.append(message.name)
                continue
            cls = getattr(dimse_messages, message.name)
            for name, method in methods.items():
                setattr(cls, name, method)
                _patched.append((cls, name))
            _ENABLED.add(message.name)
        _saved_codec["encode"] = getattr(dimse_messages, "encode")  # noqa: B009
        _saved_codec["decode"] = getattr(dimse_messages, "decode")  # noqa: B009
        setattr(dimse_messages, "encode", _encode_hook)  # noqa: B010
        setattr(dimse_messages, "decode", _decode_hook)  # noqa: B010
    if skipped:
        log.warning(
            "pynetdicom defines these DIMSE messages differently; left to it", skipped=skipped
        )


def uninstall() -> None:
    """Undo :func:`install` (for tests and measurements). Command sets already made stay
    usable: they are Datasets to pynetdicom's own code."""
    from pynetdicom import dimse_messages

    with _lock:
        if not _saved_codec:
            return
        for cls, name in _patched:
            delattr(cls, name)
        _patched.clear()
        _ENABLED.clear()
        setattr(dimse_messages, "encode", _saved_codec.pop("encode"))  # noqa: B010
        setattr(dimse_messages, "decode", _saved_codec.pop("decode"))  # noqa: B010
