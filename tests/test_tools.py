"""Tests for the helper commands: ``anonpipe clean-data``, ``filter`` and ``summary``.

Everything runs through :func:`anonpipe.cli.main` on real files: generated DICOM studies and run
directories made with :class:`~anonpipe.daemon.rundir.RunDir`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from datetime import date, datetime
from pathlib import Path

import pytest
from pydicom import dcmread

from anonpipe.cli import main
from anonpipe.daemon.rundir import RunDir
from anonpipe.tools.cleandata import format_size, parse_day
from anonpipe.tools.filtering import move_file
from anonpipe.tools.summary import MISSING
from tests.harness.studygen import Manifest, generate


def config(directory: Path) -> Path:
    path = directory / "anonpipe.toml"
    path.write_text(f'[pipeline]\ndata_dir = "{directory / "data"}"\n', encoding="utf-8")
    return path


def epoch(day: str, hour: int = 12) -> float:
    """Seconds since the epoch at `hour` o'clock, local time, on `day`."""
    return datetime.combine(date.fromisoformat(day), datetime.min.time()).timestamp() + hour * 3600


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------ clean-data


def make_run(data_dir: Path, day: str, *, finished: bool = True, hour: int = 12) -> RunDir:
    """A run started on `day` with a file in each data folder and some audit text files."""
    run = RunDir.create(data_dir, now=epoch(day, hour))
    for folder in (run.from_staging, run.quarantine, run.to_production):
        (folder / "study").mkdir()
        (folder / "study" / "i0.dcm").write_bytes(b"x" * 1000)
    (run.quarantine / "i0.dcm.json").write_text("{}", encoding="utf-8")
    (run.path / "no_encounter").mkdir()
    (run.path / "no_encounter" / "i1.dcm").write_bytes(b"y" * 500)
    run.overview("Starting at ...")
    run.write_lines("studies_to_retrieve.txt", ["1.2.3"])
    if finished:
        run.finish("Finished at ...")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, RunDir]:
    data_dir = tmp_path / "data"
    made = {
        "old": make_run(data_dir, "2024-01-10"),
        "late_evening": make_run(data_dir, "2024-01-31", hour=23),
        "unfinished": make_run(data_dir, "2024-01-11", finished=False),
        "new": make_run(data_dir, "2024-02-01", hour=0),
    }
    (data_dir / "identity.db").write_bytes(b"keep")
    (data_dir / "state.db").write_bytes(b"keep")
    (data_dir / "other").mkdir()
    (data_dir / "other" / "from_staging").mkdir()
    return made


def text_files(run: RunDir) -> set[str]:
    return {p.name for p in run.path.iterdir() if p.is_file()}


def test_clean_data_removes_the_folders_of_old_finished_runs_only(
    tmp_path: Path, runs: dict[str, RunDir], capsys: pytest.CaptureFixture[str]
) -> None:
    texts = {name: text_files(run) for name, run in runs.items()}
    assert main(["clean-data", "-c", str(config(tmp_path)), "--before", "2024-02-01"]) == 0
    out = capsys.readouterr().out.splitlines()

    for name in ("old", "late_evening"):
        run = runs[name]
        assert sorted(p.name for p in run.path.iterdir() if p.is_dir()) == []
        assert (
            text_files(run)
            == texts[name]
            == {
                "overview.txt",
                "studies_to_retrieve.txt",
                "done.txt",
            }
        )
        assert f"{run.name}: removed 4 folders, 5 files, 3.5 kB" in out
    for name in ("unfinished", "new"):
        run = runs[name]
        assert {p.name for p in run.path.iterdir() if p.is_dir()} == {
            "from_staging",
            "quarantine",
            "to_production",
            "no_encounter",
        }
        assert len(files_under(run.path)) == 5 + len(texts[name])
    unfinished = runs["unfinished"].name
    assert any(line.startswith(f"{unfinished}: skipped: not finished") for line in out), out
    assert not any(runs["new"].name in line for line in out)
    assert out[-1].startswith("total: removed 8 folders, 10 files, 7.0 kB from 2 runs")
    data_dir = tmp_path / "data"
    assert (data_dir / "identity.db").read_bytes() == b"keep"
    assert (data_dir / "state.db").read_bytes() == b"keep"
    assert (data_dir / "other" / "from_staging").is_dir()


