"""The engine on DICOM files nobody here wrote, judged by checks that share nothing with it.

The whole public corpus (:mod:`tests.harness.corpus`: pydicom's, pydicom-data's and deid-data's
test files and dicom3tools' example) goes through :func:`run_batch` once. The verdicts come from
the tests' own leak definition (:mod:`tests.harness.leakcheck`), from ``dciodvfy``
(:mod:`tests.harness.dciodvfy`) and from plain pydicom reads of inputs and outputs.

Set ``ANONPIPE_CORPUS_REPORT`` to a file path to get the per-collection summary as JSON.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from anonpipe.anon.batch import Engine, EngineSpec, run_batch
from anonpipe.anon.deidentify import Outcome, deidentify_file
from anonpipe.anon.identity import load_or_create_key
from tests.harness import dciodvfy
from tests.harness.corpus import copy_corpus
from tests.harness.leakcheck import find_leaks, identifying_values, product_names

pytestmark = pytest.mark.timeout(300)

#: Residual-PHI quarantines without an identifier behind them, as a share of all files.
MAX_FALSE_POSITIVE_SHARE = 0.01

REPORT_ENV = "ANONPIPE_CORPUS_REPORT"


@dataclass
class CorpusRun:
    """One batch over the whole corpus: inputs by collection, outcomes by input."""

    root: Path
    collections: dict[str, list[Path]]
    outcomes: dict[Path, Outcome]
    clean_dir: Path
    quarantine_dir: Path
    spec: EngineSpec
    _values: dict[Path, dict[str, set[str]]] = field(default_factory=dict)
    _products: dict[Path, set[str]] = field(default_factory=dict)

    @cached_property
    def collection_of(self) -> dict[Path, str]:
        return {path: name for name, paths in self.collections.items() for path in paths}

    @property
    def files(self) -> list[Path]:
        return [path for paths in self.collections.values() for path in paths]

    def with_status(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.status == status]

    def values(self, source: Path) -> dict[str, set[str]]:
        """Identifying values of an input -> the element paths they sit in (cached)."""
        if source not in self._values:
            self._values[source] = identifying_values(source)
        return self._values[source]

    def leaks(self, source: Path, output: Path) -> set[str]:
        """Identifying values of `source` found in `output` (see :mod:`tests.harness.leakcheck`)."""
        if source not in self._products:
            self._products[source] = product_names(source)
        return find_leaks(self.values(source), output, self._products[source])

    def name(self, source: Path) -> str:
        """A stable short name: ``collection/path inside it``."""
        return str(source.relative_to(self.root))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusRun:
    tmp = tmp_path_factory.mktemp("corpus")
    collections = copy_corpus(tmp / "in")
    if not collections:
        pytest.skip("no public DICOM collection installed")
    spec = EngineSpec(
        identity_db=tmp / "identity.db",
        key=load_or_create_key(tmp / "anon.key"),
        options=("clean_descriptors",),
        dates="shift",
        allowed_modalities=("*",),
    )
    clean_dir, quarantine_dir = tmp / "clean", tmp / "quarantine"
    files = [path for paths in collections.values() for path in paths]
    outcomes: list[Outcome] = []
    run_batch(files, clean_dir, quarantine_dir, spec, jobs=2, on_outcome=outcomes.append)
    return CorpusRun(
        tmp / "in",
        collections,
        {o.source: o for o in outcomes},
        clean_dir,
        quarantine_dir,
        spec,
    )


def _summary(corpus: CorpusRun) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name, paths in corpus.collections.items():
        outcomes = [corpus.outcomes[p] for p in paths if p in corpus.outcomes]
        statuses: Counter[str] = Counter(o.status for o in outcomes)
        quarantined = Counter(o.reason or "unknown" for o in outcomes if o.status == "quarantined")
        errors = Counter(o.reason or "unknown" for o in outcomes if o.status == "error")
        summary[name] = {
            "files": len(paths),
            "clean": statuses["clean"],
            "quarantined": dict(sorted(quarantined.items())),
            "duplicates": statuses["duplicate"],
            "errors": dict(sorted(errors.items())),
            "no outcome": len(paths) - len(outcomes),
        }
    return summary


def test_summary_per_collection(corpus: CorpusRun) -> None:
    """Print (and, with ANONPIPE_CORPUS_REPORT, write as JSON) what happened per collection."""
    summary = _summary(corpus)
    for name, row in summary.items():
        reasons = ", ".join(f"{r}: {n}" for r, n in row["quarantined"].items()) or "none"
        print(
            f"{name}: {row['files']} files, {row['clean']} clean, {row['duplicates']} duplicates, "
            f"{sum(row['quarantined'].values())} quarantined ({reasons}), errors {row['errors']}"
        )
    report = os.environ.get(REPORT_ENV)
    if report:
        Path(report).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    assert sum(row["files"] for row in summary.values()) == len(corpus.files)


def test_every_file_is_accounted_for(corpus: CorpusRun) -> None:
    missing = [corpus.name(p) for p in corpus.files if p not in corpus.outcomes]
    assert not missing, f"no outcome for {missing}"
    statuses: Counter[str] = Counter(o.status for o in corpus.outcomes.values())
    errors = [
        f"{corpus.name(o.source)}: {o.reason} ({o.detail})" for o in corpus.with_status("error")
    ]
    assert not errors, "error outcomes:\n" + "\n".join(errors)
    handled = statuses["clean"] + statuses["quarantined"] + statuses["duplicate"]
    assert handled == len(corpus.files), f"statuses {dict(statuses)} for {len(corpus.files)} files"


def test_outputs_written_equal_files_reported_clean(corpus: CorpusRun) -> None:
    written = sorted(corpus.clean_dir.rglob("*.dcm")) if corpus.clean_dir.exists() else []
    clean = corpus.with_status("clean")
    if len(written) != len(clean):
        by_output: dict[Path | None, list[str]] = {}
        for o in clean:
            by_output.setdefault(o.output, []).append(corpus.name(o.source))
        shared = [", ".join(v) for v in by_output.values() if len(v) > 1]
        pytest.fail(
            f"{len(written)} files under the clean folder, {len(clean)} outcomes 'clean'; "
            f"{len(shared)} outputs claimed by more than one clean input (the later overwrote "
            "the earlier):\n  " + "\n  ".join(shared)
        )


def test_no_identifying_value_of_an_input_is_in_its_output(corpus: CorpusRun) -> None:
    clean = corpus.with_status("clean")
    assert clean, "no file came out clean"
    found: list[str] = []
    for o in clean:
        assert o.output is not None
        values = corpus.values(o.source)
        for value in sorted(corpus.leaks(o.source, o.output)):
            where = ", ".join(sorted(values[value]))
            found.append(
                f"{corpus.name(o.source)} [{corpus.collection_of[o.source]}] {where}: {value!r}"
            )
    assert not found, f"{len(found)} leaks:\n" + "\n".join(found)


def _rerun_without_gate(corpus: CorpusRun, source: Path, scratch: Path) -> Outcome:
    """The engine on one file with the residual-PHI gate off (output written regardless)."""
    engine = Engine(corpus.spec)
    try:
        return deidentify_file(
            source,
            scratch / "clean",
            scratch / "quarantine",
            engine.recipe,
            engine.rules,
            engine.store,
            durable=False,
            residual_gate=False,
        )
    finally:
        engine.close()


def test_residual_phi_quarantines_have_an_identifier_behind_them(
    corpus: CorpusRun, tmp_path: Path
) -> None:
    gated = [
        o for o in corpus.with_status("quarantined") if (o.reason or "").startswith("residual PHI")
    ]
    false_positives: list[str] = []
    undecided: list[str] = []
    for index, o in enumerate(gated):
        outcome = _rerun_without_gate(corpus, o.source, tmp_path / str(index))
        if outcome.status != "clean" or outcome.output is None:
            undecided.append(
                f"{corpus.name(o.source)}: without the gate {outcome.status} "
                f"{outcome.reason} ({outcome.detail})"
            )
            continue
        leaked = corpus.leaks(o.source, outcome.output)
        print(
            f"  {corpus.name(o.source)}: gate said {o.detail}; identifiers without the "
            f"gate: {len(leaked)}"
        )
        if not leaked:
            false_positives.append(f"{corpus.name(o.source)}: gate said {o.detail}")
    print(f"{len(gated)} residual-PHI quarantines, {len(false_positives)} without an identifier")
    limit = MAX_FALSE_POSITIVE_SHARE * len(corpus.files)
    problems = []
    if len(false_positives) > limit:
        problems.append(
            f"{len(false_positives)} of {len(corpus.files)} files quarantined for residual PHI "
            f"with no identifier in the output (limit {limit:.1f}):\n  "
            + "\n  ".join(false_positives)
        )
    if undecided:
        problems.append("could not judge (gate off, still not clean):\n  " + "\n  ".join(undecided))
    assert not problems, "\n".join(problems)


_VALUE = re.compile(r"= <[^>]*>")


def _normalized(line: str) -> str:
    """An error line with its values (``<...>``: UIDs, dates that change) blanked."""
    return _VALUE.sub("= <>", line)


def test_no_output_is_less_valid_than_its_input(corpus: CorpusRun) -> None:
    if not dciodvfy.available():
        pytest.skip("dciodvfy (dicom3tools) not installed")
    # an output several inputs were written to (same SOP Instance UID) holds the last one's
    # content: its comparison with any one input means nothing (the count test reports these)
    claims = Counter(o.output for o in corpus.with_status("clean"))
    pairs = [
        (o.source, o.output)
        for o in corpus.with_status("clean")
        if o.output is not None and claims[o.output] == 1
    ]
    with ThreadPoolExecutor(2) as pool:
        before = list(pool.map(dciodvfy.errors, [source for source, _ in pairs]))
        after = list(pool.map(dciodvfy.errors, [output for _, output in pairs]))
    worse: list[str] = []
    for (source, _), old, new in zip(pairs, before, after, strict=True):
        if len(new) > len(old):
            added = Counter(map(_normalized, new)) - Counter(map(_normalized, old))
            lines = "\n    ".join(sorted(added.elements()))
            worse.append(f"{corpus.name(source)}: {len(old)} -> {len(new)} errors\n    {lines}")
    assert not worse, f"{len(worse)} outputs with more dciodvfy errors:\n" + "\n".join(worse)


def _read(path: Path) -> Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:  # not DICOM, truncated: not a reference target or source
            return None


def _references(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(path, uid)`` of every Referenced SOP Instance UID value outside private elements."""
    for tag in list(ds.keys()):
        if tag.is_private or tag == 0x7FE00010:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                element = ds[tag]
        except Exception:  # a value pydicom cannot convert holds no reference we can judge
            continue
        path = f"{prefix}{element.keyword or tag}"
        if element.VR == "SQ":
            for index, item in enumerate(element.value or ()):
                yield from _references(item, f"{path}[{index}].")
        elif element.keyword == "ReferencedSOPInstanceUID":
            values = element.value if element.VM > 1 else [element.value]
            for i, v in enumerate(values):
                if v:
                    yield f"{path}#{i}", str(v).strip(" \x00")


