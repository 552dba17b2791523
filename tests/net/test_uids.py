"""The SCP's fast UID reader (:mod:`anonpipe.scp.uids`) agrees with pydicom or declines."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from anonpipe.scp import uids
from anonpipe.scp.lander import _read_uids

UIDS: dict[str, str] = {
    "sop_class": CTImageStorage,
    "sop": "1.2.3.4",
    "study": "1.2.3",
    "series": "1.2.3.5",
}


def _file(syntax: str, *, undefined_sequence: bool = False, private_bytes: int = 0) -> bytes:
    """A file as pynetdicom writes it: preamble, file meta with its group length, data set."""
    ds = Dataset()
    ds.SOPClassUID = UID(UIDS["sop_class"])
    ds.SOPInstanceUID = UID(UIDS["sop"])
    ds.StudyInstanceUID = UID(UIDS["study"])
    ds.SeriesInstanceUID = UID(UIDS["series"])
    ds.PatientName = "Doe^Jane"
    ds.Modality = "CT"
    if undefined_sequence:
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.9"
        ds.ReferencedImageSequence = Sequence([item])
        ds["ReferencedImageSequence"].is_undefined_length = True
    if private_bytes:
        ds.add_new(0x00191001, "OB", b"\0" * private_bytes)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(UIDS["sop_class"])
    ds.file_meta.MediaStorageSOPInstanceUID = UID(UIDS["sop"])
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_scan_reads_the_uids_in_every_uncompressed_syntax(syntax: str) -> None:
    assert uids.scan(_file(syntax), syntax) == UIDS


@pytest.mark.parametrize(
    ("case", "syntax"),
    [
        ("deflated", DeflatedExplicitVRLittleEndian),
        ("private syntax", "1.3.6.1.4.1.9999.1"),
        ("undefined-length sequence before the UIDs", ExplicitVRLittleEndian),
        ("UIDs beyond the head", ExplicitVRLittleEndian),
        ("truncated", ExplicitVRLittleEndian),
        ("not DICM", ExplicitVRLittleEndian),
        ("implicit data, explicit negotiated", ExplicitVRLittleEndian),
    ],
)
def test_scan_declines_what_only_pydicom_can_tell(case: str, syntax: str) -> None:
    data = {
        "undefined-length sequence before the UIDs": lambda: _file(syntax, undefined_sequence=True),
        "UIDs beyond the head": lambda: _file(syntax, private_bytes=uids.HEAD)[: uids.HEAD],
        "truncated": lambda: _file(syntax)[:200],
        "not DICM": lambda: b"\0" * 132 + _file(syntax)[132:],
        "implicit data, explicit negotiated": lambda: _file(ImplicitVRLittleEndian),
    }.get(case, lambda: _file(ExplicitVRLittleEndian))()
    assert uids.scan(data, syntax) is None


def test_scan_leaves_out_what_the_header_lacks() -> None:
    without_series = _file(ExplicitVRLittleEndian).replace(b" \x00\x0e\x00", b" \x00\x0f\x00")
    found = uids.scan(without_series, ExplicitVRLittleEndian)
    assert found == {k: v for k, v in UIDS.items() if k != "series"}


def test_scan_agrees_with_pydicom_on_pydicoms_test_files(tmp_path: Path) -> None:
    """Every file pydicom reads whose meta starts with its group length: the same UIDs, or
    None (then the lander asks pydicom)."""
    folder = Path(pydicom.data.__file__).parent / "test_files"
    scanned = 0
    for path in sorted(folder.rglob("*.dcm")):
        try:
            syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        except Exception:  # not our concern: files pydicom cannot read
            continue
        found = uids.scan(uids.read_head(path), syntax)
        if found is not None:
            scanned += 1
            assert found == _read_uids(path), path.name
    assert scanned >= 30


def test_the_lander_falls_back_to_pydicom(tmp_path: Path) -> None:
    path = tmp_path / "in.dcm"
    path.write_bytes(_file(ExplicitVRLittleEndian, undefined_sequence=True))
    assert _read_uids(path, ExplicitVRLittleEndian) == UIDS
    assert _read_uids(path) == UIDS
