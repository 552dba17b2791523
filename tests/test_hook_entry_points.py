"""Hooks from installed packages (entry-point group ``anonpipe.hooks``): real distributions,
built as wheels here and installed by pip into a folder of their own, found through
:mod:`importlib.metadata` as on a site that ``pip install``-ed its hook package."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from anonpipe import hooks
from anonpipe.cli import main
from anonpipe.hooks import HookError, HookRegistry

LINK_MODULE = '''"""A site's hooks, as a package."""

from pathlib import Path


def link(run_dir: Path, overview, practice: bool) -> str:
    overview.write("linked by an installed hook\\n")
    return "linked"
'''


def _wheel(folder: Path, name: str, module: str, files: Mapping[str, str], points: str) -> Path:
    """A pure-Python wheel of distribution `name` (version 1.0) with `files` and the
    ``entry_points.txt`` text `points`."""
    dist = f"{name.replace('-', '_')}-1.0"
    content = {
        **{f"{module}/{path}": text for path, text in files.items()},
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: anonpipe-tests\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}.dist-info/entry_points.txt": points,
    }
    record = [
        f"{path},sha256={_digest(text.encode())},{len(text.encode())}"
        for path, text in content.items()
    ]
    content[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in content.items():
            archive.writestr(path, text)
    return wheel


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _pip_install(wheels: list[Path], target: Path) -> None:
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    subprocess.run(
        [*pip, "--target", str(target), *map(str, wheels)],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        timeout=120,
    )


@pytest.fixture(scope="module")
def site_packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three installed distributions: a working hook, one whose module fails on import, and
    two that offer the same name."""
    build = tmp_path_factory.mktemp("wheels")
    wheels = [
        _wheel(
            build,
            "anonpipe-site-hooks",
            "anonpipe_site_hooks",
            {"__init__.py": LINK_MODULE},
            "[anonpipe.hooks]\nsite_link = anonpipe_site_hooks:link\n",
        ),
        _wheel(
            build,
            "anonpipe-broken-hook",
            "anonpipe_broken_hook",
            {"__init__.py": "raise RuntimeError('needs a licence server')\n"},
            "[anonpipe.hooks]\nbroken = anonpipe_broken_hook:hook\n",
        ),
        _wheel(
            build,
            "anonpipe-twin-a",
            "anonpipe_twin_a",
            {"__init__.py": "def hook(run_dir, overview, practice):\n    return 'a'\n"},
            "[anonpipe.hooks]\ntwin = anonpipe_twin_a:hook\n",
        ),
        _wheel(
            build,
            "anonpipe-twin-b",
            "anonpipe_twin_b",
            {"__init__.py": "def hook(run_dir, overview, practice):\n    return 'b'\n"},
            "[anonpipe.hooks]\ntwin = anonpipe_twin_b:hook\n",
        ),
    ]
    target = tmp_path_factory.mktemp("site-packages")
    _pip_install(wheels, target)
    return target


@pytest.fixture
def installed(site_packages: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The installed packages on sys.path for this test only."""
    monkeypatch.syspath_prepend(str(site_packages))
    yield site_packages
    for name in [m for m in sys.modules if m.startswith("anonpipe_") and "hook" in m]:
        del sys.modules[name]


def _config(directory: Path, hook: str) -> Path:
    path = directory / "anonpipe.toml"
    path.write_text(
        f'[pipeline]\ndata_dir = "{directory / "data"}"\npost_anon_hook = "{hook}"\n'
        f'[anon]\nidentity_db = "{directory / "identity.db"}"\n',
        encoding="utf-8",
    )
    return path


def test_installed_hooks_are_listed_without_importing_them(installed: Path) -> None:
    offered = hooks.installed_hooks()
    assert {"site_link", "broken", "twin"} <= set(offered)
    assert [p.dist.name for p in offered["site_link"] if p.dist] == ["anonpipe-site-hooks"]
    assert "anonpipe_broken_hook" not in sys.modules  # listing ran none of their code


def test_an_installed_hook_resolves_and_runs(installed: Path, tmp_path: Path) -> None:
    reg = hooks.builtin_registry()
    hook = hooks.resolve_hook("site_link", [], into=reg)
    overview = io.StringIO()
    assert hooks.run_hook(hook, tmp_path, overview, False, "site_link") == "linked"  # type: ignore[arg-type]
    assert overview.getvalue() == "linked by an installed hook\n"
    assert reg.names() == ("default", "none", "site_link")


def test_check_config_accepts_an_installed_hook(
    installed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "-c", str(_config(tmp_path, "site_link"))]) == 0
    assert 'pipeline.post_anon_hook = "site_link"' in capsys.readouterr().out


def test_an_unknown_hook_lists_the_installed_ones_with_their_package(
    installed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "-c", str(_config(tmp_path, "site_links"))]) == 2
    err = capsys.readouterr().err
    assert "unknown post_anon_hook 'site_links'; known: default, none, " in err
    assert "site_link (package anonpipe-site-hooks 1.0)" in err


def test_an_installed_hook_that_fails_to_import_exits_2_naming_its_package(
    installed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "-c", str(_config(tmp_path, "broken"))]) == 2
    err = capsys.readouterr().err
    assert "cannot load post_anon_hook 'broken' from package anonpipe-broken-hook 1.0" in err
    assert "RuntimeError: needs a licence server" in err


def test_a_name_two_packages_offer_is_refused(installed: Path) -> None:
    with pytest.raises(HookError, match="offered by several installed packages"):
        hooks.resolve_hook("twin", [], into=HookRegistry())


def test_an_installed_name_that_a_hook_file_registers_too_is_refused(
    installed: Path, tmp_path: Path
) -> None:
    hook_file = tmp_path / "site.py"
    hook_file.write_text(
        "from anonpipe.hooks import registry\n"
        "@registry.register(name='site_link')\n"
        "def other(run_dir, overview, practice):\n"
        "    return ''\n"
    )
    with pytest.raises(HookError, match="'site_link' is already registered by other"):
        hooks.resolve_hook("site_link", [hook_file], into=hooks.builtin_registry())


def test_a_new_process_finds_an_installed_hook(installed: Path, tmp_path: Path) -> None:
    """In a new process, as installed (PYTHONPATH stands for the site-packages folder)."""
    config = _config(tmp_path, "site_link")
    done = subprocess.run(
        [sys.executable, "-m", "anonpipe.cli", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.getcwd()])},
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
