"""Seeded byte-level mutants of generated studies: hostile inputs for the engine.

:func:`mutate` derives ``count`` files from the files of a :class:`~tests.harness.studygen.Manifest`
(Explicit VR LE, Implicit VR LE and RLE Lossless, whose data set is Explicit VR LE), one mutation
each, chosen round-robin from :data:`KINDS` so every kind gets an equal share. The same manifest and
seed give the same bytes.

Every mutant first gets a SOP Instance UID of its own (same length as the original, in the data set
and the file meta), so mutants of one source never collide on output paths and each clean output
can be traced back to its mutant; that UID is an identifier too (:attr:`Mutant.sop_instance_uid`),
it must not survive de-identification.

The mutations work on bytes with a tiny walker over the top-level elements of Little Endian files
(:func:`walk`), which also skips undefined-length sequences and encapsulated pixel data. Values
written by a mutation that are identifying are the source patient's planted ID, name and address,
so :meth:`Manifest.find_planted` finds them if they survive. Mutant notes name tags and offsets,
never values.
"""

from __future__ import annotations

import functools
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, get_entry, keyword_dict
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from tests.harness.studygen import Manifest

__all__ = [
    "DEEP_NESTING_KINDS",
    "KINDS",
    "UNKNOWN_PUBLIC_KINDS",
    "Element",
    "Kind",
    "Mutant",
    "mutate",
    "walk",
]

#: 128-byte preamble and "DICM": never mutated.
PREAMBLE = 132
#: Bit flips land in the first bytes this often (the header area, where parsers decide).
_HEADER_AREA = 4096
_HEADER_BIAS = 0.75

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_FIRST_PIXEL_TAG = 0x7FE00008

#: VRs with a 2-byte length after the VR, and those with 2 reserved bytes and a 4-byte length.
_SHORT = "AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US"
_LONG = "OB OD OF OL OV OW SQ SV UC UN UR UT UV"
SHORT_VRS: tuple[bytes, ...] = tuple(_SHORT.encode().split(b" "))
LONG_VRS: tuple[bytes, ...] = tuple(_LONG.encode().split(b" "))
_VALID_VRS = frozenset(SHORT_VRS + LONG_VRS)

#: Syntaxes whose data set is Explicit VR Little Endian (RLE: encapsulated pixels).
_EXPLICIT_LE = frozenset({ExplicitVRLittleEndian, RLELossless})
_IMPLICIT_LE = frozenset({ImplicitVRLittleEndian})

#: Elements a tag change prefers half of the time: where identity lives.
IDENTIFYING_TAGS: tuple[int, ...] = (
    0x00100020,  # Patient ID
    0x00100010,  # Patient's Name
    0x00101040,  # Patient's Address
    0x00102154,  # Patient's Telephone Numbers
    0x00200010,  # Study ID
    0x00080080,  # Institution Name
    0x00080050,  # Accession Number
    0x00081010,  # Station Name
    0x00104000,  # Patient Comments
    0x001021B0,  # Additional Patient History
    0x00204000,  # Image Comments
)
#: US elements of the Image Pixel module that get text in :func:`_text_in_binary`.
_US_TAGS = (0x00280002, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102, 0x00280103)
#: Public groups in which unknown public tags are drawn.
_PUBLIC_GROUPS = (0x0008, 0x0010, 0x0014, 0x0018, 0x0020, 0x0028, 0x0032, 0x0038, 0x0040)
_REQUEST_ATTRIBUTES_SEQUENCE = 0x00400275
_CONTENT_SEQUENCE = 0x0040A730
_PERSON_NAME = 0x0040A123
_TOO_LONG = 200


# ---------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Mutant:
    """One mutant file.

    Attributes
    ----------
    path : Path
        The mutant (``<index>-<kind>.dcm`` in the output folder).
    kind : str
        Name of its entry in :data:`KINDS`.
    source : Path
        The generated file it was derived from.
    sop_instance_uid : str
        The SOP Instance UID given to this mutant (unless the mutation itself hit it).
    note : str
        What the mutation did: tags and offsets, never values.
    """

    path: Path
    kind: str
    source: Path
    sop_instance_uid: str = ""
    note: str = ""


