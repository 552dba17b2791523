"""Hostile inputs through ``anonpipe anonymize``: seeded mutants of generated studies.

Bit flips, truncations, wrong and invalid VRs, renamed tags, over-long values, text in binary
elements, sequences nested hundreds of levels deep and identifiers in public elements the
standard does not define (:mod:`tests.harness.mutants`). No mutant may stop the batch, every file
must come out clean or quarantined with a reason, and no planted identifier (UIDs included) may
survive in a clean file, in the command's output or in a quarantine reason.

The command runs in process; its workers are forked, so output is captured at the file
descriptors (``capfd``): what the workers log is checked too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from anonpipe.anon.identity import keyed_uid
from anonpipe.cli import main
from tests.harness.leakcheck import describe_holders
from tests.harness.mutants import DEEP_NESTING_KINDS, UNKNOWN_PUBLIC_KINDS, Mutant, mutate
from tests.harness.studygen import TINY, Manifest, generate

pytestmark = pytest.mark.timeout(180)

STUDY_SEED = 20260611
#: The campaign's seed; ANONPIPE_MUTANT_SEED runs another (a sweep: for s in 1 2 3 ...).
MUTANT_SEED = int(os.environ.get("ANONPIPE_MUTANT_SEED", "7411"))
MUTANT_COUNT = 300
SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)
_SUMMARY = re.compile(
    r"^(\d+) files: (\d+) clean, (?:(\d+) duplicates, )?(\d+) quarantined, (\d+) errors$", re.M
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate(
        tmp_path_factory.mktemp("studies"),
        patients=2,
        studies_per_patient=2,
        series_per_study=2,
        instances_per_series=4,
        size=TINY,
        transfer_syntaxes=SYNTAXES,
        seed=STUDY_SEED,
    )


@pytest.fixture(scope="module")
def mutants(generated: Manifest, tmp_path_factory: pytest.TempPathFactory) -> list[Mutant]:
    return mutate(generated, tmp_path_factory.mktemp("mutants"), MUTANT_COUNT, MUTANT_SEED)


@dataclass
class Batch:
    """One ``anonpipe anonymize`` over a folder, and what it left on disk."""

    inputs: list[Path]
    code: int
    out: str
    err: str
    dest: Path
    quarantine: Path
    key: bytes
    records: dict[Path, dict[str, str | None]] = field(default_factory=dict)

    def summary(self) -> tuple[int, int, int, int, int]:
        """(total, clean, duplicates, quarantined, errors) from the summary line."""
        match = _SUMMARY.search(self.out)
        assert match, f"no summary line in the output:\n{self.out}\n{self.err[-4000:]}"
        total, clean, duplicates, quarantined, errors = (int(g or 0) for g in match.groups())
        return total, clean, duplicates, quarantined, errors

    def outputs(self) -> dict[str, Path]:
        """Clean files by name (the new SOP Instance UID)."""
        return {p.stem: p for p in sorted(self.dest.rglob("*.dcm"))}

    def output_of(self, mutant: Mutant) -> Path | None:
        """The clean file named after the mutant's own SOP Instance UID, if any."""
        return self.outputs().get(keyed_uid(self.key, mutant.sop_instance_uid))


def _anonymize(inputs: Iterable[Path], work: Path, capfd: pytest.CaptureFixture[str]) -> Batch:
    """Copy `inputs` into one folder and run the command on it (2 jobs, debug logging)."""
    src = work / "src"
    src.mkdir(parents=True)
    copies = []
    for path in inputs:
        copies.append(src / path.name)
        shutil.copyfile(path, copies[-1])
    config = work / "anonpipe.toml"
    config.write_text(
        f'[pipeline]\ndata_dir = "{work}/data"\n'
        f'[anon]\nidentity_db = "{work}/id.db"\nkey_file = "{work}/anon.key"\n'
        'allowed_modalities = ["CT", "MR"]\n'
        '[logging]\nlevel = "debug"\n'
    )
    dest, quarantine = work / "out", work / "quarantine"
    capfd.readouterr()
    try:
        code = main(["anonymize", "-c", str(config), str(src), str(dest), "--jobs", "2"])
    except Exception as exc:  # the finding: report it with where it was raised
        captured = capfd.readouterr()
        pytest.fail(
            f"anonpipe anonymize raised {type(exc).__name__}: {exc}\n"
            f"{traceback.format_exc()}\nstdout:\n{captured.out}\nstderr:\n{captured.err[-4000:]}"
        )
    captured = capfd.readouterr()
    key = bytes.fromhex((work / "anon.key").read_text().strip())
    batch = Batch(copies, code, captured.out, captured.err, dest, quarantine, key)
    for record in sorted(quarantine.glob("*.json")):
        data = json.loads(record.read_text())
        batch.records[Path(data["source"])] = data
    return batch


def _leaks(text: str | bytes, generated: Manifest, mutants: Iterable[Mutant]) -> set[str]:
    """Planted identifiers (UIDs included) and mutant SOP Instance UIDs found in `text`."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    found = generated.find_planted(data, uids=True)
    found |= {m.sop_instance_uid for m in mutants if m.sop_instance_uid.encode() in data}
    return found


def _describe(mutant: Mutant) -> str:
    return f"{mutant.path.name} ({mutant.kind}: {mutant.note}; from {mutant.source})"


def _expected_name(batch: Batch, path: Path) -> str | None:
    """The clean file name the engine gives the file at `path`: keyed SOP Instance UID."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return keyed_uid(batch.key, str(ds.SOPInstanceUID))
    except Exception:
        return None