def test_every_reference_between_inputs_resolves_between_outputs(corpus: CorpusRun) -> None:
    """A Referenced SOP Instance UID naming another input must name that input's output.

    Judged per instance (SOP Instance UID), not per file: the corpus holds the same instance in
    several files (transfer syntax variants), of which one is written and the others are
    duplicates or quarantined; what must hold is that the written copy of the referring
    instance points at the written copy of the referenced one.
    """
    headers = {path: _read(path) for path in corpus.files}
    by_uid: dict[str, list[Path]] = {}
    for path, ds in headers.items():
        if ds is not None and "SOPInstanceUID" in ds:
            by_uid.setdefault(str(ds.SOPInstanceUID), []).append(path)

    def written(uid: str) -> list[Outcome]:
        found = (corpus.outcomes.get(p) for p in by_uid[uid])
        return [o for o in found if o is not None and o.status == "clean" and o.output]

    def states(uid: str) -> str:
        found = (corpus.outcomes.get(p) for p in by_uid[uid])
        return "; ".join(f"{o.status} {o.reason or ''}".strip() for o in found if o is not None)

    broken: set[str] = set()
    checked = 0
    for path, ds in headers.items():
        if ds is None:
            continue
        own = str(ds.get("SOPInstanceUID", ""))
        refs = [(where, uid) for where, uid in _references(ds) if uid in by_uid and uid != own]
        if not refs:
            continue
        copies = written(own)
        if not copies:
            broken.add(
                f"{corpus.name(path)} refers to other inputs but no copy of it was "
                f"written ({states(own)})"
            )
            continue
        for copy in copies:
            assert copy.output is not None
            output = _read(copy.output)
            assert output is not None, f"output of {corpus.name(copy.source)} is unreadable"
            in_output = dict(_references(output))
            for where, uid in refs:
                checked += 1
                targets = written(uid)
                names = ", ".join(corpus.name(t) for t in by_uid[uid])
                if not targets:
                    broken.add(
                        f"{corpus.name(copy.source)} {where} -> {names}: not written "
                        f"({states(uid)})"
                    )
                elif in_output.get(where) not in {t.sop_instance_uid for t in targets}:
                    broken.add(
                        f"{corpus.name(copy.source)} {where} -> {names}: output has "
                        f"{in_output.get(where)!r}, target written as {targets[0].sop_instance_uid}"
                    )
    print(f"{checked} references between written instances checked")
    assert not broken, f"{len(broken)} broken references:\n" + "\n".join(sorted(broken))
