"""The header encoder writes exactly the bytes pydicom's ``write_dataset`` writes.

Compared on every readable file of the public corpus and on generated objects in every transfer
syntax: the source data set as read (raw elements), a converted copy of it, and the cleaned data
set the engine writes (raw, converted and new elements, new sequences).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID

from anonpipe.anon.clean import Cleaner, Recipe
from anonpipe.anon.dicomfile import SourceFile, encode_dataset, encode_file_meta, read_source
from anonpipe.anon.encode import encode_meta
from anonpipe.anon.identity import IdentityStore, PatientPseudonym, load_or_create_key
from anonpipe.anon.profile import build_profile
from tests.harness.corpus import collections
from tests.harness.studygen import ALL_TRANSFER_SYNTAXES, generate


def _pydicom_bytes(dataset: Dataset, syntax: UID) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
    write_dataset(fp, dataset)
    return fp.getvalue()


def _sources(tmp: Path) -> list[SourceFile]:
    paths = [p for files in collections().values() for p in files]
    paths += generate(
        tmp / "gen",
        transfer_syntaxes=ALL_TRANSFER_SYNTAXES,
        series_per_study=len(ALL_TRANSFER_SYNTAXES),
        seed=7,
    ).paths
    sources = []
    for path in paths:
        try:
            sources.append(read_source(path))
        except Exception:
            continue
    return sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[SourceFile]:
    return _sources(tmp_path_factory.mktemp("encode"))


def _check(dataset: Dataset, syntax: UID) -> bool:
    """Whether both encoders agree (or both refuse) on `dataset`."""
    try:
        expected = _pydicom_bytes(dataset, syntax)
    except Exception:
        with pytest.raises(Exception):  # noqa: B017
            encode_dataset(dataset, syntax)
        return True
    return encode_dataset(dataset, syntax) == expected


def test_raw_and_converted_data_sets_encode_as_pydicom_does(sources: list[SourceFile]) -> None:
    assert len(sources) > 100
    differ = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in sources:
            syntax = source.transfer_syntax
            if syntax.is_deflated:
                syntax = UID("1.2.840.10008.1.2.1")
            if not _check(source.dataset, syntax):
                differ.append(f"{source.path.name} raw")
            converted = Dataset(source.dataset)
            for element in converted:  # converts every element in place
                _ = element.value
            if not _check(converted, syntax):
                differ.append(f"{source.path.name} converted")
    assert not differ


def test_cleaned_data_sets_encode_as_pydicom_does(
    sources: list[SourceFile], tmp_path: Path
) -> None:
    recipe = Recipe(build_profile(("clean_descriptors",), "shift"), "shift")
    differ = []
    with (
        IdentityStore(tmp_path / "identity.db", load_or_create_key(tmp_path / "k")) as store,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        cleaner = Cleaner(recipe, store, PatientPseudonym("ID", "NAME", -10))
        for source in sources:
            try:
                cleaned = cleaner.dataset(source.dataset)
            except Exception:
                continue
            syntax = source.transfer_syntax
            if syntax.is_deflated:
                syntax = UID("1.2.840.10008.1.2.1")
            if not _check(cleaned, syntax):
                differ.append(source.path.name)
    assert not differ


def test_new_file_meta_encodes_as_pydicom_does() -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = UID("2.25.123")
    meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    meta.ImplementationClassUID = UID("2.25.171543157155476391217385312826063117617")
    meta.ImplementationVersionName = "ANONPIPE_1.0"
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    fp.write(bytes(128) + b"DICM")
    write_file_meta_info(fp, copy.deepcopy(meta), enforce_standard=True)
    assert encode_meta(meta) is not None
    assert encode_file_meta(meta) == fp.getvalue()
    meta.ImplementationVersionName = "ANONPIPE_1.0X"  # odd length: padded
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    fp.write(bytes(128) + b"DICM")
    write_file_meta_info(fp, copy.deepcopy(meta), enforce_standard=True)
    assert encode_file_meta(meta) == fp.getvalue()
    del meta.ImplementationVersionName  # not the shape the fast path knows: pydicom writes it
    assert encode_meta(meta) is None


def test_empty_required_meta_element_is_refused_as_pydicom_does() -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = UID("")
    meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    meta.ImplementationClassUID = UID("2.25.1")
    meta.ImplementationVersionName = "ANONPIPE_1.0"
    assert encode_meta(meta) is None
    with pytest.raises(AttributeError, match="Media Storage SOP Instance UID"):
        encode_file_meta(meta)