def test_clean_data_dry_run_removes_nothing(
    tmp_path: Path, runs: dict[str, RunDir], capsys: pytest.CaptureFixture[str]
) -> None:
    before = files_under(tmp_path / "data")
    argv = ["clean-data", "-c", str(config(tmp_path)), "--before", "2024-02-01", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert files_under(tmp_path / "data") == before
    assert f"{runs['old'].name}: would remove 4 folders, 5 files, 3.5 kB" in out
    assert "total: would remove 8 folders, 10 files, 7.0 kB from 2 runs" in out
    assert "removed" not in out


def test_clean_data_twice_has_nothing_more_to_remove(
    tmp_path: Path, runs: dict[str, RunDir], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["clean-data", "-c", str(config(tmp_path)), "--before", "2024-01-11"]
    assert main(argv) == 0
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"{runs['old'].name}: nothing to remove" in out
    assert out[-1].startswith("total: removed 0 folders, 0 files, 0 B from 0 runs")


def test_clean_data_does_not_follow_a_symbolic_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.dcm").write_bytes(b"z")
    run = make_run(tmp_path / "data", "2024-01-10")
    shutil.rmtree(run.from_staging)
    shutil.rmtree(run.to_production)
    run.from_staging.symlink_to(outside)
    (run.path / "to_production").mkdir()
    (run.to_production / "link").symlink_to(outside)
    assert main(["clean-data", "-c", str(config(tmp_path)), "--before", "2024-01-11"]) == 0
    assert (outside / "precious.dcm").exists()
    assert run.from_staging.is_symlink()
    assert not run.to_production.exists()


@pytest.mark.parametrize("day", ["2024-13-01", "2024-02-30", "yesterday", "2024-1-5", "20240105"])
def test_clean_data_bad_date_is_a_usage_error(
    tmp_path: Path, day: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["clean-data", "-c", str(config(tmp_path)), "--before", day]) == 2
    err = capsys.readouterr().err
    assert "--before" in err
    assert "YYYY-MM-DD" in err


def test_clean_data_needs_the_date(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["clean-data", "-c", str(config(tmp_path))]) == 2
    assert "--before" in capsys.readouterr().err


def test_clean_data_before_is_midnight_local_time() -> None:
    assert parse_day("2024-02-01") == date(2024, 2, 1)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_day("2024-02-01T00:00")


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 999, 1000, 3500, 12_345_678, 1_500_000_000)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "3.5 kB",
        "12 MB",
        "1.5 GB",
    ]


# ---------------------------------------------------------------------------------- filter


