"""Hypothesis fuzz of the de-identification engine with byte-level mutants of generated files.

What is fuzzed: :func:`anonpipe.anon.deidentify.deidentify_file`, with one
:class:`~anonpipe.anon.batch.Engine` for the module (Clean Descriptors, dates shifted, CT and MR
allowed). Each example takes one file of a small generated study
(:func:`tests.harness.studygen.generate`: Explicit VR LE, Implicit VR LE and RLE Lossless, every
identifier planted) and applies 1-3 byte-level operations, each to the result of the previous one:

- a bit flip after the DICM prefix (the header area, before the pixel data, three times in four);
- a truncation;
- an element's or item's length field (meta, data set, nested) overwritten with a random 16- or
  32-bit value (0, 0xFFFF and 0xFFFFFFFF included);
- a VR changed to another valid or an invalid 2-byte code (any element with an explicit VR);
- an undefined length (0xFFFFFFFF) on a defined-length sequence or item, without delimiters;
- a sequence nested 200 deep (Request Attributes Sequence > Content Sequence > ...; defined or
  undefined lengths), the patient's ID and name in its deepest item;
- a wrong Transfer Syntax UID in the file meta: implicit, explicit, big endian, deflated or an
  unknown 1.2.3.4, padded into the old value (lengths fixed when it is longer).

Invariants, for every example: the call returns (never raises, and within the 10 s deadline);
the status is ``clean`` (the output exists in the clean folder, is the only file there, and
holds no planted identifier or UID: :meth:`~tests.harness.studygen.Manifest.find_planted`),
``quarantined`` (the quarantine copy holds the input's bytes, its .json has a non-empty reason,
and neither the record nor reason/detail holds a planted identifier; nothing in the clean folder)
or ``duplicate``; never ``error``; the input file is untouched; no file appears or disappears
anywhere else in the module's temporary tree. A failing mutant is saved under the module's
temporary folder (``failures/``), named in the failure message.

A known limit of a value-blind gate: a bit flip in a *tag* can rename an identifying element to
another public element the dictionary defines with the same VR, which the rules may keep
verbatim. Such a failure is reported as that limit; the invariant stays as it is.

The default run is short and seeded (``derandomize``). A long campaign::

    ANONPIPE_FUZZ_EXAMPLES=10000 .venv/bin/pytest tests/fuzz -p no:cacheprovider

and another one: ``ANONPIPE_FUZZ_SEED=N`` (then Hypothesis draws from seed N).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, note, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from anonpipe.anon.batch import Engine, EngineSpec
from anonpipe.anon.deidentify import Outcome, deidentify_file
from tests.harness.leakcheck import describe_holders
from tests.harness.mutants import (
    LONG_VRS,
    PREAMBLE,
    SHORT_VRS,
    element_at,
    encode_element,
    encode_sequence,
)
from tests.harness.studygen import Manifest, generate

# ---------------------------------------------------------------------------------- settings

#: Examples per run; ANONPIPE_FUZZ_EXAMPLES=10000 for a campaign.
EXAMPLES = int(os.environ.get("ANONPIPE_FUZZ_EXAMPLES", "150"))
#: None: derandomized (the same examples every run); ANONPIPE_FUZZ_SEED=N: another campaign.
_SEED = os.environ.get("ANONPIPE_FUZZ_SEED", "").strip()
SEED = int(_SEED) if _SEED else None
STUDY_SEED = 20260711

# A campaign gets a timeout scaled by its example count; the default run keeps the suite's.
pytestmark = (
    [pytest.mark.timeout(max(300, 2 * EXAMPLES))] if "ANONPIPE_FUZZ_EXAMPLES" in os.environ else []
)

_T = TypeVar("_T")


def _campaign(test: Callable[..., _T]) -> Callable[..., _T]:
    """The module's Hypothesis settings, and the seed of ANONPIPE_FUZZ_SEED when set."""
    configured = settings(
        max_examples=EXAMPLES,
        deadline=timedelta(seconds=10),
        derandomize=SEED is None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(test)
    return configured if SEED is None else hypothesis_seed(SEED)(configured)


# ---------------------------------------------------------------------------------- layout

_ITEM = 0xFFFEE000
_ITEM_BYTES = b"\xfe\xff\x00\xe0"
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_GROUP_LENGTH = 0x00020000
_TRANSFER_SYNTAX = 0x00020010
_REQUEST_ATTRIBUTES_SEQUENCE = 0x00400275
_CONTENT_SEQUENCE = 0x0040A730
_PERSON_NAME = 0x0040A123
_PATIENT_ID = 0x00100020
#: Bit flips land before the pixel data (or in the first 4 KiB) three times in four.
_HEADER_AREA = 4096
#: Sequences below this depth are not listed (the generated files go two deep).
_MAX_DEPTH = 8
DEEP_NESTING = 200


def _u16(data: bytes, pos: int) -> int:
    return int(struct.unpack_from("<H", data, pos)[0])


def _u32(data: bytes, pos: int) -> int:
    return int(struct.unpack_from("<L", data, pos)[0])


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True, slots=True)
class Header:
    """An element or item header in the bytes: where its VR and length field are."""

    tag: int
    start: int
    end: int
    value_start: int
    length_at: int
    length_size: int
    depth: int
    has_vr: bool
    sequence: bool = False
    item: bool = False
    defined: bool = True


