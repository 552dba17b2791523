"""Read a DICOM header without the pixel data; write a new header in front of the same pixels.

The engine only rewrites headers, so pixel data is never decoded nor read into memory: the reader
walks element headers with seeks to find the Pixel Data element's byte span, and the writer copies
that span in the kernel. Every transfer syntax passes through unchanged; only a deflated dataset
is inflated, re-encoded and deflated whole. The walk is also the strictness check: pydicom reads
truncated values and unknown VRs leniently, so anything the walk cannot account for byte by byte
raises :class:`MalformedDicom`.
"""

from __future__ import annotations

import copy
import errno
import functools
import os
import secrets
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, PrivateTransferSyntaxes
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR

from anonpipe.anon.encode import encode_meta, write_dataset

_PREFIX = bytes(128) + b"DICM"
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_FIRST_PIXEL_TAG = 0x7FE00008
_LAST_PIXEL_TAG = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_VALID_VR = frozenset(vr.value.encode() for vr in STANDARD_VR)
_LONG_VR = frozenset(vr.value.encode() for vr in EXPLICIT_VR_LENGTH_32)
# Deflated Explicit VR LE, JPIP Referenced Deflate, JPIP HTJ2K Referenced Deflate (PS3.5 A.5).
DEFLATED_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)
_CHUNK = 1 << 20
# Everything except the pixel span is held in memory; beyond this the file is refused rather than
# risking the worker (an encapsulated document this large, or a deflate bomb).
_MAX_HEADER_BYTES = 128 << 20
#: Sequences nested deeper than this are refused: real objects (SR content trees included) stay
#: far below, and every reader and writer of a data set recurses once per level.
MAX_NESTING = 32


