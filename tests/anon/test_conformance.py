"""``anonpipe conformance`` against the engine: what the statement says is what the engine does.

Generated studies (with overlays, curves and an animal patient added, so the repeating groups and
the IOD presence rule are exercised too) are de-identified with the engine under the settings the
statement is printed for; then every element of every input, at every depth, is held against the
statement's row for it: removed is absent, kept is equal, emptied is empty, a dummy has the stated
value, a UID is the keyed replacement (so consistent everywhere), a date moved by one offset per
patient, a white-listed value kept and any other one treated as the fallback says.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from anonpipe.anon.batch import engine_spec, run_batch
from anonpipe.anon.clean import STANDARD_UID_ROOT
from anonpipe.anon.deidentify import Outcome
from anonpipe.anon.identity import keyed_uid, load_or_create_key
from anonpipe.anon.values import known_tag, values_of
from anonpipe.anon.vocabulary import normalise
from anonpipe.cli import main
from anonpipe.config import load_settings
from tests.harness.studygen import PRIVATE_CREATOR, Manifest, generate

Row = Mapping[str, Any]
#: A Study Description without anyone's name in it, for the white list.
WHITE_LISTED = "CT HEAD W/O CONTRAST"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    generated = generate(
        tmp_path_factory.mktemp("in"),
        patients=2,
        studies_per_patient=1,
        series_per_study=2,
        instances_per_series=2,
        seed=20261201,
    )
    for index, path in enumerate(generated.paths):
        ds = pydicom.dcmread(path)
        if path in generated.patients[0].studies[0].paths:
            ds.StudyDescription = WHITE_LISTED  # generated ones carry the patient's name
        if index % 2 == 0:  # an overlay and a curve: the repeating-group rows
            ds.add_new(0x60000010, "US", 16)
            ds.add_new(0x60000011, "US", 16)
            ds.add_new(0x60003000, "OW", b"\x00\x01" * 16)
            ds.add_new(0x60004000, "LT", "OVERLAY BY DR PHIOVERLAY")
            ds.add_new(0x50000005, "US", 1)
        else:  # an animal: Responsible Person stays, emptied (supplement.json "presence")
            ds.PatientSpeciesDescription = "CANINE"
            ds.ResponsiblePerson = "PHIOWNER^FRED"
            ds.ResponsibleOrganization = "PHI KENNELS"
        ds.save_as(path)
    return generated


@dataclass
class Checked:
    """What the walk over one engine run verified, and what disagreed with the statement."""

    key: bytes
    index: Mapping[str, Row]
    vocabulary: Mapping[str, frozenset[str]]
    safe_private: frozenset[str]
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    offsets: dict[str, set[int]] = field(default_factory=dict)
    uids: dict[str, set[str]] = field(default_factory=dict)


def _config(directory: Path, anon: str = "") -> Path:
    path = directory / "anonpipe.toml"
    path.write_text(
        f'[pipeline]\ndata_dir = "{directory / "data"}"\n'
        f'[anon]\nidentity_db = "{directory / "identity.db"}"\n'
        f'key_file = "{directory / "anon.key"}"\n{anon}',
        encoding="utf-8",
    )
    return path


def _statement(config: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["conformance", "-c", str(config), "--format", "json"]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def _deidentify(config: Path, manifest: Manifest, out: Path) -> tuple[list[Outcome], bytes]:
    settings = load_settings(config, {})
    key = load_or_create_key(settings.anon.key_file)
    outcomes: list[Outcome] = []
    spec = engine_spec(settings.anon, key)
    run_batch(list(manifest.paths), out / "clean", out / "quarantine", spec, 1, outcomes.append)
    return outcomes, key


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _empty(element: DataElement) -> bool:
    return element.value is None or len(element.value) == 0


def _index(statement: Mapping[str, Any]) -> dict[str, Row]:
    """The statement's rows by tag text, repeating-group pattern, or ``unlisted:<kind>``."""
    index: dict[str, Row] = {row["tag"]: row for row in statement["attributes"]}
    index.update({row["tag"]: row for row in statement["groups"]})
    index.update({f"unlisted:{row['kind']}": row for row in statement["unlisted"]})
    return index


def _row_for(element: DataElement, index: Mapping[str, Row]) -> Row:
    """The statement's row for `element`: its tag's, its repeating group's, or the unlisted kind."""
    tag: BaseTag = element.tag
    if tag.is_private:
        return index["(gggg,eeee), gggg odd"]
    if tag.group & 0xFFE1 == 0x6000:
        pattern = {0x3000: "(60xx,3000)", 0x4000: "(60xx,4000)"}.get(tag.element)
        return index[pattern or "(60xx,eeee) other"]
    if tag.group & 0xFFE1 == 0x5000:
        return index["(50xx,xxxx)"]
    row = index.get(_tag(tag))
    if row is not None:
        return row
    kind = {"UI": "uid", "DA": "date", "DT": "date", "SQ": "sequence"}.get(element.VR)
    return index["unlisted:" + (kind or ("known" if known_tag(int(tag)) else "unknown"))]


