"""Deciding on still-encoded elements gives what reading them first gives.

The cleaner decides most elements without pydicom reading their values (:meth:`Cleaner._unread`)
and decodes UIDs and dates itself (:func:`~anonpipe.anon.values.default_strings`). Compared on
every readable file of the public corpus and on generated objects in every transfer syntax,
under several option sets, against the same cleaner with every element read by pydicom: the
encoded output, the elements kept on purpose and the texts written must be the same.
"""

from __future__ import annotations

import struct
import warnings
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from anonpipe.anon import clean
from anonpipe.anon.clean import Cleaner, ElementError, Recipe
from anonpipe.anon.dicomfile import SourceFile, encode_dataset, read_source
from anonpipe.anon.identity import IdentityStore, PatientPseudonym, load_or_create_key
from anonpipe.anon.profile import build_profile
from anonpipe.anon.values import default_strings, uid_strings, values_of
from anonpipe.anon.vocabulary import Vocabulary
from tests.harness.corpus import collections
from tests.harness.studygen import ALL_TRANSFER_SYNTAXES, generate

RECIPES = {
    "default": (("clean_descriptors",), "shift", {}),
    "keep": (("retain_uids", "retain_device_identity", "clean_graphics"), "keep", {}),
    "remove": (("retain_safe_private", "retain_institution_identity"), "remove", {}),
    "vocabulary": (("clean_descriptors",), "shift", {"0008,1030": ["CT HEAD WO"]}),
}


def _paths(tmp: Path) -> list[Path]:
    generated = generate(
        tmp / "gen",
        transfer_syntaxes=ALL_TRANSFER_SYNTAXES,
        series_per_study=len(ALL_TRANSFER_SYNTAXES),
        seed=13,
    )
    return [p for files in collections().values() for p in files] + list(generated.paths)


def _clean(path: Path, recipe: Recipe, store: IdentityStore) -> tuple[bytes, set[int], set[str]]:
    try:
        source: SourceFile = read_source(path)
        cleaner = Cleaner(recipe, store, PatientPseudonym("PID", "PNAME", -42))
        cleaned = cleaner.dataset(source.dataset)
        syntax = source.transfer_syntax
        if syntax.is_deflated:
            syntax = UID("1.2.840.10008.1.2.1")
        return encode_dataset(cleaned, syntax), {int(t) for t in cleaner.kept}, cleaner.written
    except Exception as exc:
        return type(exc).__name__.encode(), set(), set()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_unread_decisions_equal_read_ones(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options, dates, words = RECIPES[name]
    recipe = Recipe(build_profile(options, dates), dates, Vocabulary.from_mapping(words))
    if "retain_safe_private" in options:
        recipe = Recipe(recipe.profile, dates, recipe.vocabulary, frozenset({"phi_test_creator"}))
    differ = []
    compared = 0
    with (
        IdentityStore(tmp_path / "identity.db", load_or_create_key(tmp_path / "k")) as store,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        for path in _paths(tmp_path):
            fast = _clean(path, recipe, store)
            with monkeypatch.context() as patched:
                patched.setattr(clean.Cleaner, "_unread", lambda self, tag, raw: clean._Needs.READ)
                slow = _clean(path, recipe, store)
            compared += 1
            if fast != slow:
                differ.append(path.name)
    assert compared > 100
    assert not differ


@pytest.mark.parametrize(
    "value",
    [
        b"", b" ", b"\0", b"20200101", b"20200101 ", b"2020\\20210102", b"20200101\\ ",
        b"\\", b" 2020 ", b"1.2.3\0", b"1.2.3\\4.5 ", b"1.2.3 \\4.5\0", b"\xe9\xff",
        b"20200101120000.5+0100 ", b"1.2.840.10008.1.2\0\0", b"  \0",
    ],
)  # fmt: skip
@pytest.mark.parametrize("vr", ["DA", "DT", "UI", "CS", "TM"])
def test_default_strings_equal_pydicom_values(value: bytes, vr: str) -> None:
    raw = RawDataElement(BaseTag(0x00080020), vr, len(value), value, 0, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        element = convert_raw_data_element(raw)
    expected = [str(v) for v in values_of(element.value)]
    assert (uid_strings(value) if vr == "UI" else default_strings(value)) == expected


def test_a_failure_decided_unread_names_its_element(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while deciding on still-encoded bytes names the element, as one while reading
    does (the quarantine's detail), and never the value."""
    uid = b"2.25.1234"
    data = struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", len(uid) + 1) + uid + b"\0"
    source = read_dataset(BytesIO(data), False, True)

    def failing(self: Cleaner, tag: int, uids: list[str]) -> None:
        raise ValueError(uids[0])

    monkeypatch.setattr(Cleaner, "_new_uids", failing)
    recipe = Recipe(build_profile(("clean_descriptors",), "shift"), "shift")
    with IdentityStore(tmp_path / "identity.db", load_or_create_key(tmp_path / "k")) as store:
        cleaner = Cleaner(recipe, store, PatientPseudonym("PID", "PNAME", -42))
        with pytest.raises(ElementError) as caught:
            cleaner.dataset(source)
    assert (caught.value.kind, caught.value.path) == ("ValueError", "(0008,0018)")
    assert "2.25" not in str(caught.value)