class MalformedDicom(Exception):
    """A file the engine must not de-identify; the caller quarantines it.

    ``reason`` is short and stable (for counters and the quarantine index); ``str(exc)`` adds
    offsets and tags but never element values, which may be PHI.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PixelSpan:
    """Byte span of the (Float/Double Float) Pixel Data element in the source, header included."""

    start: int
    end: int


@dataclass(slots=True)
class SourceFile:
    """A parsed source file: the header as pydicom datasets, the pixel data as a byte span."""

    path: Path
    file_meta: FileMetaDataset
    dataset: Dataset
    trailing: Dataset | None
    transfer_syntax: UID
    pixels: PixelSpan | None
    size: int


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """What :func:`write_file` put on disk; ``header``/``trailer`` are exactly the bytes written."""

    path: Path
    header: bytes
    trailer: bytes
    size: int


@functools.cache
def _sequence_tags() -> frozenset[int]:
    """Public tags whose dictionary VR is SQ: what pydicom assumes when the VR is implicit."""
    return frozenset(tag for tag in keyword_dict.values() if dictionary_VR(tag) == "SQ")


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """Walks element and item headers with seeks, so values are skipped rather than read."""

    def __init__(self, fp: BinaryIO, size: int, implicit: bool, little: bool) -> None:
        order = "<" if little else ">"
        self.fp, self.size, self.implicit = fp, size, implicit
        self._unpack8 = struct.Struct(order + "HHL").unpack  # implicit elements and all items
        self._unpack_vr = struct.Struct(order + "HH2sH").unpack
        self._unpack32 = struct.Struct(order + "L").unpack
        self._item_group = b"\xfe\xff" if little else b"\xff\xfe"  # (FFFE,eeee): no VR

    def _read(self, pos: int, n: int) -> bytes:
        self.fp.seek(pos)
        data = self.fp.read(n)
        if len(data) < n:
            raise MalformedDicom("truncated header", f"element header at offset {pos} is cut off")
        return data

    def header(
        self, pos: int, stop: Callable[[int], bool] | None = None
    ) -> tuple[int, bytes, int, int]:
        """Return ``(tag, VR or b"", header length, value length)`` of the element at `pos`.

        If `stop` accepts the tag, return ``(tag, b"", 0, 0)`` without reading any further.
        """
        data = self._read(pos, 8)
        if self.implicit or data[:2] == self._item_group:
            group, element, length = self._unpack8(data)
            vr = b""
        else:
            group, element, vr, length = self._unpack_vr(data)
        tag = group << 16 | element
        if stop is not None and stop(tag):
            return tag, b"", 0, 0
        if vr in _LONG_VR:
            return tag, vr, 12, self._unpack32(self._read(pos + 8, 4))[0]
        return tag, vr, 8, length

    def dataset(
        self,
        pos: int,
        end: int | None,
        stop: Callable[[int], bool] | None = None,
        depth: int = 0,
    ) -> int:
        """Walk elements up to `end` (``None``: up to and past an item delimiter).

        Returns the offset reached, or that of the first element whose tag satisfies `stop`.
        `depth` counts the sequences around this data set (see :data:`MAX_NESTING`).
        """
        if depth > MAX_NESTING:
            raise MalformedDicom(
                "sequences nested too deeply", f"more than {MAX_NESTING} levels at offset {pos}"
            )
        limit = self.size if end is None else end
        previous = -1
        while end is None or pos < end:
            tag, vr, header_length, length = self.header(pos, stop)
            if header_length == 0:  # `stop` accepted the tag
                return pos
            if tag >> 16 == 0xFFFE:
                if tag == _ITEM_END and end is None:
                    return pos + 8
                raise MalformedDicom("bad sequence item", f"{_tag(tag)} at offset {pos}")
            if tag <= previous:
                # PS3.5 7.1: ascending, each tag once. Out of order means a length was wrong and
                # what follows is read from the wrong place (a nested item's elements at the top).
                raise MalformedDicom("elements out of order", f"{_tag(tag)} at offset {pos}")
            previous = tag
            if not self.implicit and vr not in _VALID_VR:
                raise MalformedDicom("bad VR", f"element {_tag(tag)} at offset {pos}")
            pos += header_length
            if self.implicit and tag in _sequence_tags():
                vr = b"SQ"
            if length == _UNDEFINED:
                # PS3.5 6.2.2: an undefined-length UN holds a sequence in Implicit VR LE; an
                # undefined-length OB/OW (an icon's pixel data) holds fragments, not datasets.
                walker = _Walker(self.fp, self.size, True, True) if vr == b"UN" else self
                fragments = vr in (b"OB", b"OW") or tag in _PIXEL_TAGS
                pos = walker.items(pos, None, datasets=not fragments, depth=depth + 1)
                continue
            if pos + length > limit:
                raise MalformedDicom("truncated header", f"element {_tag(tag)} at offset {pos}")
            if vr == b"SQ":
                self.items(pos, pos + length, datasets=True, depth=depth + 1)
            pos += length
        return pos

    def items(self, pos: int, end: int | None, datasets: bool, depth: int = 1) -> int:
        """Walk items up to `end` (``None``: up to and past the sequence delimiter).

        Items hold `datasets` (walked too) or, in encapsulated pixel data, opaque fragments.
        """
        limit = self.size if end is None else end
        while end is None or pos < end:
            tag, _, _, length = self.header(pos)
            pos += 8
            if tag == _SEQUENCE_END and end is None:
                return pos
            if tag != _ITEM:
                raise MalformedDicom("bad sequence item", f"{_tag(tag)} at offset {pos - 8}")
            if length == _UNDEFINED and datasets:
                pos = self.dataset(pos, None, depth=depth)
            elif length == _UNDEFINED:
                raise MalformedDicom("bad sequence item", f"undefined length at offset {pos - 8}")
            elif pos + length > limit:
                raise MalformedDicom("truncated header", f"item at offset {pos - 8}")
            else:
                if datasets:
                    self.dataset(pos, pos + length, depth=depth)
                pos += length
        return pos


def _encoding(transfer_syntax: UID) -> tuple[bool, bool]:
    """Return ``(implicit VR, little endian)`` of the dataset, or raise for an unknown syntax."""
    if transfer_syntax in PrivateTransferSyntaxes:  # registered ones carry their encoding
        transfer_syntax = PrivateTransferSyntaxes[PrivateTransferSyntaxes.index(transfer_syntax)]
    if not transfer_syntax.is_transfer_syntax:
        shown = str(transfer_syntax) if transfer_syntax.is_valid else "an invalid UID"
        raise MalformedDicom("unsupported transfer syntax", f"{shown} is not a known syntax")
    return transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian


def _not_dicom(start: bytes) -> MalformedDicom:
    """Tell a raw dataset without file meta (quarantined as such) from a file that isn't DICOM."""
    looks_like_element = start[4:6] in _VALID_VR or int.from_bytes(start[4:8], "little") < 1 << 16
    if len(start) >= 8 and start[1] == 0 and start[0] in (0x02, 0x08) and looks_like_element:
        return MalformedDicom("no file meta", "a dataset without preamble and DICM prefix")
    return MalformedDicom("not DICOM (no DICM prefix)")


