"""Tests for the Table E.1-1 rule table, its generator and :func:`build_profile`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from anonpipe.anon.profile import (
    DATE_MODES,
    OPTION_NAMES,
    Action,
    Code,
    Profile,
    Rule,
    build_profile,
    load_table,
)

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO.parent / "shared" / "reference" / "ps3.15-e1-1-confidentiality-profile.json"
SHIPPED = REPO / "anonpipe" / "anon" / "profile_table.json"
GENERATOR = REPO / "scripts" / "gen_profile_table.py"

needs_source = pytest.mark.skipif(not SOURCE.exists(), reason=f"{SOURCE} not available")

PATIENT_NAME = 0x00100010
STUDY_INSTANCE_UID = 0x0020000D
ACCESSION_NUMBER = 0x00080050
STUDY_DATE = 0x00080020
SERIES_DESCRIPTION = 0x0008103E
DEVICE_SERIAL_NUMBER = 0x00181000  # X/Z/D
SOURCE_IMAGE_SEQUENCE = 0x00082112  # X/Z/U*
ROWS = 0x00280010


@pytest.fixture
def basic() -> Profile:
    return build_profile((), dates="remove")


def rule(profile: Profile, tag: int) -> Rule:
    found = profile.rule(tag)
    assert found is not None, f"{tag:08X} not in the profile"
    return found


# -- the generated table -----------------------------------------------------------------------


def test_table_has_every_source_row() -> None:
    table = json.loads(SHIPPED.read_text("utf-8"))
    patterns = [e for e in table["entries"] if "mask" in e]
    assert len(table["entries"]) == 621
    assert sorted(e["tag"] for e in patterns) == ["50XXXXXX", "60XX3000", "60XX4000", "GGGGEEEE"]
    assert load_table().count == 621
    supplement = json.loads((SHIPPED.parent / "supplement.json").read_text("utf-8"))["entries"]
    assert len(load_table().exact) == 621 - len(patterns) + len(supplement)
    assert table["source"]["file"] == SOURCE.name


def test_table_entries_are_sorted_and_resolved() -> None:
    entries = json.loads(SHIPPED.read_text("utf-8"))["entries"]
    assert [e["tag"] for e in entries] == sorted(e["tag"] for e in entries)
    assert {e["basic"] for e in entries} <= {a.value for a in Action}
    assert {o for e in entries for o in e["options"]} == set(OPTION_NAMES)
    by_tag = {e["tag"]: e for e in entries}
    assert by_tag["00100010"]["keyword"] == "PatientName"
    assert by_tag["60XX3000"]["keyword"] == "OverlayData"
    assert by_tag["60XX3000"]["mask"] == "FFE1FFFF"


@needs_source
def test_regenerating_gives_identical_bytes(tmp_path: Path) -> None:
    out = tmp_path / "profile_table.json"
    subprocess.run(
        [sys.executable, str(GENERATOR), str(SOURCE), "--output", str(out)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    assert out.read_bytes() == SHIPPED.read_bytes()
    header = json.loads(out.read_text("utf-8"))["source"]
    assert header["sha256"] == hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def test_generator_rejects_unknown_action(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "X", "tag": "(0010,0010)", "basicProfile": "Q"}]))
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, str(GENERATOR), str(bad), "--output", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "basicProfile 'Q'" in done.stderr
    assert not out.exists()


# -- basic profile and compound resolution -----------------------------------------------------


def test_basic_actions(basic: Profile) -> None:
    assert rule(basic, PATIENT_NAME) == Rule("Patient's Name", Action.EMPTY, Action.EMPTY, None)
    assert rule(basic, STUDY_INSTANCE_UID).action is Action.REPLACE_UID
    assert rule(basic, ACCESSION_NUMBER).action is Action.EMPTY


def test_compound_actions_resolve_to_least_destructive(basic: Profile) -> None:
    assert rule(basic, DEVICE_SERIAL_NUMBER).basic is Action.DUMMY
    assert rule(basic, SOURCE_IMAGE_SEQUENCE).action is Action.REPLACE_UID


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dates", "action", "option"),
    [
        ("shift", Action.CLEAN, "retain_longitudinal_modified_dates"),
        ("keep", Action.KEEP, "retain_longitudinal_full_dates"),
        ("remove", Action.EMPTY, None),
    ],
)
def test_date_modes(dates: str, action: Action, option: str | None) -> None:
    study_date = rule(build_profile((), dates=dates), STUDY_DATE)
    assert study_date == Rule("Study Date", Action.EMPTY, action, option)


def test_clean_descriptors(basic: Profile) -> None:
    assert rule(basic, SERIES_DESCRIPTION).action is Action.REMOVE
    cleaned = rule(build_profile(["clean_descriptors"]), SERIES_DESCRIPTION)
    assert (cleaned.action, cleaned.option) == (Action.CLEAN, "clean_descriptors")


def test_keep_beats_clean_whatever_the_order() -> None:
    # Device Serial Number has only K (retain_device_identity); Study Date has K and C columns.
    profile = build_profile(["clean_descriptors", "retain_device_identity"], dates="keep")
    assert rule(profile, STUDY_DATE).action is Action.KEEP
    assert rule(profile, DEVICE_SERIAL_NUMBER).option == "retain_device_identity"


def test_retain_uids(basic: Profile) -> None:
    kept = rule(build_profile(["retain_uids"]), STUDY_INSTANCE_UID)
    assert kept == Rule("Study Instance UID", Action.REPLACE_UID, Action.KEEP, "retain_uids")


# -- repeating groups, private tags and tags outside the profile ---------------------------------


@pytest.mark.parametrize("group", [0x6000, 0x6002, 0x601E])
def test_overlays_removed_unless_clean_graphics(basic: Profile, group: int) -> None:
    graphics = build_profile(["clean_graphics"])
    for element in (0x0010, 0x3000, 0x4000, 0x1500):
        assert rule(basic, group << 16 | element).action is Action.REMOVE
    geometry = rule(graphics, group << 16 | 0x0010)
    assert (geometry.action, geometry.option) == (Action.KEEP, "clean_graphics")
    data = rule(graphics, group << 16 | 0x3000)
    assert data == Rule("Overlay Data", Action.REMOVE, Action.CLEAN, "clean_graphics")
    assert rule(graphics, group << 16 | 0x4000).name == "Overlay Comments"


def test_curves(basic: Profile) -> None:
    assert rule(basic, 0x50040100).action is Action.REMOVE
    assert rule(build_profile(["clean_graphics"]), 0x50040100).action is Action.CLEAN


def test_groups_outside_the_repeating_ranges(basic: Profile) -> None:
    assert basic.rule(0x60200010) is None  # beyond 601E
    assert basic.rule(0x50200100) is None


@pytest.mark.parametrize("tag", [0x00090010, 0x00291001, 0x00030010, 0x60011000, 0x001100FF])
def test_private_tags(basic: Profile, tag: int) -> None:
    assert rule(basic, tag) == Rule("Private Attributes", Action.REMOVE, Action.REMOVE, None)
    safe = rule(build_profile(["retain_safe_private"]), tag)
    assert (safe.action, safe.option) == (Action.CLEAN, "retain_safe_private")


@pytest.mark.parametrize("tag", [ROWS, 0x00280000, 0x00090000, 0x00020003, 0x00020010])
def test_not_the_profiles_business(basic: Profile, tag: int) -> None:
    assert basic.rule(tag) is None


# -- codes, description, caching ---------------------------------------------------------------


def test_codes_and_description() -> None:
    profile = build_profile(["clean_graphics", "clean_descriptors"], dates="shift")
    assert [c.value for c in profile.codes] == ["113100", "113107", "113105", "113103"]
    assert profile.codes[0] == Code("113100", "Basic Application Confidentiality Profile", "DCM")
    assert profile.description == (
        "PS3.15 E.1-1 Basic Application Confidentiality Profile; "
        "Retain Longitudinal Temporal Information Modified Dates Option; "
        "Clean Descriptors Option; Clean Graphics Option"
    )
    assert build_profile([], dates="remove").codes == (profile.codes[0],)


def test_every_option_has_a_code() -> None:
    profile = build_profile(set(OPTION_NAMES) - {"retain_longitudinal_full_dates"})
    values = [c.value for c in profile.codes]
    assert len(values) == 10
    assert len(set(values)) == 10


def test_build_profile_is_cached() -> None:
    first = build_profile(["clean_descriptors", "retain_uids"])
    assert build_profile(iter(["retain_uids", "clean_descriptors"])) is first
    dated = {"clean_descriptors", "retain_uids", "retain_longitudinal_modified_dates"}
    assert first.options == dated


# -- validation --------------------------------------------------------------------------------


def test_unknown_option_suggests() -> None:
    expected = r"option 'retain_uid'.*did you mean 'retain_uids'.*valid: .*clean_graphics"
    with pytest.raises(ValueError, match=expected):
        build_profile(["retain_uid"])


def test_unknown_date_mode_suggests() -> None:
    with pytest.raises(ValueError, match=r"date mode 'shfit'.*did you mean 'shift'"):
        build_profile([], dates="shfit")
    assert DATE_MODES == ("shift", "remove", "keep")


@pytest.mark.parametrize(
    ("options", "dates"),
    [
        (["retain_longitudinal_full_dates"], "shift"),
        (["retain_longitudinal_modified_dates"], "keep"),
        (["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"], "remove"),
    ],
)
def test_both_date_options_rejected(options: list[str], dates: str) -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        build_profile(options, dates=dates)


def test_date_option_given_explicitly_with_remove() -> None:
    profile = build_profile(["retain_longitudinal_full_dates"], dates="remove")
    assert rule(profile, STUDY_DATE).action is Action.KEEP