@pytest.fixture(scope="module")
def study_set(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate(
        tmp_path_factory.mktemp("gen") / "in",
        patients=2,
        series_per_study=2,
        instances_per_series=2,
        seed=7,
    )


@pytest.fixture
def src(tmp_path: Path, study_set: Manifest) -> Path:
    """A fresh copy of the generated files, with a non-DICOM file and a hidden file."""
    root = tmp_path / "src"
    for path in study_set.paths:
        target = root / path.relative_to(study_set.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (root / "notes.txt").write_text("not DICOM", encoding="utf-8")
    (root / ".hidden.dcm").write_bytes(study_set.paths[0].read_bytes())
    return root


def relative(manifest: Manifest, paths: Iterable[Path]) -> set[str]:
    return {str(Path(p).relative_to(manifest.root)) for p in paths}


def run_filter(*argv: str) -> int:
    return main(["filter", *argv])


def test_filter_by_study_moves_keeping_relative_paths(
    tmp_path: Path, src: Path, study_set: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    study = study_set.studies[0]
    dest = tmp_path / "dest"
    before = files_under(src)
    assert run_filter(str(src), str(dest), "--studies", f" {study.study_instance_uid} ,") == 0
    moved = relative(study_set, study.paths)
    assert files_under(dest) == moved
    assert files_under(src) == before - moved
    assert "notes.txt" in files_under(src)
    out = capsys.readouterr().out
    assert "9 files, 4 matched, 4 moved, 1 unreadable (left in place)" in out


def test_filter_by_series_and_instances_together(
    tmp_path: Path, src: Path, study_set: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    series = study_set.studies[0].series[1]
    instances = [study_set.studies[1].instances[0], study_set.studies[1].instances[3]]
    dest = tmp_path / "dest"
    argv = [str(src), str(dest), "--series", series.series_instance_uid]
    argv += ["--instances", ",".join(i.sop_instance_uid for i in instances)]
    assert run_filter(*argv) == 0
    expected = relative(study_set, tuple(i.path for i in (*series.instances, *instances)))
    assert files_under(dest) == expected
    assert "4 matched, 4 moved" in capsys.readouterr().out


def test_filter_by_json_file(
    tmp_path: Path, src: Path, study_set: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    study = study_set.studies[1]
    instance = study_set.studies[0].instances[0]
    uids = tmp_path / "uids.json"
    selection = {"studies": [study.study_instance_uid], "instances": [instance.sop_instance_uid]}
    uids.write_text(json.dumps(selection), encoding="utf-8")
    dest = tmp_path / "dest"
    assert run_filter(str(src), str(dest), "--json", str(uids)) == 0
    assert files_under(dest) == relative(study_set, (*study.paths, instance.path))


def test_filter_delete(
    tmp_path: Path, src: Path, study_set: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    study = study_set.studies[0]
    before = files_under(src)
    assert run_filter(str(src), "--studies", study.study_instance_uid, "--delete") == 0
    assert files_under(src) == before - relative(study_set, study.paths)
    assert "4 matched, 4 deleted" in capsys.readouterr().out


def test_filter_leaves_an_unreadable_file_and_a_taken_place_alone(
    tmp_path: Path, src: Path, study_set: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    study = study_set.studies[0]
    first = study.paths[0]
    truncated = src / "p000" / "broken.dcm"
    truncated.write_bytes(first.read_bytes()[:200])
    dest = tmp_path / "dest"
    taken = dest / first.relative_to(study_set.root)
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"already here")
    assert run_filter(str(src), str(dest), "--studies", study.study_instance_uid) == 0
    assert truncated.exists()
    assert (src / "notes.txt").exists()
    assert (src / first.relative_to(study_set.root)).exists()
    assert taken.read_bytes() == b"already here"
    assert files_under(dest) == relative(study_set, study.paths)
    out = capsys.readouterr().out
    assert "4 matched, 3 moved, 2 unreadable (left in place), 1 already in DEST" in out


def test_filter_dest_inside_src(
    src: Path, study_set: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    study = study_set.studies[0]
    dest = src / "out"
    assert run_filter(str(src), str(dest), "--studies", study.study_instance_uid) == 0
    assert files_under(dest) == relative(study_set, study.paths)
    assert run_filter(str(src), str(dest), "--studies", study.study_instance_uid) == 0
    assert "0 matched" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{src}", "{dest}"], "no UIDs given"),
        (["{src}", "{dest}", "--studies", " , "], "no UIDs given"),
        (["{src}", "--studies", "1.2"], "DEST is required"),
        (["{src}", "{dest}", "--studies", "1.2", "--delete"], "DEST is not used with --delete"),
        (["{src}", "{src}", "--studies", "1.2"], "DEST must differ from SRC"),
        (["{dest}", "{src}", "--studies", "1.2"], "is not a folder"),
        (["{src}", "{dest}", "--json", "{json}"], "unknown key 'study'"),
        (["{src}", "{dest}", "--json", "{dest}"], "cannot read"),
    ],
)
def test_filter_usage_errors(
    tmp_path: Path,
    src: Path,
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad_json = tmp_path / "uids.json"
    bad_json.write_text('{"study": ["1.2"]}', encoding="utf-8")
    before = files_under(src)
    values = {"src": str(src), "dest": str(tmp_path / "dest"), "json": str(bad_json)}
    assert run_filter(*(arg.format(**values) for arg in argv)) == 2
    assert message in capsys.readouterr().err
    assert files_under(src) == before
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize(
    "text", ["[1]", '{"studies": "1.2"}', '{"series": [1]}', "not json", '{"instances": [null]}']
)
def test_filter_malformed_json_is_a_usage_error(
    tmp_path: Path, src: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "uids.json"
    path.write_text(text, encoding="utf-8")
    assert run_filter(str(src), "--json", str(path), "--delete") == 2
    assert "anonpipe filter:" in capsys.readouterr().err


def test_move_across_filesystems_copies_then_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "a" / "f.dcm"
    source.parent.mkdir()
    source.write_bytes(b"data")
    real_replace = os.replace

    def replace(a: str | Path, b: str | Path) -> None:
        if Path(a) == source:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "b" / "c" / "f.dcm"
    move_file(source, target)
    assert target.read_bytes() == b"data"
    assert not source.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.dcm"]


def test_move_failure_leaves_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "f.dcm"
    source.write_bytes(b"data")

    def replace(a: str | Path, b: str | Path) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Permission denied"):
        move_file(source, tmp_path / "out" / "f.dcm")
    assert source.read_bytes() == b"data"


# --------------------------------------------------------------------------------- summary


def test_summary_counts_descriptions_and_names(
    src: Path, study_set: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["summary", str(src)]) == 0
    lines = capsys.readouterr().out.splitlines()

    studies: Counter[str] = Counter()
    series: Counter[str] = Counter()
    names: Counter[str] = Counter()
    for patient in study_set.patients:
        for study in patient.studies:
            header = dcmread(study.paths[0], stop_before_pixels=True)
            studies[str(header.StudyDescription)] += study.instance_count
            names[patient.patient_name] += study.instance_count
            for record in study.series:
                series[record.description] += len(record.instances)

    def section(heading: str, counts: Counter[str]) -> list[str]:
        return [
            f"{heading} ({len(counts)} unique):",
            *(f"  {n}  {value}" for value, n in sorted(counts.items())),
        ]

    assert lines == [
        *section("Study Descriptions", studies),
        *section("Series Descriptions", series),
        *section("Patient Names", names),
        "9 files: 8 DICOM, 1 unreadable (not counted)",
    ]
    assert len(names) == 2
    assert all(n == 4 for n in names.values())


def test_summary_shows_missing_values_and_escapes_control_characters(
    tmp_path: Path, study_set: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    header = dcmread(study_set.paths[0])
    header.PatientName = "EVIL\x1b[2J^NAME"
    del header.SeriesDescription
    header.save_as(folder / "a.dcm")
    assert main(["summary", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "  1  EVIL\\x1b[2J^NAME" in out.splitlines()
    assert f"  1  {MISSING}" in out.splitlines()


def test_summary_of_a_missing_folder_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["summary", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