def _parse(fp: BinaryIO, start: int, end: int, implicit: bool, little: bool) -> Dataset:
    """Parse bytes the walk has accounted for, so pydicom's leniency cannot hide anything."""
    if end - start > _MAX_HEADER_BYTES:
        raise MalformedDicom("header too large", f"{end - start} bytes outside the pixel data")
    fp.seek(start)
    return read_dataset(BytesIO(fp.read(end - start)), implicit, little)


def _read_meta(fp: BinaryIO, size: int) -> tuple[FileMetaDataset, int]:
    """Return the file meta and the offset just past it."""
    start = fp.read(140)
    if start[128:132] != b"DICM":
        raise _not_dicom(start)
    meta_end = _Walker(fp, size, False, True).dataset(132, size, stop=lambda tag: tag >> 16 != 2)
    if meta_end == 132:
        raise MalformedDicom("no file meta", "no (0002,eeee) elements after the DICM prefix")
    file_meta = FileMetaDataset(_parse(fp, 132, meta_end, False, True))
    if not file_meta.get("TransferSyntaxUID"):
        raise MalformedDicom("no transfer syntax", "(0002,0010) is missing or empty")
    return file_meta, meta_end


def _inflate(fp: BinaryIO) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(fp.read(_MAX_HEADER_BYTES), _MAX_HEADER_BYTES + 1)
    except zlib.error as exc:
        raise MalformedDicom("bad deflate stream", str(exc)) from None
    if len(data) > _MAX_HEADER_BYTES or (not inflater.eof and fp.read(1)):
        raise MalformedDicom("header too large", "the deflated dataset is too large")
    if not inflater.eof:
        raise MalformedDicom("truncated header", "the deflated dataset ends early")
    return data


def _pixel_end(walker: _Walker, pos: int) -> int:
    """Return the offset just past the pixel element at `pos`, skipping any fragments."""
    try:
        _, vr, header_length, length = walker.header(pos)
        if not walker.implicit and vr not in _VALID_VR:
            raise MalformedDicom("bad VR", f"pixel data element at offset {pos}")
        if length == _UNDEFINED:  # encapsulated: item by item up to the sequence delimiter
            return walker.items(pos + header_length, None, datasets=False)
    except MalformedDicom as exc:
        if exc.reason != "truncated header":
            raise
        raise MalformedDicom("truncated pixel data", str(exc)) from None
    end = pos + header_length + length
    if end > walker.size:
        raise MalformedDicom("truncated pixel data", f"ends {end - walker.size} bytes late")
    return end


def read_source(path: Path) -> SourceFile:
    """Parse the meta and the header of `path` and locate its pixel data without reading it.

    Parameters
    ----------
    path : Path
        A DICOM Part 10 file.

    Returns
    -------
    SourceFile
        Datasets before and after the pixel data, and the pixel element's byte span. A deflated
        dataset is inflated in memory and returned whole, with ``pixels=None``.

    Raises
    ------
    MalformedDicom
        For an empty, non-DICOM, truncated or structurally invalid file (see ``reason``).
    OSError
        If the file cannot be read.
    """
    try:
        with open(path, "rb") as fp:
            return _read_source(path, fp)
    except RecursionError:
        raise MalformedDicom("sequences nested too deeply") from None


