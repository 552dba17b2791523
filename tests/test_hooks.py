"""Post-anonymization hooks: the built-ins, the registry, site files loaded by path."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from anonpipe import hooks
from anonpipe.daemon.rundir import RunDir
from anonpipe.hooks import HookError, HookRegistry, HookStudy, OverviewWriter
from tests.harness.studygen import Manifest

EXAMPLE = Path(__file__).resolve().parents[1] / "hooks" / "example_hook.py"
KNOWN_BUILTINS = "known: default, none"


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    return RunDir.create(tmp_path / "data", now=1367582400)


def _to_production(run: RunDir, manifest: Manifest) -> None:
    """Lay the files out as the anonymizer does: ``<study>/<series>/<sop>.dcm``."""
    for instance in manifest.instances:
        target = (
            run.to_production
            / instance.study_instance_uid
            / instance.series_instance_uid
            / f"{instance.sop_instance_uid}.dcm"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(instance.path, target)


def _hook_file(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(body)
    return path


# --------------------------------------------------------------------------- default hook


def _study(run: RunDir, **fields: object) -> HookStudy:
    values: dict[str, object] = {
        "run_dir": run.path,
        "folder": run.to_production / "2.25.1",
        "study_uid": "2.25.1",
        "review_id": 7,
        "files": 8,
        "series": 2,
        "modality": "CT",
        "sop_class": "1.2.840.10008.5.1.4.1.1.2",
    }
    values.update(fields)
    return HookStudy(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("practice", [False, True])
def test_default_hook_describes_the_study(run: RunDir, practice: bool) -> None:
    hook = hooks.registry.get("default")
    assert hooks.is_per_study(hook)
    report = hooks.run_study_hook(hook, _study(run), practice, name="default")  # type: ignore[arg-type]
    assert report == "2.25.1\t2 series\t8 images\tCT\t1.2.840.10008.5.1.4.1.1.2"


def test_default_hook_without_modality(run: RunDir) -> None:
    study = _study(run, modality=None, sop_class=None)
    assert hooks.default_hook(study, False) == "2.25.1\t2 series\t8 images\t\t"


def test_none_hook_does_nothing(run: RunDir) -> None:
    hook = hooks.registry.get("none")
    assert hooks.is_per_study(hook)
    assert hooks.run_study_hook(hook, _study(run), False) == ""  # type: ignore[arg-type]


def test_a_per_study_hook_that_raises_names_itself(run: RunDir) -> None:
    @hooks.per_study
    def link(study: HookStudy, practice: bool) -> str:
        raise RuntimeError("no encounter")

    with pytest.raises(HookError, match="post_anon_hook 'link' failed: RuntimeError: no enc"):
        hooks.run_study_hook(link, _study(run), False, name="link")


def test_a_per_run_hook_is_not_per_study() -> None:
    def report(run_dir: Path, overview: object, practice: bool) -> str:
        return ""

    assert not hooks.is_per_study(report)


def test_builtin_hooks_are_registered() -> None:
    assert hooks.registry.names()[:2] == ("default", "none")
    assert hooks.registry.get("default") is hooks.default_hook


# ------------------------------------------------------------------------------- registry


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(HookError) as err:
        hooks.registry.get("my_hook")
    message = str(err.value)
    assert message.startswith(f"unknown post_anon_hook 'my_hook'; {KNOWN_BUILTINS}")
    assert message.endswith(
        "; set [pipeline] post_anon_hook or add the file defining it to [pipeline] hook_files"
    )


def test_unknown_name_in_an_empty_registry() -> None:
    with pytest.raises(HookError, match=r"unknown post_anon_hook 'x'; known: \(none\)"):
        HookRegistry().get("x")


def _one(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
    return "one"


def _two(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
    return "two"


def test_register_by_name_and_by_function_name() -> None:
    reg = HookRegistry()
    assert reg.register(_one, name="first") is _one
    reg.register(_two)
    assert reg.names() == ("first", "_two")
    assert reg.get("first") is _one
    assert reg.get("_two") is _two


def test_register_as_decorator() -> None:
    reg = HookRegistry()

    @reg.register
    def plain(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
        return "plain"

    @reg.register(name="named")
    def other(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
        return "other"

    assert reg.names() == ("plain", "named")
    assert reg.get("named") is other
    assert plain(Path("."), io.StringIO(), False) == "plain"


def test_register_the_same_function_twice_is_harmless() -> None:
    reg = HookRegistry()
    reg.register(_one, name="x")
    reg.register(_one, name="x")
    assert reg.get("x") is _one


def test_register_a_taken_name_with_another_function_fails() -> None:
    reg = HookRegistry()
    reg.register(_one, name="x")
    with pytest.raises(HookError, match="'x' is already registered by _one"):
        reg.register(_two, name="x")
    assert reg.get("x") is _one


def test_register_refuses_bad_arguments() -> None:
    reg = HookRegistry()
    with pytest.raises(HookError, match="non-empty name"):
        reg.register(_one, name=" ")
    with pytest.raises(HookError, match="not callable"):
        reg.register("text", name="x")  # type: ignore[call-overload]


# ---------------------------------------------------------------------------- hook files


def test_example_hook_file_registers_example(run: RunDir) -> None:
    reg = HookRegistry()
    hooks.load_hook_files([EXAMPLE], into=reg)
    assert reg.names() == ("example",)
    assert "example" not in hooks.registry.names()  # nothing leaked into the module registry

    (run.to_production / "2.25.1" / "2.25.2").mkdir(parents=True)
    (run.to_production / "2.25.1" / "2.25.2" / "2.25.3.dcm").write_bytes(b"")
    with run.overview_stream() as overview:
        hook = reg.get("example")
        assert not hooks.is_per_study(hook)
        report = hooks.run_hook(hook, run.path, overview, True, name="example")  # type: ignore[arg-type]
    assert report == "2.25.1\n1 studies seen\n"
    assert run.read_lines("overview.txt") == [
        "example hook saw 1 files in 1 studies (practice: nothing linked)"
    ]


def test_loading_a_hook_file_again_reregisters(tmp_path: Path) -> None:
    reg = HookRegistry()
    hooks.load_hook_files([EXAMPLE], into=reg)
    first = reg.get("example")
    hooks.load_hook_files([EXAMPLE], into=reg)
    assert reg.names() == ("example",)
    assert reg.get("example") is not first  # the file's new version


def test_resolve_hook_loads_then_gets(tmp_path: Path) -> None:
    reg = HookRegistry()
    reg.register(hooks.default_hook, name="default")
    assert hooks.resolve_hook("example", [EXAMPLE], into=reg).__name__ == "example"
    with pytest.raises(HookError, match="unknown post_anon_hook 'nope'; known: default, example"):
        hooks.resolve_hook("nope", [EXAMPLE], into=reg)


def test_resolve_hook_unknown_name_without_files() -> None:
    with pytest.raises(HookError, match=f"unknown post_anon_hook 'my_hook'; {KNOWN_BUILTINS}"):
        hooks.resolve_hook("my_hook", [])


def test_a_site_file_using_the_decorator(tmp_path: Path) -> None:
    path = _hook_file(
        tmp_path,
        "decorated.py",
        "from anonpipe.hooks import registry\n"
        "@registry.register(name='decorated')\n"
        "def hook(run_dir, overview, practice):\n"
        "    return 'ok'\n",
    )
    reg = HookRegistry()
    hooks.load_hook_files([path], into=reg)
    assert reg.get("decorated")(tmp_path, io.StringIO(), False) == "ok"  # type: ignore[call-arg,arg-type]


def test_a_hook_file_that_raises_on_import(tmp_path: Path) -> None:
    good = _hook_file(
        tmp_path,
        "good.py",
        "from anonpipe.hooks import registry\n"
        "def good(run_dir, overview, practice):\n"
        "    return ''\n"
        "registry.register(good)\n",
    )
    bad = _hook_file(tmp_path, "bad_hook.py", "raise RuntimeError('no database configured')\n")
    reg = HookRegistry()
    with pytest.raises(HookError) as err:
        hooks.load_hook_files([good, bad], into=reg)
    assert str(err.value) == (f"cannot load hook file {bad}: RuntimeError: no database configured")
    assert isinstance(err.value.__cause__, RuntimeError)
    assert reg.names() == ()  # all or nothing: good.py's registration is not kept


def test_a_hook_file_with_a_syntax_error(tmp_path: Path) -> None:
    bad = _hook_file(tmp_path, "broken.py", "def hook(:\n")
    with pytest.raises(HookError, match=r"broken\.py: SyntaxError"):
        hooks.load_hook_files([bad], into=HookRegistry())


def test_a_hook_file_that_takes_a_builtin_name(tmp_path: Path) -> None:
    path = _hook_file(
        tmp_path,
        "clash.py",
        "from anonpipe.hooks import registry\n"
        "def hook(run_dir, overview, practice):\n"
        "    return ''\n"
        "registry.register(hook, name='default')\n",
    )
    with pytest.raises(HookError, match=r"clash\.py: HookError: post_anon_hook 'default'"):
        hooks.load_hook_files([path])
    assert hooks.registry.get("default") is hooks.default_hook


def test_a_missing_or_non_python_hook_file(tmp_path: Path) -> None:
    with pytest.raises(HookError, match=r"absent\.py: FileNotFoundError"):
        hooks.load_hook_files([tmp_path / "absent.py"], into=HookRegistry())
    text = _hook_file(tmp_path, "hooks.txt", "")
    with pytest.raises(HookError, match="not a Python source file"):
        hooks.load_hook_files([text], into=HookRegistry())


# ------------------------------------------------------------------------------- run_hook


def test_a_hook_that_raises_at_run(run: RunDir) -> None:
    def failing(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
        overview.write("partial line")
        raise ValueError("research database unreachable")

    with (
        run.overview_stream() as overview,
        pytest.raises(HookError) as err,
    ):
        hooks.run_hook(failing, run.path, overview, False, name="link")
    assert (
        str(err.value) == "post_anon_hook 'link' failed: ValueError: research database unreachable"
    )
    assert run.read_lines("overview.txt") == ["partial line"]  # flushed anyway


def test_run_hook_names_the_function_by_default(run: RunDir) -> None:
    def broken(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
        raise KeyError("x")

    with pytest.raises(HookError, match="post_anon_hook 'broken' failed: KeyError"):
        hooks.run_hook(broken, run.path, io.StringIO(), False)


def test_run_hook_converts_the_report(run: RunDir) -> None:
    def numbers(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
        return 42  # type: ignore[return-value]

    def nothing(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
        return None  # type: ignore[return-value]

    assert hooks.run_hook(numbers, run.path, io.StringIO(), False) == "42"
    assert hooks.run_hook(nothing, run.path, io.StringIO(), False) == ""


def test_run_hook_passes_the_arguments(run: RunDir) -> None:
    seen: list[object] = []

    def spy(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
        seen.extend([run_dir, overview, practice])
        return "done"

    overview = io.StringIO()
    assert hooks.run_hook(spy, run.path, overview, True) == "done"
    assert seen == [run.path, overview, True]