@dataclass(frozen=True, slots=True)
class Element:
    """A top-level data element: tag, VR (``b""`` if implicit) and its byte span."""

    tag: int
    vr: bytes
    start: int
    header: int
    length: int
    end: int

    @property
    def value_start(self) -> int:
        """Offset of the first value byte."""
        return self.start + self.header


@dataclass(frozen=True)
class _Source:
    """A generated file, walked once; the patient's planted identity."""

    path: Path
    data: bytes
    explicit: bool
    meta: tuple[Element, ...]
    elements: tuple[Element, ...]
    patient_id: str
    patient_name: str
    address: str

    @property
    def meta_end(self) -> int:
        return self.meta[-1].end

    @property
    def pixel(self) -> Element | None:
        return next((e for e in self.elements if e.tag == _PIXEL_DATA), None)

    @property
    def tags(self) -> frozenset[int]:
        return frozenset(e.tag for e in self.elements)

    def element(self, tag: int) -> Element | None:
        return next((e for e in self.elements if e.tag == tag), None)

    def vr_of(self, element: Element) -> str | None:
        """The element's VR: as written (explicit) or from the dictionary (implicit)."""
        if self.explicit:
            return element.vr.decode("latin-1")
        try:
            return dictionary_VR(element.tag)
        except KeyError:
            return None


Result = tuple[bytes, str] | None
Mutation = Callable[[random.Random, _Source, bytes], Result]


@dataclass(frozen=True)
class Kind:
    """One kind of mutation: a function of (rng, source, bytes) -> (mutant bytes, note) or None
    when the source offers nothing to mutate; `explicit_only` kinds get Explicit VR LE sources."""

    name: str
    mutate: Mutation
    explicit_only: bool = False


# ---------------------------------------------------------------------------------- walker


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _u16(data: bytes, pos: int) -> int:
    return int(struct.unpack_from("<H", data, pos)[0])


def _u32(data: bytes, pos: int) -> int:
    return int(struct.unpack_from("<L", data, pos)[0])


def _tag_at(data: bytes, pos: int) -> int:
    return _u16(data, pos) << 16 | _u16(data, pos + 2)


