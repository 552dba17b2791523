"""Tests for the ``anonpipe`` command line: exit codes, check-config output and error format."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from anonpipe import __version__
from anonpipe.cli import SUBCOMMANDS, build_parser, main
from anonpipe.config import load_settings, settings_as_dict

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "anonpipe.toml"


def config(directory: Path, text: str = "") -> Path:
    path = directory / "anonpipe.toml"
    path.write_text(f'{text}\n[pipeline]\ndata_dir = "{directory / "data"}"\n', encoding="utf-8")
    return path


def test_sample_configuration_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "-c", str(SAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    first, *rest = out.splitlines()
    assert str(SAMPLE) in first
    assert first.startswith("#")
    assert "local.port = 11112" in rest
    assert 'anon.allowed_modalities = ["CT", "MR"]' in rest


def test_check_config_output_is_toml_of_the_effective_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(
        tmp_path,
        '[local]\nport = 2000\nallowed_peers = [{ ae_title = "CT1", host = "10.0.0.7" }]\n'
        '[anon]\nallowed_modalities = ["ct"]\nsafe_private = ["SIEMENS CSA HEADER"]\n',
    )
    assert main(["check-config", "-c", str(path)]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed == settings_as_dict(load_settings(path, {}))
    assert printed["local"]["allowed_peers"] == [{"ae_title": "CT1", "host": "10.0.0.7"}]
    assert printed["anon"]["allowed_modalities"] == ["CT"]


def test_check_config_shows_the_effective_peers_when_none_are_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, '[staging]\nae_title = "PACS"\nhost = "10.0.0.5"\n')
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^#.*effective.*PACS.*10\.0\.0\.5", out, re.MULTILINE), out


def test_check_config_refuses_a_database_password_without_showing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, '[review]\ndatabase = "postgresql://anon:s3cret@db/review"\n')
    assert main(["check-config", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err
    assert "review.database" in captured.err and "password_file" in captured.err


def test_check_config_uses_the_environment_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config(tmp_path, "[local]\nport = 2001\n")
    monkeypatch.setenv("ANONPIPE_CONFIG", str(path))
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert str(path) in out.splitlines()[0]
    assert "local.port = 2001" in out


def test_every_problem_is_one_stderr_line_file_key_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, '[local]\nport = 0\nae_title = ""\n[logging]\nlevel = "loud"\n')
    assert main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert line.startswith(f"{path}: "), line
    keys = [line.split(": ")[1] for line in lines]
    assert sorted(keys) == ["local.ae_title", "local.port", "logging.level"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"anonpipe {__version__}"


@pytest.mark.parametrize(
    "argv",
    [[], ["no-such-command"], ["check-config", "--bogus"], ["check-config", "-c"]],
    ids=["no-command", "unknown-command", "unknown-option", "option-without-value"],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: anonpipe" in capsys.readouterr().err


def test_every_subcommand_is_registered_once() -> None:
    names = [command.name for command in SUBCOMMANDS]
    assert len(names) == len(set(names))
    help_text = build_parser().format_help()
    for name in names:
        assert name in help_text


def test_console_script_exit_code(tmp_path: Path) -> None:
    """The installed command exits with main's return value (0 valid, 2 invalid)."""
    command = [sys.executable, "-m", "anonpipe.cli", "check-config", "-c"]
    good = subprocess.run([*command, str(SAMPLE)], capture_output=True, text=True, check=False)
    assert good.returncode == 0, good.stderr
    bad_path = config(tmp_path, "[local]\nport = 0\n")
    bad = subprocess.run([*command, str(bad_path)], capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert f"{bad_path}: local.port: " in bad.stderr
