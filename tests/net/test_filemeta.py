"""The SCP's own file meta writer (:mod:`anonpipe.scp.filemeta`) writes what pydicom writes."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info as pydicom_write
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta as pynetdicom_create

from anonpipe.config import LocalSettings, ResearchSettings
from anonpipe.scp import LandingRegistry, StorageSCP, filemeta
from anonpipe.scu import push_files
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.studygen import ALL_TRANSFER_SYNTAXES, Manifest
from tests.net.conftest import OUR_AE


def _pydicom(sop_class: str, sop: str, syntax: str) -> bytes:
    out = DicomBytesIO()
    meta = pynetdicom_create(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop), transfer_syntax=UID(syntax)
    )
    pydicom_write(out, meta)
    return out.getvalue()


def _ours(sop_class: str, sop: str, syntax: str) -> bytes:
    out = io.BytesIO()
    meta = filemeta.create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop), transfer_syntax=UID(syntax)
    )
    filemeta.write_file_meta_info(out, meta)
    return out.getvalue()


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4.1"])
@pytest.mark.parametrize("sop", ["1.2.3.4", "1.2.3.45", "2.25." + "1" * 59])
@pytest.mark.parametrize(
    "syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"]
)
def test_the_bytes_are_pydicoms(sop_class: str, sop: str, syntax: str) -> None:
    assert _ours(sop_class, sop, syntax) == _pydicom(sop_class, sop, syntax)


def test_an_empty_uid_is_refused_by_pydicom_as_before() -> None:
    """pynetdicom's decoder then fails and our guard aborts the association (test_scp)."""
    with pytest.raises(AttributeError, match="empty value"):
        _ours("1.2.3", "", "1.2.840.10008.1.2")


def test_what_is_not_ascii_goes_through_pydicom() -> None:
    meta = filemeta.FileMeta("1.2.3", "1.2.\u00e9", "1.2.840.10008.1.2")
    assert filemeta.encode(meta) is None
    out = io.BytesIO()
    filemeta.write_file_meta_info(out, meta)  # pydicom's writer, as before the swap
    assert out.getvalue().startswith(b"\x02\x00\x00\x00UL")


def test_pynetdicom_still_writes_received_file_meta_through_us(
    scp: StorageSCP,
    registry: LandingRegistry,
    study_factory: Callable[..., Manifest],
    tmp_path: Path,
    local: LocalSettings,
) -> None:
    """Fails if a pynetdicom release stops calling the swapped names (the saving is lost)."""
    manifest = study_factory(
        series_per_study=1, instances_per_series=3, transfer_syntaxes=ALL_TRANSFER_SYNTAXES
    )
    sender = replace(local, ae_title="PYSCU", port=free_port())
    us = ResearchSettings(ae_title=OUR_AE, host=LOOPBACK, port=scp.port, retries=0)
    landing_dir = tmp_path / "from_staging"
    before = filemeta.written
    with registry.expect(manifest.studies[0].study_instance_uid, landing_dir):
        report = push_files(sender, us, manifest.paths)
    assert not report.failed
    assert filemeta.written - before == 3
    for instance in manifest.instances:
        data = (landing_dir / f"{instance.sop_instance_uid}.dcm").read_bytes()
        expected = _pydicom(
            instance.sop_class_uid, instance.sop_instance_uid, instance.transfer_syntax_uid
        )
        assert data[:132] == b"\0" * 128 + b"DICM"
        assert data[132 : 132 + len(expected)] == expected