def element_at(data: bytes, pos: int, explicit: bool) -> Element:
    """The element whose header starts at `pos` (Little Endian), its end past any delimiter."""
    if pos + 8 > len(data):
        raise ValueError(f"element header at offset {pos} is cut off")
    tag = _tag_at(data, pos)
    vr = b""
    if explicit:
        vr = data[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            header, length = 12, _u32(data, pos + 8)
        else:
            header, length = 8, _u16(data, pos + 6)
    else:
        header, length = 8, _u32(data, pos + 4)
    if length == _UNDEFINED:
        # an undefined-length UN holds Implicit VR LE items (PS3.5 6.2.2)
        end = _skip_items(data, pos + header, explicit and vr != b"UN")
    else:
        end = pos + header + length
    if end > len(data):
        raise ValueError(f"element {_tag_text(tag)} at offset {pos} runs past the end")
    return Element(tag, vr, pos, header, length, end)


def _skip_items(data: bytes, pos: int, explicit: bool) -> int:
    """Skip items (data sets or fragments) up to and past the sequence delimiter."""
    while True:
        tag, length = _tag_at(data, pos), _u32(data, pos + 4)
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise ValueError(f"expected an item at offset {pos - 8}, got {_tag_text(tag)}")
        if length != _UNDEFINED:
            pos += length
            continue
        while _tag_at(data, pos) != _ITEM_END:
            pos = element_at(data, pos, explicit).end
        pos += 8


def walk(
    data: bytes, pos: int, explicit: bool, while_: Callable[[int], bool] = lambda _tag: True
) -> list[Element]:
    """The top-level elements from `pos` to the end of `data` or the first tag `while_` refuses."""
    elements: list[Element] = []
    while pos < len(data) and while_(_tag_at(data, pos)):
        element = element_at(data, pos, explicit)
        elements.append(element)
        pos = element.end
    return elements


def _load(path: Path) -> _Source:
    data = path.read_bytes()
    if data[128:PREAMBLE] != b"DICM":
        raise ValueError(f"{path}: no DICM prefix")
    meta = walk(data, PREAMBLE, True, lambda tag: tag >> 16 == 0x0002)
    syntax_element = next(e for e in meta if e.tag == 0x00020010)
    syntax = data[syntax_element.value_start : syntax_element.end].rstrip(b"\0 ").decode()
    if syntax not in _EXPLICIT_LE | _IMPLICIT_LE:
        raise ValueError(f"{path}: transfer syntax {syntax} is not supported")
    explicit = syntax in _EXPLICIT_LE
    elements = walk(data, meta[-1].end, explicit)
    ds = dcmread(path, stop_before_pixels=True)
    return _Source(
        path=path,
        data=data,
        explicit=explicit,
        meta=tuple(meta),
        elements=tuple(elements),
        patient_id=str(ds.PatientID),
        patient_name=str(ds.PatientName),
        address=str(ds.PatientAddress),
    )


# ---------------------------------------------------------------------------------- encoding


def _pad(value: bytes, pad: bytes = b" ") -> bytes:
    return value + pad if len(value) % 2 else value


def encode_element(
    tag: int, vr: str, value: bytes, explicit: bool, undefined: bool = False
) -> bytes:
    """One Little Endian element; `undefined` writes length 0xFFFFFFFF (the caller adds the
    sequence delimiter to `value`)."""
    length = _UNDEFINED if undefined else len(value)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<L", length) + value
    if vr.encode() in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack("<L", length) + value
    if undefined:
        raise ValueError(f"VR {vr} cannot have an undefined length")
    return head + vr.encode() + struct.pack("<H", length) + value


def encode_sequence(tag: int, items: Sequence[bytes], explicit: bool, undefined: bool) -> bytes:
    """A sequence of items (each an encoded data set), of defined or undefined length."""
    body = b""
    for item in items:
        if undefined:
            body += struct.pack("<HHL", 0xFFFE, 0xE000, _UNDEFINED) + item
            body += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        else:
            body += struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item
    if undefined:
        body += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return encode_element(tag, "SQ", body, explicit, undefined)


def _text(tag: int, vr: str, value: str, explicit: bool) -> bytes:
    return encode_element(tag, vr, _pad(value.encode("latin-1")), explicit)


def _replace(data: bytes, element: Element, new: bytes) -> bytes:
    return data[: element.start] + new + data[element.end :]


def _insert(source: _Source, data: bytes, tag: int, new: bytes) -> bytes:
    """Insert `new` (one element with `tag`) at its place in tag order."""
    position = next((e.start for e in source.elements if e.tag > tag), len(data))
    return data[:position] + new + data[position:]


# ---------------------------------------------------------------------------------- tags


def _unknown_public_tag(rng: random.Random, taken: frozenset[int]) -> int:
    """A public tag (even group, in a group the standard uses) that pydicom does not define."""
    while True:
        tag = rng.choice(_PUBLIC_GROUPS) << 16 | rng.randrange(0x0001, 0x10000)
        if tag in taken:
            continue
        try:
            get_entry(tag)  # repeating groups included
        except KeyError:
            return tag


@functools.cache
def _defined_public_tags() -> tuple[int, ...]:
    return tuple(
        sorted(
            tag
            for tag in keyword_dict.values()
            if tag >> 16 not in (0x0000, 0x0002, 0xFFFE)
            and tag & 0xFFFF
            and not tag >> 16 & 1
            and tag < _FIRST_PIXEL_TAG
        )
    )


def _defined_public_tag(rng: random.Random, taken: frozenset[int]) -> int:
    while True:
        tag = rng.choice(_defined_public_tags())
        if tag not in taken:
            return tag


def _private_tag(rng: random.Random, taken: frozenset[int]) -> int:
    """An odd-group tag: a creator slot (gggg,00xx) or a data element without its creator."""
    while True:
        group = rng.randrange(0x0009, 0x7FE0) | 1
        element = (
            rng.randrange(0x10, 0x100) if rng.random() < 0.3 else rng.randrange(0x1000, 0x10000)
        )
        tag = group << 16 | element
        if tag not in taken:
            return tag


# ---------------------------------------------------------------------------------- mutations


def _bit_flip(rng: random.Random, source: _Source, data: bytes) -> Result:
    buf = bytearray(data)
    header_end = min(len(buf), _HEADER_AREA)
    flipped = []
    for _ in range(rng.randint(1, 8)):
        if rng.random() < _HEADER_BIAS:
            pos = rng.randrange(PREAMBLE, header_end)
        else:
            pos = rng.randrange(PREAMBLE, len(buf))
        bit = rng.randrange(8)
        buf[pos] ^= 1 << bit
        flipped.append(f"{pos}.{bit}")
    return bytes(buf), "bits flipped at " + " ".join(flipped)


def _truncate_header(rng: random.Random, source: _Source, data: bytes) -> Result:
    pixel = source.pixel
    end = pixel.start if pixel is not None else len(data)
    cut = rng.randrange(PREAMBLE, end)
    return data[:cut], f"cut at {cut} of {len(data)} (pixel data at {end})"


def _truncate_pixels(rng: random.Random, source: _Source, data: bytes) -> Result:
    pixel = source.pixel
    if pixel is None:
        return None
    cut = rng.randrange(pixel.start + 1, len(data))
    return data[:cut], f"cut at {cut} of {len(data)} (pixel data at {pixel.start})"


def _vr_same_layout(rng: random.Random, source: _Source, data: bytes) -> Result:
    element = rng.choice(source.elements)
    layout = LONG_VRS if element.vr in LONG_VRS else SHORT_VRS
    vr = rng.choice([v for v in layout if v != element.vr])
    new = data[: element.start + 4] + vr + data[element.start + 6 :]
    return new, f"{_tag_text(element.tag)} VR {element.vr.decode()} -> {vr.decode()}"


def _vr_invalid(rng: random.Random, source: _Source, data: bytes) -> Result:
    element = rng.choice(source.elements)
    while True:
        if rng.random() < 0.5:
            vr = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2))
        else:
            vr = bytes(rng.randrange(256) for _ in range(2))
        if vr not in _VALID_VRS:
            break
    new = data[: element.start + 4] + vr + data[element.start + 6 :]
    return new, f"{_tag_text(element.tag)} VR {element.vr.decode()} -> {vr!r}"


