"""The residual gate collects, from still-encoded elements, exactly the values pydicom's
conversion gives: compared on every readable file of the public corpus and on generated objects
in every transfer syntax, against the same collection with every element read by pydicom."""

from __future__ import annotations

import struct
import warnings
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

from anonpipe.anon import residual
from anonpipe.anon.dicomfile import SourceFile, read_source
from anonpipe.anon.residual import Identifiers, collect_identifiers
from tests.harness.corpus import collections
from tests.harness.studygen import ALL_TRANSFER_SYNTAXES, generate


def _paths(tmp: Path) -> list[Path]:
    paths = [p for files in collections().values() for p in files]
    generated = generate(
        tmp / "gen",
        transfer_syntaxes=ALL_TRANSFER_SYNTAXES,
        series_per_study=len(ALL_TRANSFER_SYNTAXES),
        seed=11,
    )
    return paths + list(generated.paths)


def _read(path: Path) -> SourceFile | None:
    try:
        return read_source(path)
    except Exception:
        return None


def _collect(source: SourceFile) -> Identifiers:
    def not_kept(tag: BaseTag) -> bool:
        return int(tag) == 0x00100020  # one kept tag, so that branch is compared too

    inputs = [source.dataset] + ([source.trailing] if source.trailing is not None else [])
    found = collect_identifiers(inputs, not_kept)
    found.update(collect_identifiers([source.file_meta], lambda tag: False))
    return found


def test_raw_collection_equals_pydicom_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared = 0
    differ = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in _paths(tmp_path):
            fast_source = _read(path)
            if fast_source is None:
                continue
            fast = _collect(fast_source)
            with monkeypatch.context() as patched:
                patched.setattr(residual, "_plain_codec", lambda charset: None)
                slow_source = _read(path)
                assert slow_source is not None
                slow = _collect(slow_source)
            compared += 1
            if fast.found != slow.found:
                differ.append(path.name)
    assert compared > 100
    assert not differ


_TRICKY = [
    b"PHIVALUE1", b" PHIVALUE2 ", b"PHIVALUE3\0", b"PHI\tVALUE4\t\0 ", b"PHIVALUE5\\PHIVALUE6 ",
    b"\\PHIVALUE7\\", b"PHI^VALUE^EIGHT=PHIID", b"\xe9PHIVALUE9\xff", b"  \0", b"1.2.3 \t\0",
]  # fmt: skip


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One element in Explicit VR Little Endian, padded to even length."""
    value += b" " * (len(value) % 2)
    if vr in ("UC", "UT"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


@pytest.mark.parametrize("charset", [b"", b"ISO_IR 100", b"ISO_IR 192"])
@pytest.mark.parametrize(
    "vr", ["AE", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UT"]
)
def test_tricky_values_collect_as_pydicom_reads_them(
    vr: str, charset: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def encoded() -> Dataset:
        data = _element(0x00080005, "CS", charset) if charset else b""
        data += _element(0x00110010, "LO", b"PHI_TEST_CREATOR")  # the values are private text
        for offset, value in enumerate(_TRICKY):
            data += _element(0x00111001 + offset, vr, value)
        # the same again in sequences: a defined-length item, then one of undefined length
        # inside an undefined-length sequence nested in it
        inner = b"".join(_element(0x00100020, vr, v) for v in _TRICKY[:1])
        inner_sequence = (
            struct.pack("<HH2sHL", 0x0010, 0x1002, b"SQ", 0, 0xFFFFFFFF)
            + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + inner
            + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
            + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        )
        item = data[len(_element(0x00080005, "CS", charset)) if charset else 0 :] + inner_sequence
        item = struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item
        sequence = struct.pack("<HH2sHL", 0x0040, 0x0275, b"SQ", 0, len(item)) + item
        return read_dataset(BytesIO(data + sequence), False, True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = collect_identifiers([encoded()], lambda tag: False)
        with monkeypatch.context() as patched:
            patched.setattr(residual, "_plain_codec", lambda charset: None)
            slow = collect_identifiers([encoded()], lambda tag: False)
    assert fast.found == slow.found
    assert fast.found