def _read_source(path: Path, fp: BinaryIO) -> SourceFile:
    size = os.fstat(fp.fileno()).st_size
    if size == 0:
        raise MalformedDicom("empty file")
    file_meta, meta_end = _read_meta(fp, size)
    syntax = UID(file_meta.TransferSyntaxUID)
    implicit, little = _encoding(syntax)
    if syntax in DEFLATED_SYNTAXES:
        inflated = _inflate(fp)
        data, end = BytesIO(inflated), len(inflated)
        _Walker(data, end, implicit, little).dataset(0, end)
        dataset = _parse(data, 0, end, implicit, little)
        return SourceFile(path, file_meta, dataset, None, syntax, None, size)

    walker = _Walker(fp, size, implicit, little)
    pixel_start = walker.dataset(meta_end, size, stop=_PIXEL_TAGS.__contains__)
    pixels = trailing = None
    if pixel_start < size:
        pixels = PixelSpan(pixel_start, _pixel_end(walker, pixel_start))
        if pixels.end < size:
            walker.dataset(pixels.end, size)
            trailing = _parse(fp, pixels.end, size, implicit, little)
    dataset = _parse(fp, meta_end, pixel_start, implicit, little)
    return SourceFile(path, file_meta, dataset, trailing, syntax, pixels, size)