def _tag_change(
    rng: random.Random,
    source: _Source,
    data: bytes,
    target: Callable[[random.Random, frozenset[int]], int],
) -> Result:
    """Give an element another tag and move it to its place in tag order."""
    candidates = [e for e in source.elements if e.tag < _FIRST_PIXEL_TAG]
    identifying = [e for e in candidates if e.tag in IDENTIFYING_TAGS]
    element = rng.choice(identifying if identifying and rng.random() < 0.5 else candidates)
    tag = target(rng, source.tags)
    renamed = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + data[element.start + 4 : element.end]
    parts = [
        (tag, renamed) if e is element else (e.tag, data[e.start : e.end]) for e in source.elements
    ]
    body = b"".join(raw for _, raw in sorted(parts, key=lambda part: part[0]))
    return data[: source.meta_end] + body, f"{_tag_text(element.tag)} -> {_tag_text(tag)}"


def _value_too_long(rng: random.Random, source: _Source, data: bytes) -> Result:
    """A 200-character value (holding the patient's ID) in an SH, LO or CS element."""
    candidates = [e for e in source.elements if source.vr_of(e) in ("SH", "LO", "CS")]
    if not candidates:
        return None
    element = rng.choice(candidates)
    vr = source.vr_of(element)
    assert vr is not None
    original = data[element.value_start : element.end].decode("latin-1").strip("\0 ")
    value = f"{original} {source.patient_id} ".ljust(_TOO_LONG, "X")[:_TOO_LONG]
    new = _text(element.tag, vr, value, source.explicit)
    return _replace(data, element, new), f"{_tag_text(element.tag)} {vr}: {_TOO_LONG} chars"


