"""The file meta pynetdicom writes before each received data set, encoded without pydicom.

pynetdicom (with ``STORE_RECV_CHUNKED_DATASET``) starts every spool file with a file meta group
it builds as a pydicom ``FileMetaDataset`` (``create_file_meta``) and encodes with pydicom's
``write_file_meta_info``: ~0.6 ms of CPU per received object, about an eighth of what the SCP
spends on one. The group is always the same seven elements, so :func:`install` swaps those two
names in ``pynetdicom.dimse_messages`` (pynetdicom 3.0, like :mod:`anonpipe.scp.spool`'s swap)
for :func:`create_file_meta` and :func:`write_file_meta_info`, which write the same bytes
directly. Anything else (an empty UID, a value that is not ASCII, a caller passing a real
dataset) goes to pydicom's functions unchanged. ``tests/net/test_filemeta.py`` checks the bytes
against pydicom's and fails if a pynetdicom release stops calling these names.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any

from pydicom.filewriter import write_file_meta_info as _pydicom_write
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta as _pynetdicom_create

__all__ = ["FileMeta", "create_file_meta", "encode", "install", "write_file_meta_info"]

_lock = threading.Lock()
#: How many file meta groups were written here (tests check pynetdicom still calls us).
written = 0


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What pynetdicom's ``create_file_meta`` is given for a received C-STORE."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION


def create_file_meta(
    *,
    sop_class_uid: Any,
    sop_instance_uid: Any,
    transfer_syntax: Any,
    implementation_uid: Any = PYNETDICOM_IMPLEMENTATION_UID,
    implementation_version: Any = PYNETDICOM_IMPLEMENTATION_VERSION,
) -> Any:
    """A :class:`FileMeta` when every value is text, else pynetdicom's own dataset."""
    values = (
        sop_class_uid,
        sop_instance_uid,
        transfer_syntax,
        implementation_uid,
        implementation_version,
    )
    if all(isinstance(v, str) for v in values):
        return FileMeta(*(str(v) for v in values))
    return _pynetdicom_create(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        implementation_uid=implementation_uid,
        implementation_version=implementation_version,
    )


def _element(group_element: bytes, vr: bytes, value: bytes) -> bytes:
    return group_element + vr + struct.pack("<H", len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    data = value.encode("ascii")
    return data + pad if len(data) % 2 else data


def encode(meta: FileMeta) -> bytes | None:
    """The file meta group as pydicom writes it (explicit VR little endian, group length
    first), or None when a UID is empty (pydicom refuses it: the association is aborted, as
    before), a value is not ASCII or too long for a 16-bit length."""
    if not (meta.sop_class_uid and meta.sop_instance_uid and meta.transfer_syntax):
        return None
    try:
        body = b"".join(
            (
                b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01",
                _element(b"\x02\x00\x02\x00", b"UI", _even(meta.sop_class_uid, b"\0")),
                _element(b"\x02\x00\x03\x00", b"UI", _even(meta.sop_instance_uid, b"\0")),
                _element(b"\x02\x00\x10\x00", b"UI", _even(meta.transfer_syntax, b"\0")),
                _element(b"\x02\x00\x12\x00", b"UI", _even(meta.implementation_uid, b"\0")),
                _element(b"\x02\x00\x13\x00", b"SH", _even(meta.implementation_version, b" ")),
            )
        )
    except (UnicodeEncodeError, struct.error):
        return None
    return b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", len(body)) + body


def write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """Write a :class:`FileMeta` directly; anything else through pydicom."""
    global written
    data = encode(file_meta) if isinstance(file_meta, FileMeta) else None
    if data is None:
        if isinstance(file_meta, FileMeta):
            file_meta = _pynetdicom_create(
                sop_class_uid=UID(file_meta.sop_class_uid),
                sop_instance_uid=UID(file_meta.sop_instance_uid),
                transfer_syntax=UID(file_meta.transfer_syntax),
                implementation_uid=UID(file_meta.implementation_uid),
                implementation_version=file_meta.implementation_version,
            )
        _pydicom_write(fp, file_meta, enforce_standard=enforce_standard)
        return
    fp.write(data)
    with _lock:
        written += 1


def install() -> None:
    """Make pynetdicom write received objects' file meta through this module (idempotent)."""
    from pynetdicom import dimse_messages

    setattr(dimse_messages, "create_file_meta", create_file_meta)  # noqa: B010
    setattr(dimse_messages, "write_file_meta_info", write_file_meta_info)  # noqa: B010