def _creator(element: DataElement, parent: Dataset) -> str:
    tag = element.tag
    if tag.is_private_creator:
        return str(element.value).strip().casefold()
    creator = parent.get(BaseTag((tag.group << 16) | (tag.element >> 8)))
    return "" if creator is None else str(creator.value).strip().casefold()


def _compare(
    source: Dataset, output: Dataset, statement: Mapping[str, Any], seen: Checked, patient: str
) -> None:
    recorded = {row["tag"] for row in statement["recorded"]}
    for element in source:
        tag = element.tag
        if tag.element == 0 or _tag(tag) in recorded:
            continue  # group lengths are recomputed; recorded values are checked elsewhere
        row = _row_for(element, seen.index)
        what = row["treatment"]
        if what == "safe-private":
            safe = _creator(element, source) in seen.safe_private
            what = ("items-cleaned" if element.VR == "SQ" else "kept") if safe else "removed"
        if row.get("kept_empty_when") and any(
            t in {_tag(e.tag) for e in source} for t in row["kept_empty_when"]
        ):
            what = "emptied"
        if what == "white-list":
            allowed = seen.vocabulary.get(_tag(tag), frozenset())
            values = values_of(element.value)
            listed = bool(values) and all(normalise(str(v)) in allowed for v in values)
            what = "kept" if listed else row["otherwise"]
            seen.counts["white-list " + ("kept" if listed else "not listed")] += 1
        _verify(what, row, element, output.get(tag), statement, seen, patient)


def _verify(
    what: str,
    row: Row,
    element: DataElement,
    out: DataElement | None,
    statement: Mapping[str, Any],
    seen: Checked,
    patient: str,
) -> None:
    label = f"{_tag(element.tag)} {keyword_for_tag(element.tag) or ''} stated {what}"
    seen.counts[what] += 1
    if what == "removed":
        ok = out is None
    elif out is None:
        ok = False
    elif what == "emptied":
        ok = _empty(out)
    elif what == "kept":
        ok = out.value == element.value
    elif what == "dummy":
        ok = str(out.value) == row["value"]
    elif what == "pseudonym":
        ok = _empty(element) or (not _empty(out) and str(out.value) != str(element.value))
    elif what == "new-uid":
        ok = _new_uids(element, out, seen)
    elif what == "date-shifted":
        ok = _shifted(element, out, seen, patient)
    elif what == "items-cleaned":
        ok = out.VR == "SQ" and len(out.value) == len(element.value)
        for item, cleaned in zip(element.value, out.value, strict=False):
            _compare(item, cleaned, statement, seen, patient)
    else:
        ok = False
    if not ok:
        seen.problems.append(label)


def _new_uids(element: DataElement, out: DataElement, seen: Checked) -> bool:
    before, after = values_of(element.value), values_of(out.value)
    for original, new in zip(before, after, strict=False):
        seen.uids.setdefault(str(original), set()).add(str(new))
    return len(before) == len(after) and all(
        str(new)
        == (str(old) if str(old).startswith(STANDARD_UID_ROOT) else keyed_uid(seen.key, str(old)))
        for old, new in zip(before, after, strict=True)
    )


def _day(text: str) -> dt.date:
    return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def _shifted(element: DataElement, out: DataElement, seen: Checked, patient: str) -> bool:
    before, after = values_of(element.value), values_of(out.value)
    if len(before) != len(after):
        return False
    for old, new in zip(before, after, strict=True):
        offset = (_day(str(new)) - _day(str(old))).days
        seen.offsets.setdefault(patient, set()).add(offset)
        if offset == 0 or str(new)[8:] != str(old)[8:]:
            return False
    return True


def _check_run(
    manifest: Manifest, statement: Mapping[str, Any], outcomes: list[Outcome], seen: Checked
) -> None:
    clean = [o for o in outcomes if o.status == "clean"]
    assert len(clean) == len(manifest.paths), [(o.reason, o.detail) for o in outcomes]
    rows = {row["tag"]: row for row in statement["attributes"]}
    recorded = {row["name"]: row["value"] for row in statement["recorded"]}
    for outcome in clean:
        assert outcome.output is not None
        source, output = pydicom.dcmread(outcome.source), pydicom.dcmread(outcome.output)
        _compare(source, output, statement, seen, str(source.PatientID))
        meta_row = rows["(0002,0003)"]
        meta = DataElement(0x00020003, "UI", source.file_meta.MediaStorageSOPInstanceUID)
        _verify(meta_row["treatment"], meta_row, meta, output.file_meta[0x00020003], {}, seen, "")
        assert "SourceApplicationEntityTitle" not in output.file_meta  # rebuilt, not carried
        assert output.PatientIdentityRemoved == recorded["PatientIdentityRemoved"]
        assert "\\".join(output.DeidentificationMethod) == recorded["DeidentificationMethod"]
        codes = ", ".join(
            f"{c.CodingSchemeDesignator} {c.CodeValue}"
            for c in output.DeidentificationMethodCodeSequence
        )
        assert codes == recorded["DeidentificationMethodCodeSequence"]
        assert (
            output.LongitudinalTemporalInformationModified
            == recorded["LongitudinalTemporalInformationModified"]
        )
    assert not seen.problems, f"{len(seen.problems)} disagreements, e.g. {seen.problems[:10]}"
    assert all(len(new) == 1 for new in seen.uids.values()), "a UID replaced inconsistently"