@dataclass
class Layout:
    """What a tolerant walk found: meta elements, data set elements and items at every depth
    (down to :data:`_MAX_DEPTH`) and where the top-level walk stopped."""

    meta: list[Header] = field(default_factory=list)
    body: list[Header] = field(default_factory=list)
    body_end: int = PREAMBLE

    @property
    def top(self) -> list[Header]:
        return [h for h in self.body if h.depth == 0 and not h.item]

    @property
    def all(self) -> list[Header]:
        return self.meta + self.body


def _collect(
    data: bytes,
    pos: int,
    end: int,
    explicit: bool,
    depth: int,
    out: list[Header],
    stop: Callable[[int], bool] = lambda _tag: False,
) -> int:
    """Element headers from `pos` to `end` (nested ones too); stops quietly where the bytes stop
    making sense. Returns the offset reached."""
    while pos + 8 <= end:
        tag = _u16(data, pos) << 16 | _u16(data, pos + 2)
        if stop(tag):
            break
        try:
            element = element_at(data, pos, explicit)
        except (ValueError, struct.error, RecursionError):
            break
        if element.end > end:
            break
        if element.header == 12:
            length_at, size = pos + 8, 4
        elif explicit:
            length_at, size = pos + 6, 2
        else:
            length_at, size = pos + 4, 4
        defined = element.length != _UNDEFINED
        holds_items = (
            defined
            and element.vr in (b"SQ", b"")
            and data[element.value_start : element.value_start + 4] == _ITEM_BYTES
        )
        out.append(
            Header(
                tag,
                pos,
                element.end,
                element.value_start,
                length_at,
                size,
                depth,
                has_vr=explicit,
                sequence=holds_items,
                defined=defined,
            )
        )
        if holds_items and depth < _MAX_DEPTH:
            _collect_items(data, element.value_start, element.end, explicit, depth + 1, out)
        pos = element.end
    return pos


def _collect_items(
    data: bytes, pos: int, end: int, explicit: bool, depth: int, out: list[Header]
) -> None:
    while pos + 8 <= end and data[pos : pos + 4] == _ITEM_BYTES:
        length = _u32(data, pos + 4)
        if length == _UNDEFINED or pos + 8 + length > end:
            return
        value_end = pos + 8 + length
        out.append(Header(_ITEM, pos, value_end, pos + 8, pos + 4, 4, depth, False, item=True))
        _collect(data, pos + 8, value_end, explicit, depth, out)
        pos = value_end