def _text_in_binary(rng: random.Random, source: _Source, data: bytes) -> Result:
    """The patient's name (odd length) as the value of a US element."""
    candidates = [e for e in source.elements if e.tag in _US_TAGS]
    if not candidates:
        return None
    element = rng.choice(candidates)
    value = source.patient_name.encode("latin-1")
    if len(value) % 2 == 0:
        value += b"X"
    new = encode_element(element.tag, "US", value, source.explicit)
    return _replace(data, element, new), f"{_tag_text(element.tag)} US: {len(value)} text bytes"


def _deep_nesting(rng: random.Random, source: _Source, data: bytes, undefined: bool) -> Result:
    """Request Attributes Sequence > Content Sequence > ... 200-300 levels, the patient's ID
    and name in the deepest item."""
    depth = rng.randint(200, 300)
    explicit = source.explicit
    content = _text(0x00100020, "LO", source.patient_id, explicit)
    content += _text(_PERSON_NAME, "PN", source.patient_name, explicit)
    for level in range(depth - 1, -1, -1):
        tag = _REQUEST_ATTRIBUTES_SEQUENCE if level == 0 else _CONTENT_SEQUENCE
        content = encode_sequence(tag, [content], explicit, undefined)
    existing = source.element(_REQUEST_ATTRIBUTES_SEQUENCE)
    if existing is not None:
        data = _replace(data, existing, content)
    else:
        data = _insert(source, data, _REQUEST_ATTRIBUTES_SEQUENCE, content)
    layout = "undefined" if undefined else "defined"
    return data, f"{_tag_text(_REQUEST_ATTRIBUTES_SEQUENCE)} {depth} levels, {layout} lengths"


def _unknown_public_element(rng: random.Random, source: _Source, data: bytes) -> Result:
    """An unknown public LO element holding the patient's ID; the file is otherwise valid."""
    tag = _unknown_public_tag(rng, source.tags)
    new = _text(tag, "LO", source.patient_id, source.explicit)
    return _insert(source, data, tag, new), f"{_tag_text(tag)} LO: the Patient ID"


def _unknown_public_sequence(rng: random.Random, source: _Source, data: bytes) -> Result:
    """An unknown public SQ whose item holds the patient's name and address (Patient's Name,
    Patient's Address and an unknown public LO); the file is otherwise valid."""
    tag = _unknown_public_tag(rng, source.tags)
    inner = _unknown_public_tag(rng, frozenset({0x00100010, 0x00101040}))
    explicit = source.explicit
    fields = [
        (0x00100010, _text(0x00100010, "PN", source.patient_name, explicit)),
        (0x00101040, _text(0x00101040, "LO", source.address, explicit)),
        (inner, _text(inner, "LO", source.address, explicit)),
    ]
    item = b"".join(raw for _, raw in sorted(fields))
    undefined = rng.random() < 0.5
    new = encode_sequence(tag, [item], explicit, undefined)
    layout = "undefined" if undefined else "defined"
    note = f"{_tag_text(tag)} SQ ({layout} length) > item with (0010,0010), (0010,1040), "
    return _insert(source, data, tag, new), note + f"{_tag_text(inner)} LO"