def test_no_mutant_stops_the_batch_or_leaks(
    generated: Manifest, mutants: list[Mutant], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """All problems are collected, then reported together with the command's summary."""
    batch = _anonymize([m.path for m in mutants], tmp_path, capfd)
    shown = f"exit {batch.code}\n{batch.out}"
    by_copy = dict(zip(batch.inputs, mutants, strict=True))
    total, clean, duplicates, quarantined, errors = batch.summary()
    problems = []
    if batch.code not in (0, 1):
        problems.append(f"exit code {batch.code}")

    # every input is accounted for: summary, quarantine folder, clean folder
    if total != len(mutants) or clean + duplicates + quarantined + errors != total:
        problems.append(f"the summary does not add up to {len(mutants)} inputs")
    parked = sorted(batch.quarantine.glob("*.dcm"))
    for path in parked:
        beside = path.with_suffix(".json")
        if not beside.exists() or not json.loads(beside.read_text()).get("reason"):
            problems.append(f"quarantined {path.name} has no reason beside it")
    if not set(batch.records) <= set(by_copy):
        problems.append("a quarantine record names a file that was not an input")
    if len(parked) != quarantined or len(batch.records) != quarantined:
        problems.append(
            f"{quarantined} quarantined, but {len(parked)} files, {len(batch.records)} records"
        )
    outputs = batch.outputs()
    if len(outputs) + len(parked) + duplicates != len(mutants):
        problems.append(
            f"{len(outputs)} clean files + {len(parked)} quarantined + {duplicates} duplicates "
            f"!= {len(mutants)} inputs"
        )
    # each input not quarantined has its clean file, named after its SOP Instance UID
    kept = [copy for copy in batch.inputs if copy not in batch.records]
    names = {copy: _expected_name(batch, copy) for copy in kept}
    problems += [
        f"neither clean nor quarantined: {_describe(by_copy[copy])}"
        for copy in kept
        if names[copy] not in outputs
    ]
    if len(kept) - len(set(names.values())) != duplicates:
        problems.append(
            f"{duplicates} duplicates reported, {len(kept) - len(set(names.values()))} expected"
        )

    # nothing planted survives: clean files, the command's output, the quarantine reasons
    origin = {name: by_copy[copy] for copy, name in names.items()}
    for name, path in outputs.items():
        found = _leaks(path.read_bytes(), generated, mutants)
        if found:
            mutant = origin.get(name)
            described = _describe(mutant) if mutant else path.name
            problems.append(
                f"clean file leaks: {described}: {describe_holders(path, sorted(found))}"
            )
    if _leaks(batch.out + batch.err, generated, mutants):
        problems.append("the command printed a planted identifier")
    for source, record in batch.records.items():
        for field_name in ("reason", "detail"):
            if _leaks(str(record.get(field_name) or ""), generated, mutants):
                problems.append(f"quarantine {field_name} holds PHI: {_describe(by_copy[source])}")
    assert not problems, "\n".join(problems) + f"\n\n{shown}"


def test_unknown_public_elements_come_out_clean_without_the_planted_value(
    generated: Manifest, mutants: list[Mutant], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    selected = [m for m in mutants if m.kind in UNKNOWN_PUBLIC_KINDS]
    assert len(selected) >= 2 * len(UNKNOWN_PUBLIC_KINDS)
    batch = _anonymize([m.path for m in selected], tmp_path, capfd)
    assert batch.code == 0, batch.out
    problems = []
    for copy, mutant in zip(batch.inputs, selected, strict=True):
        record = batch.records.get(copy)
        output = batch.output_of(mutant)
        if record is not None:
            problems.append(f"{_describe(mutant)}: quarantined ({record['reason']})")
        elif output is None:
            problems.append(f"{_describe(mutant)}: no clean file")
        else:
            found = _leaks(output.read_bytes(), generated, mutants)
            if found:
                problems.append(
                    f"{_describe(mutant)}: leaks {describe_holders(output, sorted(found))}"
                )
    assert not problems, f"{len(problems)} of {len(selected)}:\n" + "\n".join(problems)


def test_deep_nesting_is_quarantined_and_the_batch_goes_on(
    generated: Manifest, mutants: list[Mutant], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    deep = [m for m in mutants if m.kind in DEEP_NESTING_KINDS]
    assert len(deep) >= 2 * len(DEEP_NESTING_KINDS)
    originals = tmp_path / "originals"
    originals.mkdir()
    plain = []
    for index, path in enumerate(generated.paths):  # interleaved with the deep ones
        plain.append(originals / f"{index:04d}-original.dcm")
        shutil.copyfile(path, plain[-1])
    batch = _anonymize([m.path for m in deep] + plain, tmp_path / "run", capfd)
    assert batch.code == 0, batch.out
    problems = []
    for copy, mutant in zip(batch.inputs, deep, strict=False):
        record = batch.records.get(copy)
        if record is None:
            problems.append(f"{_describe(mutant)}: not quarantined")
        elif "nest" not in str(record["reason"]).lower():
            problems.append(
                f"{_describe(mutant)}: reason {record['reason']!r} ({record['detail']!r})"
            )
    assert not problems, f"{len(problems)} of {len(deep)}:\n" + "\n".join(problems)
    _, clean, _, quarantined, _ = batch.summary()
    assert (clean, quarantined) == (len(plain), len(deep)), batch.out
    assert len(batch.outputs()) == len(plain)