def scan(data: bytes, explicit: bool) -> Layout:
    """The layout of `data`, whose data set is explicit or implicit VR Little Endian."""
    layout = Layout()
    if len(data) < PREAMBLE + 8:
        return layout
    meta_end = _collect(
        data, PREAMBLE, len(data), True, 0, layout.meta, stop=lambda tag: tag >> 16 != 0x0002
    )
    layout.body_end = _collect(data, meta_end, len(data), explicit, 0, layout.body)
    return layout


# ---------------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Source:
    """A generated file and the identity planted in it."""

    path: Path
    data: bytes = field(repr=False)
    explicit: bool
    patient_id: str = field(repr=False)
    patient_name: str = field(repr=False)


def _pad(value: bytes, pad: bytes = b" ") -> bytes:
    return value + pad if len(value) % 2 else value


@dataclass(frozen=True)
class BitFlip:
    offset: int
    header_area: bool
    bit: int

    def apply(self, data: bytes, source: Source) -> tuple[bytes, str]:
        end = len(data)
        if self.header_area:
            pixel = next((h for h in scan(data, source.explicit).top if h.tag == _PIXEL_DATA), None)
            end = pixel.start if pixel is not None else min(end, _HEADER_AREA)
        if end <= PREAMBLE:
            return data, "bit flip: no byte after the prefix"
        pos = PREAMBLE + self.offset % (end - PREAMBLE)
        buf = bytearray(data)
        buf[pos] ^= 1 << self.bit
        return bytes(buf), f"bit {self.bit} flipped at offset {pos}"


@dataclass(frozen=True)
class Truncate:
    offset: int

    def apply(self, data: bytes, source: Source) -> tuple[bytes, str]:
        if len(data) <= PREAMBLE:
            return data, "truncation: nothing after the prefix"
        cut = PREAMBLE + self.offset % (len(data) - PREAMBLE)
        return data[:cut], f"cut at {cut} of {len(data)}"


@dataclass(frozen=True)
class LengthField:
    index: int
    value: int

    def apply(self, data: bytes, source: Source) -> tuple[bytes, str]:
        candidates = scan(data, source.explicit).all
        if not candidates:
            return data, "length: no element header found"
        h = candidates[self.index % len(candidates)]
        if h.length_size == 2:
            value, packed = self.value & 0xFFFF, struct.pack("<H", self.value & 0xFFFF)
        else:
            value, packed = self.value, struct.pack("<L", self.value)
        new = data[: h.length_at] + packed + data[h.length_at + h.length_size :]
        what = "item" if h.item else _tag_text(h.tag)
        return new, f"length of {what} at offset {h.start} -> 0x{value:X}"


@dataclass(frozen=True)
class VrChange:
    index: int
    vr: bytes

    def apply(self, data: bytes, source: Source) -> tuple[bytes, str]:
        candidates = [h for h in scan(data, source.explicit).all if h.has_vr]
        if not candidates:
            return data, "VR change: no element with an explicit VR found"
        h = candidates[self.index % len(candidates)]
        new = data[: h.start + 4] + self.vr + data[h.start + 6 :]
        old = data[h.start + 4 : h.start + 6]
        return new, f"VR of {_tag_text(h.tag)} at offset {h.start}: {old!r} -> {self.vr!r}"


@dataclass(frozen=True)
class UndefinedLength:
    index: int

    def apply(self, data: bytes, source: Source) -> tuple[bytes, str]:
        candidates = [
            h
            for h in scan(data, source.explicit).body
            if h.defined and (h.sequence or h.item) and h.length_size == 4
        ]
        if not candidates:
            return data, "undefined length: no defined-length sequence or item found"
        h = candidates[self.index % len(candidates)]
        new = data[: h.length_at] + struct.pack("<L", _UNDEFINED) + data[h.length_at + 4 :]
        what = "item" if h.item else f"sequence {_tag_text(h.tag)}"
        return new, f"undefined length on the {what} at offset {h.start} (depth {h.depth})"