#: Every kind of mutation, in the round-robin order of :func:`mutate`.
KINDS: tuple[Kind, ...] = (
    Kind("bit_flip", _bit_flip),
    Kind("truncate_header", _truncate_header),
    Kind("truncate_pixels", _truncate_pixels),
    Kind("vr_same_layout", _vr_same_layout, explicit_only=True),
    Kind("vr_invalid", _vr_invalid, explicit_only=True),
    Kind(
        "tag_unknown_public",
        functools.partial(_tag_change, target=_unknown_public_tag),
        explicit_only=True,
    ),
    Kind(
        "tag_defined_public",
        functools.partial(_tag_change, target=_defined_public_tag),
        explicit_only=True,
    ),
    Kind("tag_private", functools.partial(_tag_change, target=_private_tag), explicit_only=True),
    Kind("value_too_long", _value_too_long),
    Kind("text_in_binary", _text_in_binary),
    Kind("deep_nesting_defined", functools.partial(_deep_nesting, undefined=False)),
    Kind("deep_nesting_undefined", functools.partial(_deep_nesting, undefined=True)),
    Kind("unknown_public_element", _unknown_public_element, explicit_only=True),
    Kind("unknown_public_sequence", _unknown_public_sequence, explicit_only=True),
)
#: Valid files with planted identifiers in public elements the standard does not define.
UNKNOWN_PUBLIC_KINDS = ("unknown_public_element", "unknown_public_sequence")
#: Sequences nested 200-300 levels deep.
DEEP_NESTING_KINDS = ("deep_nesting_defined", "deep_nesting_undefined")


# ---------------------------------------------------------------------------------- mutate


def _fresh_uid(rng: random.Random, length: int, used: set[str]) -> str:
    while True:
        digits = str(rng.randrange(1, 10)) + "".join(
            str(rng.randrange(10)) for _ in range(length - 6)
        )
        uid = "2.25." + digits
        if uid not in used:
            used.add(uid)
            return uid


def _with_uid(source: _Source, uid: str) -> bytes:
    """`source` with `uid` as its SOP Instance UID (data set and file meta), same length."""
    buf = bytearray(source.data)
    for element in (
        source.element(0x00080018),
        next(e for e in source.meta if e.tag == 0x00020003),
    ):
        assert element is not None
        buf[element.value_start : element.value_start + len(uid)] = uid.encode("ascii")
    return bytes(buf)


def _uid_length(source: _Source) -> int:
    element = source.element(0x00080018)
    if element is None:
        raise ValueError(f"{source.path}: no SOP Instance UID")
    return len(source.data[element.value_start : element.end].rstrip(b"\0 "))


def mutate(manifest: Manifest, out_dir: Path, count: int, seed: int) -> list[Mutant]:
    """Write `count` mutants of the manifest's files to `out_dir`; deterministic for `seed`.

    Kinds take turns (:data:`KINDS`), so each gets ``count / len(KINDS)`` mutants; each mutant's
    source is drawn from the files the kind applies to.

    Raises
    ------
    ValueError
        If a kind has no file to work on (e.g. no Explicit VR LE file in the manifest), or a
        file is not one :func:`~tests.harness.studygen.generate` writes.
    """
    rng = random.Random(seed)
    sources = [_load(path) for path in manifest.paths]
    explicit = [s for s in sources if s.explicit]
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    mutants: list[Mutant] = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        pool = explicit if kind.explicit_only else sources
        if not pool:
            raise ValueError(f"mutation {kind.name}: no Explicit VR Little Endian file to mutate")
        for _attempt in range(32):
            source = rng.choice(pool)
            uid = _fresh_uid(rng, _uid_length(source), used)
            result = kind.mutate(rng, source, _with_uid(source, uid))
            if result is not None:
                break
        else:
            raise ValueError(f"mutation {kind.name}: no file offers anything to mutate")
        data, note = result
        path = out_dir / f"{index:04d}-{kind.name}.dcm"
        path.write_bytes(data)
        mutants.append(Mutant(path, kind.name, source.path, uid, note))
    return mutants