def test_the_default_statement_holds_for_the_engine(
    manifest: Manifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    statement = _statement(config, capsys)
    assert [o["code"] for o in statement["options"]] == ["113107", "113105"]
    outcomes, key = _deidentify(config, manifest, tmp_path)
    seen = Checked(key, _index(statement), {}, frozenset())
    _check_run(manifest, statement, outcomes, seen)
    for treatment in (
        "removed", "emptied", "kept", "dummy", "pseudonym", "new-uid", "date-shifted",
        "items-cleaned",
    ):  # fmt: skip
        assert seen.counts[treatment] > 0, (treatment, seen.counts)
    assert seen.counts["white-list not listed"] > 0
    # one date offset per patient, never zero
    assert len(seen.offsets) == 2 and all(len(o) == 1 for o in seen.offsets.values())


def test_another_option_set_holds_too(
    manifest: Manifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Full dates, safe private, device, institution and patient characteristics kept, and a
    white list for the descriptors."""
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(
        json.dumps({"0008,1030": ["ct head w/o contrast"], "0008,103e": ["NOT ANY SERIES"]}),
        encoding="utf-8",
    )
    options = [
        "clean_descriptors",
        "retain_safe_private",
        "retain_device_identity",
        "retain_institution_identity",
        "retain_patient_characteristics",
    ]
    config = _config(
        tmp_path,
        f'dates = "keep"\noptions = {json.dumps(options)}\n'
        f'safe_private = ["{PRIVATE_CREATOR}"]\nlimited_vocabulary = "{vocabulary}"\n',
    )
    statement = _statement(config, capsys)
    assert {o["code"] for o in statement["options"]} == {
        "113105", "113111", "113109", "113112", "113108", "113106",
    }  # fmt: skip
    assert statement["white_lists"]["(0008,1030)"] == [normalise(WHITE_LISTED)]
    outcomes, key = _deidentify(config, manifest, tmp_path)
    lists = {tag: frozenset(values) for tag, values in statement["white_lists"].items()}
    seen = Checked(key, _index(statement), lists, frozenset(statement["safe_private"]))
    _check_run(manifest, statement, outcomes, seen)
    assert seen.counts["white-list kept"] > 0 and seen.counts["white-list not listed"] > 0
    assert seen.counts["date-shifted"] == 0 and not seen.offsets  # full dates: kept
    private = [r for r in statement["groups"] if r["tag"].startswith("(gggg")]
    assert private[0]["treatment"] == "safe-private"


def test_markdown_is_a_document_with_the_attribute_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    assert main(["conformance", "-c", str(config)]) == 0
    text = capsys.readouterr().out
    for heading in (
        "# De-identification statement",
        "## Profile and options",
        "## Attributes of Table E.1-1",
        "## Repeating groups and private attributes",
        "## UIDs",
        "## White lists (Clean Descriptors)",
        "## Quarantine",
        "## Residual-PHI gate",
        "## identity.db and the key",
        "## Identified copies on disk",
    ):
        assert f"\n{heading}\n" in f"\n{text}", heading
    assert "| (0010,0010) | Patient's Name | Z | replaced by a keyed pseudonym" in text
    assert "Clean Descriptors Option (DCM 113105)" in text
    assert "| patient protocol series | SeriesDescription | contains | patient protocol |" in text
    assert f"`{tmp_path / 'identity.db'}`, not created yet" in text
    assert "`from_staging/`" in text and "clean-data --before" in text


def test_who_can_read_identity_db_and_the_key_is_stated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    key = tmp_path / "anon.key"
    load_or_create_key(key)
    statement = _statement(config, capsys)
    assert statement["key_file"]["exists"] and statement["key_file"]["mode"] == "0600"
    assert statement["key_file"]["readable_by"].startswith("user ")
    key.chmod(0o640)
    assert "group" in _statement(config, capsys)["key_file"]["readable_by"]
    assert not statement["identity_db"]["exists"]


def test_an_unknown_format_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["conformance", "-c", str(_config(tmp_path)), "--format", "html"]) == 2