@dataclass(frozen=True)
class DeepNesting:
    undefined: bool

    def apply(self, data: bytes, source: Source) -> tuple[bytes, str]:
        explicit = source.explicit
        content = encode_element(
            _PATIENT_ID, "LO", _pad(source.patient_id.encode("latin-1")), explicit
        )
        content += encode_element(
            _PERSON_NAME, "PN", _pad(source.patient_name.encode("latin-1")), explicit
        )
        for level in range(DEEP_NESTING - 1, -1, -1):
            tag = _REQUEST_ATTRIBUTES_SEQUENCE if level == 0 else _CONTENT_SEQUENCE
            content = encode_sequence(tag, [content], explicit, self.undefined)
        layout = scan(data, explicit)
        existing = next((h for h in layout.top if h.tag == _REQUEST_ATTRIBUTES_SEQUENCE), None)
        if existing is not None:
            new = data[: existing.start] + content + data[existing.end :]
            where = existing.start
        else:
            after = (h.start for h in layout.top if h.tag > _REQUEST_ATTRIBUTES_SEQUENCE)
            where = next(after, layout.body_end)
            new = data[:where] + content + data[where:]
        layout_text = "undefined" if self.undefined else "defined"
        return new, f"{DEEP_NESTING} nested sequences ({layout_text} lengths) at offset {where}"


@dataclass(frozen=True)
class WrongSyntax:
    uid: str

    def apply(self, data: bytes, source: Source) -> tuple[bytes, str]:
        meta = scan(data, source.explicit).meta
        h = next((m for m in meta if m.tag == _TRANSFER_SYNTAX), None)
        if h is None:
            return data, "transfer syntax: no (0002,0010) found"
        room = h.end - h.value_start
        value = self.uid.encode("ascii")
        if len(value) <= room:
            new = data[: h.value_start] + value.ljust(room, b"\0") + data[h.end :]
            return new, f"transfer syntax -> {self.uid} (padded into {room} bytes)"
        value = _pad(value, b"\0")
        growth = len(value) - room
        length = struct.pack("<H" if h.length_size == 2 else "<L", len(value))
        new = data[: h.length_at] + length + data[h.length_at + h.length_size : h.value_start]
        new += value + data[h.end :]
        group = next((m for m in meta if m.tag == _GROUP_LENGTH), None)
        if group is not None and group.end - group.value_start == 4 and group.start < h.start:
            total = (_u32(new, group.value_start) + growth) & 0xFFFFFFFF
            new = new[: group.value_start] + struct.pack("<L", total) + new[group.end :]
        return new, f"transfer syntax -> {self.uid} ({growth} bytes longer, lengths fixed)"


Operation = (
    BitFlip | Truncate | LengthField | VrChange | UndefinedLength | DeepNesting | WrongSyntax
)

_SYNTAX_UIDS = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.3.4",  # not a transfer syntax
)
_LENGTHS = st.one_of(
    st.sampled_from((0, 1, 2, 0xFFFF, 0xFFFE, 0x7FFFFFFF, 0xFFFFFFFE, _UNDEFINED)),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
)
_VRS = st.one_of(
    st.sampled_from(sorted(SHORT_VRS + LONG_VRS)),
    st.text(string.ascii_uppercase, min_size=2, max_size=2).map(str.encode),
    st.binary(min_size=2, max_size=2),
)
_INDEX = st.integers(0, 1 << 16)
OPERATIONS: st.SearchStrategy[Operation] = st.one_of(
    st.builds(
        BitFlip,
        offset=st.integers(0, 1 << 24),
        header_area=st.sampled_from((True, True, True, False)),
        bit=st.integers(0, 7),
    ),
    st.builds(Truncate, offset=st.integers(0, 1 << 24)),
    st.builds(LengthField, index=_INDEX, value=_LENGTHS),
    st.builds(VrChange, index=_INDEX, vr=_VRS),
    st.builds(UndefinedLength, index=_INDEX),
    st.builds(DeepNesting, undefined=st.booleans()),
    st.builds(WrongSyntax, uid=st.sampled_from(_SYNTAX_UIDS)),
)