def encode_dataset(dataset: Dataset, transfer_syntax: UID) -> bytes:
    """Encode `dataset` (no preamble or meta) as `transfer_syntax` says; never deflates.

    Elements still raw from :func:`read_source` are copied as read when the encoding matches.
    """
    implicit, little = _encoding(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_dataset(fp, dataset, default_encoding)
    return fp.getvalue()


def encode_file_meta(file_meta: FileMetaDataset) -> bytes:
    """Return the preamble, ``DICM`` and the meta group with a recomputed group length.

    Works on copies: pydicom fills in the group length and empty Type 1 elements in place.

    Raises
    ------
    ValueError
        If a required meta element (e.g. Media Storage SOP Instance UID) is missing.
    """
    fast = encode_meta(file_meta)
    if fast is not None:
        return _PREFIX + fast
    meta = FileMetaDataset()
    for element in file_meta:
        if element.tag != 0x00020000:
            meta.add(copy.copy(element))
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    fp.write(_PREFIX)
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def build_header(file_meta: FileMetaDataset, dataset: Dataset, source: SourceFile) -> bytes:
    """Return every byte to write before the source's pixel data.

    For a deflated syntax this is the whole file, compressed: search ``encode_dataset(dataset,
    source.transfer_syntax)`` for residual PHI instead.

    Raises
    ------
    ValueError
        If the meta changes the transfer syntax (the pixels are copied, so it cannot change) or
        `dataset` holds elements that belong at or after the pixel data.
    """
    if UID(file_meta.get("TransferSyntaxUID", "")) != source.transfer_syntax:
        raise ValueError("file_meta: TransferSyntaxUID must equal source.transfer_syntax")
    if source.pixels is not None and max(dataset.keys(), default=0) >= _FIRST_PIXEL_TAG:
        raise ValueError("dataset: elements from (7FE0,0008) on belong in the pixel span/trailer")
    body = encode_dataset(dataset, source.transfer_syntax)
    if source.transfer_syntax in DEFLATED_SYNTAXES:
        deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = deflater.compress(body) + deflater.flush()
        body += b"\x00" * (len(body) % 2)  # PS3.5 A.5: pad to even length
    return encode_file_meta(file_meta) + body


def build_trailer(trailing: Dataset | None, source: SourceFile) -> bytes:
    """Return the bytes to write after the pixel data (usually ``b""``).

    Raises
    ------
    ValueError
        If there is no pixel span to follow, or `trailing` holds tags not after the pixel data.
    """
    if trailing is None or len(trailing) == 0:
        return b""
    if source.pixels is None:
        raise ValueError("trailing: source has no pixel span; put these elements in dataset")
    if min(trailing.keys()) <= _LAST_PIXEL_TAG:
        raise ValueError("trailing: only elements after (7FE0,0010) may follow the pixel data")
    return encode_dataset(trailing, source.transfer_syntax)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy `count` bytes of `src` at `offset` to `dst`, in the kernel when possible."""
    in_kernel = hasattr(os, "copy_file_range")
    while count > 0:
        if in_kernel:
            try:
                done = os.copy_file_range(src, dst, min(count, 1 << 30), offset)
            except OSError as exc:  # e.g. older kernels across filesystems, or unsupported fs
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                in_kernel = False
                continue
        else:
            chunk = os.pread(src, min(count, _CHUNK), offset)
            _write_all(dst, chunk)
            done = len(chunk)
        if done == 0:
            raise MalformedDicom("source changed", "it shrank while its pixels were copied")
        offset += done
        count -= done


def same_content(path: Path, header: bytes, source: SourceFile, trailer: bytes = b"") -> bool:
    """Whether `path` holds exactly what :func:`write_file` would write (compared in chunks)."""
    pixels = source.pixels
    try:
        with open(path, "rb") as existing:
            size = os.fstat(existing.fileno()).st_size
            span = 0 if pixels is None else pixels.end - pixels.start
            if size != len(header) + span + len(trailer) or existing.read(len(header)) != header:
                return False
            if pixels is not None:
                with open(source.path, "rb") as src:
                    offset = pixels.start
                    while offset < pixels.end:
                        count = min(_CHUNK, pixels.end - offset)
                        if existing.read(count) != os.pread(src.fileno(), count, offset):
                            return False
                        offset += count
            return existing.read() == trailer
    except OSError:
        return False


def write_file(
    dest: Path,
    header: bytes,
    source: SourceFile,
    trailer: bytes = b"",
    *,
    fsync: bool = True,
    replace: bool = True,
) -> WrittenFile:
    """Write `header`, the source's pixel span and `trailer` to `dest`, atomically.

    The bytes go to a hidden temporary name in the destination folder, are fsynced, then renamed
    over `dest` (or, with ``replace=False``, linked to it only if it does not exist yet), so
    readers never see a partial file; the temporary file is removed on error.

    Parameters
    ----------
    dest : Path
        Final path; parent folders are created.
    header, trailer : bytes
        From :func:`build_header` and :func:`build_trailer`, already checked by the caller.
    source : SourceFile
        The file the pixel span is copied from, unchanged (element header included).
    fsync : bool
        Flush the file to disk before the rename. A batch may pass False and sync once at its
        end (``os.sync``) before it reports the files as done: one flush instead of thousands.
    replace : bool
        False: never overwrite; an existing `dest` raises :class:`FileExistsError` (atomically,
        so two processes writing the same name cannot both succeed).

    Returns
    -------
    WrittenFile

    Raises
    ------
    MalformedDicom
        With reason "source changed" if the source's size is not what :func:`read_source` saw.
    FileExistsError
        With ``replace=False``, when `dest` exists; it is left as it was.
    OSError
        If writing fails; `dest` is then left as it was.
    """
    pixels = source.pixels
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    out = open(tmp, "xb", buffering=0)  # noqa: SIM115 - closed below; removed on any error
    try:
        with out:
            _write_all(out.fileno(), header)
            if pixels is not None:
                with open(source.path, "rb") as src:
                    if os.fstat(src.fileno()).st_size != source.size:
                        raise MalformedDicom("source changed", "its size differs from when read")
                    _copy_range(src.fileno(), out.fileno(), pixels.start, pixels.end - pixels.start)
            _write_all(out.fileno(), trailer)
            if fsync:
                os.fsync(out.fileno())
        if replace:
            os.replace(tmp, dest)
        else:
            os.link(tmp, dest)
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    span = 0 if pixels is None else pixels.end - pixels.start
    return WrittenFile(dest, header, trailer, len(header) + span + len(trailer))
