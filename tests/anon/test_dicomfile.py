"""Tests for anonpipe.anon.dicomfile: pass-through round trips, strictness and memory use."""

from __future__ import annotations

import errno
import os
import random
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

import anonpipe
from anonpipe.anon import dicomfile
from anonpipe.anon.dicomfile import (
    MalformedDicom,
    PixelSpan,
    SourceFile,
    build_header,
    build_trailer,
    encode_dataset,
    encode_file_meta,
    read_source,
    write_file,
)

NAME = "Doe^Jane"  # the "PHI" that must never show up in an error message


def _dataset(pixels: str | None = "native", trailing: bool = False) -> Dataset:
    """A small CT-like dataset with nested, undefined-length and private elements."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = "20240102"
    ds.Modality = "CT"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = [ref]
    code = Dataset()
    code.CodeValue = "T-D0050"
    code.CodingSchemeDesignator = "SRT"
    code.CodeMeaning = "Tissue"
    code.is_undefined_length_sequence_item = True
    ds.AnatomicRegionSequence = [code]
    ds["AnatomicRegionSequence"].is_undefined_length = True
    ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x01, "LO", "private text")
    ds.PatientName = NAME
    ds.PatientID = "PID-0001"
    ds.PatientBirthDate = "19700101"
    ds.ImagePositionPatient = [-125.0, -125.0, 10.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels == "native":
        ds.PixelData = bytes(range(256)) * 2
        ds["PixelData"].VR = "OW"
    elif pixels == "encapsulated":
        ds.NumberOfFrames = 2
        ds.PixelData = encapsulate([b"\xff\xd8frame-one\xff\xd9", b"\xff\xd8frame-2\xff\xd9"])
    elif pixels == "float":
        ds.BitsAllocated = 32
        ds.FloatPixelData = struct.pack("<256f", *range(256))
    if trailing:
        ds.add_new(0xFFFCFFFC, "OB", bytes(64))  # Data Set Trailing Padding
    return ds


def _meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    return meta


def _write(
    path: Path, transfer_syntax: str, pixels: str | None = "native", trailing: bool = False
) -> Path:
    ds = _dataset(pixels, trailing)
    ds.file_meta = _meta(ds, transfer_syntax)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def _malformed(path: Path, data: bytes) -> MalformedDicom:
    path.write_bytes(data)
    with pytest.raises(MalformedDicom) as info:
        read_source(path)
    assert "Doe" not in str(info.value)
    return info.value


CASES: dict[str, tuple[str, str | None, bool]] = {
    "explicit-le": (ExplicitVRLittleEndian, "native", False),
    "implicit-le": (ImplicitVRLittleEndian, "native", False),
    "explicit-be": (ExplicitVRBigEndian, "native", False),
    "rle": (RLELossless, "encapsulated", False),
    "jpeg-baseline": (JPEGBaseline8Bit, "encapsulated", False),
    "deflated": (DeflatedExplicitVRLittleEndian, "native", False),
    "trailing-explicit": (ExplicitVRLittleEndian, "native", True),
    "trailing-implicit": (ImplicitVRLittleEndian, "native", True),
    "trailing-encapsulated": (JPEGBaseline8Bit, "encapsulated", True),
    "float-pixel-data": (ExplicitVRLittleEndian, "float", False),
    "no-pixel-data": (ExplicitVRLittleEndian, None, False),
    "no-pixel-data-implicit": (ImplicitVRLittleEndian, None, False),
}


@pytest.mark.parametrize("case", CASES)
def test_round_trip_changes_only_the_edited_element(tmp_path: Path, case: str) -> None:
    transfer_syntax, pixels, trailing = CASES[case]
    path = _write(tmp_path / "in.dcm", transfer_syntax, pixels=pixels, trailing=trailing)
    source = read_source(path)
    deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
    assert source.transfer_syntax == transfer_syntax
    assert source.size == path.stat().st_size
    assert (source.pixels is None) == (pixels is None or deflated)
    assert (source.trailing is not None) == trailing
    assert "PixelData" not in source.dataset or deflated

    source.dataset.PatientName = "Anonymous"
    header = build_header(source.file_meta, source.dataset, source)
    trailer = build_trailer(source.trailing, source)
    written = write_file(tmp_path / "out" / "new.dcm", header, source, trailer)

    data = written.path.read_bytes()
    assert written.size == len(data)
    assert data.startswith(header) and data.endswith(trailer)
    assert NAME.encode() not in header + trailer
    if source.pixels is not None:
        start, end = source.pixels.start, source.pixels.end
        assert data[len(header) : len(header) + end - start] == path.read_bytes()[start:end]
    before, after = dcmread(path), dcmread(written.path)
    assert after.file_meta.TransferSyntaxUID == transfer_syntax
    assert after.PatientName == "Anonymous"
    after.PatientName = before.PatientName
    assert after == before
    for keyword in ("PixelData", "FloatPixelData"):
        if keyword in before:
            assert after[keyword].value == before[keyword].value


def test_pixel_span_covers_the_whole_element(tmp_path: Path) -> None:
    path = _write(tmp_path / "in.dcm", ExplicitVRLittleEndian)
    source = read_source(path)
    data = path.read_bytes()
    assert source.pixels == PixelSpan(len(data) - 512 - 12, len(data))
    assert data[source.pixels.start : source.pixels.start + 6] == b"\xe0\x7f\x10\x00OW"


def test_undefined_length_un_holds_implicit_items(tmp_path: Path) -> None:
    """PS3.5 6.2.2: an undefined-length UN element is a sequence in Implicit VR Little Endian."""
    ds = _dataset(pixels=None)
    item = encode_dataset(_code_item(), ImplicitVRLittleEndian)
    un = b"\x09\x00\x02\x10UN\x00\x00\xff\xff\xff\xff"
    un += b"\xfe\xff\x00\xe0" + struct.pack("<L", len(item)) + item + b"\xfe\xff\xdd\xe0" + bytes(4)
    body = encode_dataset(ds, ExplicitVRLittleEndian)
    split = body.index(b"\x10\x00\x10\x00PN")  # insert before (0010,0010), after (0009,1001)
    path = tmp_path / "un.dcm"
    meta = encode_file_meta(_meta(ds, ExplicitVRLittleEndian))
    path.write_bytes(meta + body[:split] + un + body[split:])
    source = read_source(path)
    value = source.dataset[0x00091002].value
    assert isinstance(value, Sequence) and value[0].CodeValue == "T-D0050"


def _code_item() -> Dataset:
    item = Dataset()
    item.CodeValue = "T-D0050"
    item.CodingSchemeDesignator = "SRT"
    return item


def test_encode_file_meta_recomputes_group_length_without_mutating(tmp_path: Path) -> None:
    ds = _dataset()
    meta = _meta(ds, ExplicitVRLittleEndian)
    meta.FileMetaInformationGroupLength = 9999
    data = encode_file_meta(meta)
    assert data[:132] == bytes(128) + b"DICM"
    assert data[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    assert struct.unpack("<L", data[140:144])[0] == len(data) - 144
    assert meta.FileMetaInformationGroupLength == 9999
    assert "ImplementationClassUID" not in meta


# --- strictness -----------------------------------------------------------------------------


def _good(
    tmp_path: Path,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixels: str | None = "native",
    trailing: bool = False,
) -> bytes:
    return _write(tmp_path / "good.dcm", transfer_syntax, pixels, trailing).read_bytes()


def _raw_meta(meta: FileMetaDataset) -> bytes:
    """Meta written as given (no Type 1 checks), for meta that is wrong on purpose."""
    meta.FileMetaInformationGroupLength = 0
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_file_meta_info(fp, meta, enforce_standard=False)
    return bytes(128) + b"DICM" + fp.getvalue()


def test_empty_file(tmp_path: Path) -> None:
    assert _malformed(tmp_path / "x", b"").reason == "empty file"


@pytest.mark.parametrize(
    "data",
    [b"x", b"Patient: " + NAME.encode() + b"\n" * 200, random.Random(3).randbytes(4096)],
    ids=["one-byte", "text", "random"],
)
def test_not_dicom(tmp_path: Path, data: bytes) -> None:
    assert _malformed(tmp_path / "x", data).reason == "not DICOM (no DICM prefix)"


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_raw_dataset_without_meta(tmp_path: Path, transfer_syntax: str) -> None:
    body = encode_dataset(_dataset(), UID(transfer_syntax))
    assert _malformed(tmp_path / "x", body).reason == "no file meta"
    assert _malformed(tmp_path / "y", bytes(128) + b"DICM" + body).reason == "no file meta"


def test_missing_transfer_syntax(tmp_path: Path) -> None:
    ds = _dataset()
    meta = _meta(ds, ExplicitVRLittleEndian)
    del meta.TransferSyntaxUID
    data = _raw_meta(meta) + encode_dataset(ds, ExplicitVRLittleEndian)
    assert _malformed(tmp_path / "x", data).reason == "no transfer syntax"


def test_unknown_transfer_syntax(tmp_path: Path) -> None:
    ds = _dataset()
    data = _raw_meta(_meta(ds, "1.2.3.4")) + encode_dataset(ds, ExplicitVRLittleEndian)
    exc = _malformed(tmp_path / "x", data)
    assert exc.reason == "unsupported transfer syntax" and "1.2.3.4" in str(exc)


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    ("needle", "shift"),
    [
        (b"\x02\x00\x10\x00", 3),  # inside a meta element header
        (b"\x10\x00\x10\x00", 5),  # inside the Patient's Name element header
        (NAME.encode(), 3),  # inside the Patient's Name value
        (b"T-D0050", 2),  # inside an undefined-length sequence item
        (b"ACME", 1),  # inside the private creator value
    ],
)
def test_truncated_header(tmp_path: Path, transfer_syntax: str, needle: bytes, shift: int) -> None:
    data = _good(tmp_path, transfer_syntax)
    cut = data.index(needle) + shift
    assert _malformed(tmp_path / "x", data[:cut]).reason == "truncated header"


@pytest.mark.parametrize(
    ("needle", "vr"),
    [
        (b"\x10\x00\x10\x00PN", b"ZZ"),  # top level, letters but not a VR
        (b"\x10\x00\x20\x00LO", b"\x00\x01"),  # top level, not even letters
        (b"\x08\x00\x50\x11UI", b"ZZ"),  # in a defined-length sequence item
        (b"\x08\x00\x00\x01SH", b"QQ"),  # in an undefined-length sequence item
        (b"\x02\x00\x10\x00UI", b"ZZ"),  # in the file meta
        (b"\xe0\x7f\x10\x00OW", b"ZZ"),  # the pixel data element
    ],
)
def test_bad_vr(tmp_path: Path, needle: bytes, vr: bytes) -> None:
    data = _good(tmp_path)
    data = data.replace(needle, needle[:4] + vr, 1)
    assert _malformed(tmp_path / "x", data).reason == "bad VR"


@pytest.mark.parametrize("pixels", ["native", "encapsulated"])
@pytest.mark.parametrize("cut", [10, 20, -8, -1])  # in the length field, value, end
def test_truncated_pixel_data(tmp_path: Path, pixels: str, cut: int) -> None:
    syntax = RLELossless if pixels == "encapsulated" else ExplicitVRLittleEndian
    data = _good(tmp_path, syntax, pixels=pixels)
    start = data.index(b"\xe0\x7f\x10\x00")
    end = start + cut if cut > 0 else len(data) + cut
    assert _malformed(tmp_path / "x", data[:end]).reason == "truncated pixel data"


def test_encapsulated_garbage_instead_of_delimiter(tmp_path: Path) -> None:
    data = _good(tmp_path, RLELossless, pixels="encapsulated")
    assert _malformed(tmp_path / "x", data[:-8] + bytes(8)).reason == "bad sequence item"


def test_stray_delimiter_after_pixel_data(tmp_path: Path) -> None:
    data = _good(tmp_path) + b"\xfe\xff\xdd\xe0" + bytes(4)
    assert _malformed(tmp_path / "x", data).reason == "bad sequence item"


def test_truncated_trailing_element(tmp_path: Path) -> None:
    data = _good(tmp_path, trailing=True)
    assert _malformed(tmp_path / "x", data[:-10]).reason == "truncated header"


def test_corrupt_sequence_in_implicit_vr(tmp_path: Path) -> None:
    """Implicit VR has no VR on the wire: sequences are known from the dictionary and walked."""
    data = bytearray(_good(tmp_path, ImplicitVRLittleEndian))
    at = data.index(b"\x08\x00\x50\x11") + 4  # (0008,1150) inside Referenced Image Sequence
    data[at : at + 4] = struct.pack("<L", 0x1000)
    assert _malformed(tmp_path / "x", bytes(data)).reason == "truncated header"


def test_sequences_nested_too_deeply(tmp_path: Path) -> None:
    depth = 2000
    sq = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    end = b"\xfe\xff\x0d\xe0" + bytes(4) + b"\xfe\xff\xdd\xe0" + bytes(4)
    meta = encode_file_meta(_meta(_dataset(), ExplicitVRLittleEndian))
    data = meta + sq * depth + end * depth
    assert _malformed(tmp_path / "x", data).reason == "sequences nested too deeply"


def test_header_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicomfile, "_MAX_HEADER_BYTES", 256)
    plain = _good(tmp_path)
    assert _malformed(tmp_path / "x", plain).reason == "header too large"
    deflated = _good(tmp_path, DeflatedExplicitVRLittleEndian)
    assert _malformed(tmp_path / "y", deflated).reason == "header too large"


def test_pixel_data_right_after_the_meta(tmp_path: Path) -> None:
    meta = encode_file_meta(_meta(_dataset(), ExplicitVRLittleEndian))
    (tmp_path / "x").write_bytes(meta + b"\xe0\x7f\x10\x00OB\x00\x00\x04\x00\x00\x00abcd")
    source = read_source(tmp_path / "x")
    assert len(source.dataset) == 0 and source.pixels == PixelSpan(len(meta), len(meta) + 16)


def test_broken_deflate_stream(tmp_path: Path) -> None:
    data = _good(tmp_path, DeflatedExplicitVRLittleEndian)
    meta_end = len(encode_file_meta(read_source(tmp_path / "good.dcm").file_meta))
    assert _malformed(tmp_path / "x", data[: meta_end + 40]).reason == "truncated header"
    garbage = data[:meta_end] + b"\xff" * 64
    assert _malformed(tmp_path / "y", garbage).reason == "bad deflate stream"


# --- build and write contracts --------------------------------------------------------------


def _source(tmp_path: Path, pixels: str | None = "native", trailing: bool = False) -> SourceFile:
    return read_source(_write(tmp_path / "in.dcm", ExplicitVRLittleEndian, pixels, trailing))


def test_build_header_rejects_a_changed_transfer_syntax(tmp_path: Path) -> None:
    source = _source(tmp_path)
    source.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    with pytest.raises(ValueError, match="TransferSyntaxUID"):
        build_header(source.file_meta, source.dataset, source)


def test_build_header_rejects_pixel_data_in_the_dataset(tmp_path: Path) -> None:
    source = _source(tmp_path)
    source.dataset.PixelData = b"\x00\x00"
    with pytest.raises(ValueError, match="7FE0"):
        build_header(source.file_meta, source.dataset, source)


def test_build_trailer_contracts(tmp_path: Path) -> None:
    source = _source(tmp_path, trailing=True)
    assert build_trailer(None, source) == b""
    assert build_trailer(Dataset(), source) == b""
    wrong = Dataset()
    wrong.PatientID = "x"
    with pytest.raises(ValueError, match="after"):
        build_trailer(wrong, source)
    (tmp_path / "b").mkdir()
    no_pixels = _source(tmp_path / "b", pixels=None)
    assert no_pixels.trailing is None
    with pytest.raises(ValueError, match="no pixel span"):
        build_trailer(source.trailing, no_pixels)


def _no_copy_file_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "copy_file_range", raising=False)


def _exdev_copy_file_range(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", fail, raising=False)


@pytest.mark.parametrize("disable", [_no_copy_file_range, _exdev_copy_file_range])
def test_write_file_falls_back_to_read_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disable: Callable[[pytest.MonkeyPatch], None]
) -> None:
    source = _source(tmp_path, pixels="encapsulated")
    disable(monkeypatch)
    header = build_header(source.file_meta, source.dataset, source)
    written = write_file(tmp_path / "out.dcm", header, source, b"")
    assert dcmread(written.path).PixelData == dcmread(source.path).PixelData


def test_write_file_replaces_dest_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    source = _source(tmp_path)
    dest = tmp_path / "out" / "a" / "new.dcm"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"old")
    header = build_header(source.file_meta, source.dataset, source)
    written = write_file(dest, header, source, b"")
    assert written.path == dest and dest.stat().st_size == written.size == source.size
    assert sorted(p.name for p in dest.parent.iterdir()) == ["new.dcm"]


def test_write_file_removes_the_temporary_file_on_error(tmp_path: Path) -> None:
    source = _source(tmp_path)
    header = build_header(source.file_meta, source.dataset, source)
    source.path.unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        write_file(out / "new.dcm", header, source, b"")
    assert list(out.iterdir()) == []


def test_write_file_refuses_a_source_of_another_size(tmp_path: Path) -> None:
    source = _source(tmp_path)
    header = build_header(source.file_meta, source.dataset, source)
    os.truncate(source.path, source.size - 100)
    with pytest.raises(MalformedDicom, match="size differs") as info:
        write_file(tmp_path / "out" / "new.dcm", header, source, b"")
    assert info.value.reason == "source changed"
    assert list((tmp_path / "out").iterdir()) == []


def test_write_file_stops_when_the_source_ends_early(tmp_path: Path) -> None:
    source = _source(tmp_path)
    assert source.pixels is not None
    source.pixels = PixelSpan(source.pixels.start, source.pixels.end + 100)
    header = build_header(source.file_meta, source.dataset, source)
    with pytest.raises(MalformedDicom, match="shrank") as info:
        write_file(tmp_path / "out" / "new.dcm", header, source, b"")
    assert info.value.reason == "source changed"
    assert list((tmp_path / "out").iterdir()) == []


# --- memory ---------------------------------------------------------------------------------

_MEMORY_CHILD = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from anonpipe.anon.dicomfile import build_header, build_trailer, read_source, write_file
    source = read_source(Path(sys.argv[1]))
    source.dataset.PatientName = "Anonymous"
    header = build_header(source.file_meta, source.dataset, source)
    written = write_file(Path(sys.argv[2]), header, source, build_trailer(source.trailing, source))
    assert written.size == Path(sys.argv[2]).stat().st_size
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def test_one_gib_file_stays_under_200_mb(tmp_path: Path) -> None:
    """A sparse 1 GiB native object is read and rewritten without its pixels entering memory."""
    ds = _dataset(pixels=None)
    pixel_bytes = 1 << 30
    src, dest = tmp_path / "big.dcm", tmp_path / "out" / "big.dcm"
    with open(src, "wb") as fp:
        fp.write(encode_file_meta(_meta(ds, ExplicitVRLittleEndian)))
        fp.write(encode_dataset(ds, ExplicitVRLittleEndian))
        fp.write(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<L", pixel_bytes))
        fp.truncate(fp.tell() + pixel_bytes)
    env = {**os.environ, "PYTHONPATH": str(Path(anonpipe.__file__).parents[1])}
    args = [sys.executable, "-c", _MEMORY_CHILD, str(src), str(dest)]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stdout.strip())
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB"
    size_change = len("Anonymous ") - len(NAME)  # the new name is padded to even length
    assert dest.stat().st_size == src.stat().st_size + size_change
    assert dcmread(dest, stop_before_pixels=True).PatientName == "Anonymous"