def mutate(source: Source, operations: list[Operation]) -> tuple[bytes, list[str]]:
    """Apply `operations` in turn; the bytes and one note per operation (offsets, tags)."""
    data, notes = source.data, []
    for operation in operations:
        data, text = operation.apply(data, source)
        notes.append(f"{type(operation).__name__}: {text}")
    return data, notes


# ---------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Corpus:
    """The generated files (with what was planted in them) and the module's folders."""

    root: Path
    manifest: Manifest = field(repr=False)
    sources: tuple[Source, ...] = field(repr=False)

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def failures(self) -> Path:
        return self.root / "failures"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("engine_fuzz")
    # Three series so that the third syntax (RLE Lossless: encapsulated pixels) is used too;
    # syntaxes cycle over the series.
    manifest = generate(
        root / "studies",
        patients=1,
        studies_per_patient=1,
        series_per_study=3,
        instances_per_series=2,
        transfer_syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless),
        seed=STUDY_SEED,
    )
    (patient,) = manifest.patients
    sources = tuple(
        Source(
            path=instance.path,
            data=instance.path.read_bytes(),
            explicit=instance.transfer_syntax_uid != ImplicitVRLittleEndian,
            patient_id=patient.patient_id,
            patient_name=patient.patient_name,
        )
        for instance in manifest.instances
    )
    assert {s.explicit for s in sources} == {True, False}
    assert manifest.transfer_syntaxes == {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        RLELossless,
    }
    for folder in ("work", "store"):
        (root / folder).mkdir()
    return Corpus(root, manifest, sources)


@pytest.fixture(scope="module")
def engine(corpus: Corpus) -> Iterator[Engine]:
    spec = EngineSpec(
        identity_db=corpus.store / "identity.db",
        key=hashlib.sha256(b"anonpipe engine fuzz").digest(),
        options=("clean_descriptors",),
        dates="shift",
        allowed_modalities=("CT", "MR"),
    )
    built = Engine(spec)
    yield built
    built.close()


# ---------------------------------------------------------------------------------- checks


def _files(root: Path) -> set[Path]:
    return {Path(folder, name) for folder, _dirs, names in os.walk(root) for name in names}


def _under(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _problems(
    outcome: Outcome,
    data: bytes,
    mutant: Path,
    clean_dir: Path,
    quarantine_dir: Path,
    new_files: set[Path],
    gone_files: set[Path],
    corpus: Corpus,
) -> list[str]:
    find = corpus.manifest.find_planted
    problems = []
    if mutant.read_bytes() != data:
        problems.append("the input file was changed")
    elsewhere = sorted(
        str(p)
        for p in new_files
        if not (_under(p, clean_dir) or _under(p, quarantine_dir) or _under(p, corpus.store))
    )
    if elsewhere:
        problems.append(f"files written outside the clean and quarantine folders: {elsewhere}")
    gone = sorted(str(p) for p in gone_files if not _under(p, corpus.store))
    if gone:
        problems.append(f"files removed: {gone}")
    in_clean = sorted(p for p in new_files if _under(p, clean_dir))
    in_quarantine = sorted(p for p in new_files if _under(p, quarantine_dir))
    if outcome.status in ("clean", "duplicate"):
        output = outcome.output
        if output is None or not output.is_file() or not _under(output, clean_dir):
            return [*problems, f"{outcome.status} without an output file in the clean folder"]
        if in_clean != [output]:
            problems.append(f"the clean folder holds {in_clean}, not just the output")
        if in_quarantine:
            problems.append(f"{outcome.status}, yet files in quarantine: {in_quarantine}")
        leaked = find(output.read_bytes(), uids=True)
        if leaked:
            problems.append(
                f"planted identifiers in the clean output: {describe_holders(output, leaked)}"
            )
        leaked = find(str(output.relative_to(clean_dir)).encode())
        if leaked:
            problems.append(f"planted identifiers in the output's path: {sorted(leaked)}")
    elif outcome.status == "quarantined":
        copy = outcome.output
        if copy is None or not copy.is_file() or not _under(copy, quarantine_dir):
            return [*problems, "quarantined without a copy in the quarantine folder"]
        if copy.read_bytes() != data:
            problems.append("the quarantine copy differs from the input")
        record_path = copy.with_suffix(".json")
        if not record_path.is_file():
            return [*problems, "no .json record beside the quarantine copy"]
        record_text = record_path.read_text()
        record = json.loads(record_text)
        if not record.get("reason"):
            problems.append(f"the quarantine record has no reason: {record}")
        shown = f"{outcome.reason} {outcome.detail} {record_text}".encode("utf-8", "replace")
        leaked = find(shown, uids=True)
        if leaked:
            problems.append(f"planted identifiers in the quarantine reason/detail: {leaked}")
        if in_clean:
            problems.append(f"quarantined, yet files in the clean folder: {in_clean}")
    else:
        problems.append(
            f"status {outcome.status!r} (reason {outcome.reason!r}, detail {outcome.detail!r})"
        )
    return problems


def _tell(text: str, label: str | None = None) -> None:
    """A Hypothesis note (shown for the failing example) and event (statistics), in a test."""
    if currently_in_test_context():
        note(text)
        if label is not None:
            event(label)


def _run(corpus: Corpus, engine: Engine, data: bytes, notes: list[str]) -> Outcome:
    """One mutant through the engine in a folder of its own; asserts the invariants."""
    work = Path(tempfile.mkdtemp(prefix="ex-", dir=corpus.work))
    try:
        mutant = work / "mutant.dcm"
        mutant.write_bytes(data)
        clean_dir, quarantine_dir = work / "clean", work / "quarantine"
        before = _files(corpus.root)
        try:
            outcome = deidentify_file(
                mutant,
                clean_dir,
                quarantine_dir,
                engine.recipe,
                engine.rules,
                engine.store,
                durable=False,
            )
            after = _files(corpus.root)
            _tell(
                f"outcome: {outcome.status}, {outcome.reason!r}, {outcome.detail!r}",
                f"{outcome.status}: {outcome.reason}",
            )
            problems = _problems(
                outcome,
                data,
                mutant,
                clean_dir,
                quarantine_dir,
                after - before,
                before - after,
                corpus,
            )
            assert not problems, "\n".join(problems)
        except BaseException:
            corpus.failures.mkdir(exist_ok=True)
            saved = corpus.failures / f"{hashlib.sha256(data).hexdigest()[:16]}.dcm"
            saved.write_bytes(data)
            _tell(f"mutant saved as {saved}; operations: {notes}")
            raise
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------- tests


def test_unmutated_files_come_out_clean(corpus: Corpus, engine: Engine) -> None:
    """The baseline: every generated file is clean, without a planted identifier."""
    for source in corpus.sources:
        outcome = _run(corpus, engine, source.data, [])
        assert outcome.status == "clean", (source.path, outcome.reason, outcome.detail)


@_campaign
@given(
    source=st.integers(0, 255),
    operations=st.lists(OPERATIONS, min_size=1, max_size=3),
)
def test_mutants_come_out_clean_or_quarantined(
    corpus: Corpus, engine: Engine, source: int, operations: list[Operation]
) -> None:
    chosen = corpus.sources[source % len(corpus.sources)]
    data, notes = mutate(chosen, operations)
    note(f"source: {chosen.path.relative_to(corpus.root)}")
    for text in notes:
        note(text)
    _run(corpus, engine, data, notes)
