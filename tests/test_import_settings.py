"""``anonpipe import-settings``: the old local_settings.py, read as data, to a checked TOML."""

from __future__ import annotations

import sqlite3
import sys
import tomllib
from pathlib import Path

import pytest

from anonpipe.cli import main

SAMPLE = Path(__file__).resolve().parent / "samples" / "local_settings.py"
SECRETS = ("Tr0ub4dor&3", "c0rrect-h0rse", "k#2m9v!q0x$p4r@z7w8e&t5y1u3i6o-plkjhgfdsa")


def convert(
    capsys: pytest.CaptureFixture[str], settings: Path, *extra: str
) -> tuple[int, str, str]:
    code = main(["import-settings", str(settings), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def old_file(directory: Path, text: str) -> Path:
    path = directory / "local_settings.py"
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = """
LOCAL_AE = "DCMQR"
STAGE_AE = "STAGING"
STAGE_HOST = "10.0.0.5"
PROD_AE = "RESEARCH"
PROD_HOST = "10.0.0.6"
DEFAULT_PORT = 11112
STAGE_PORT = DEFAULT_PORT
PROD_PORT = DEFAULT_PORT
"""


def test_the_sample_converts_to_a_toml_check_config_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "anonpipe.toml"
    code, out, err = convert(capsys, SAMPLE, "-o", str(target))
    assert code == 0, err
    assert out == ""
    assert "password_file" in err  # the one thing left to do: the password, in its own file
    text = target.read_text(encoding="utf-8")
    settings = tomllib.loads(text)
    assert settings["local"] == {"ae_title": "DCMQR", "bind": "10.30.1.17", "port": 11112}
    assert settings["staging"] == {
        "ae_title": "DCM4CHEE",
        "host": "pacs-staging.example.org",
        "port": 11112,  # STAGE_PORT = DEFAULT_PORT
    }
    assert settings["research"] == {"ae_title": "RESEARCH_PACS", "host": "10.30.2.40", "port": 4242}
    assert settings["review"] == {
        "database": "postgresql://pipeline@db.example.org:5432/dicom_review"
    }
    assert settings["pipeline"] == {"post_anon_hook": "default"}
    for name in ("DICOM_ROOT", "SECRET_KEY", "INSTALLED_APPS", "DATABASE_ROUTERS"):
        assert f"# not converted: {name} (" in text
    assert "# not converted: DATABASES['production'] (" in text
    assert '# password_file = "/etc/anonpipe/review.pass"' in text
    for secret in SECRETS:
        assert secret not in text + err

    assert main(["check-config", "-c", str(target)]) == 0
    checked = capsys.readouterr()
    assert checked.err == ""
    assert 'staging.host = "pacs-staging.example.org"' in checked.out


def test_stdout_is_the_same_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "anonpipe.toml"
    assert convert(capsys, SAMPLE, "-o", str(target))[0] == 0
    code, out, _ = convert(capsys, SAMPLE)
    assert code == 0
    assert out == target.read_text(encoding="utf-8")


def test_the_file_is_never_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    text = SAMPLE.read_text(encoding="utf-8") + (
        f"open({str(marker)!r}, 'w').write('ran')\n"
        f"__import__('os').system('touch {marker}')\n"
        f"STAGE_HOST = __import__('pathlib').Path({str(marker)!r}).write_text('ran')\n"
        "raise SystemExit(3)\n"
    )
    settings = old_file(tmp_path, text)
    convert(capsys, SAMPLE)  # the command's own imports happen first
    modules = set(sys.modules)
    code, out, err = convert(capsys, settings)
    assert not marker.exists()
    assert set(sys.modules) - modules == set()  # nothing imported on its behalf, not the file
    # The last assignment is an expression: reported, never evaluated, and the file still converts.
    assert code == 1
    assert "staging.host: STAGE_HOST is computed when the file runs" in err
    assert "host = " not in out.split("[staging]")[1].split("[research]")[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x7fELF\x02\x01\x01\x00\x00\x00", "is not a Python file"),
        (b'LOCAL_AE = "DCMQR"\nprint "pulling"\n', "is not a Python file (line 2"),
        (b"[local]\nae_title = 'DCMQR'\n", "it is a TOML file"),
        (b"import os\nDEBUG = True\nname = 'x'\n", "has no recognisable settings"),
        (b"from base_settings import LOCAL_AE, STAGE_AE\n", "has no recognisable settings"),
    ],
)
def test_not_python_or_no_settings_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    settings = tmp_path / "local_settings.py"
    settings.write_bytes(content)
    code, out, err = convert(capsys, settings, "-o", str(tmp_path / "out.toml"))
    assert code == 2
    assert out == ""
    assert message in err and str(settings) in err
    assert not (tmp_path / "out.toml").exists()


def test_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = convert(capsys, tmp_path / "nowhere.py")
    assert code == 2
    assert "cannot read" in err


def test_an_existing_output_is_kept_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "anonpipe.toml"
    target.write_text("# mine\n", encoding="utf-8")
    code, _, err = convert(capsys, SAMPLE, "-o", str(target))
    assert code == 2
    assert "--force" in err
    assert target.read_text(encoding="utf-8") == "# mine\n"
    assert convert(capsys, SAMPLE, "-o", str(target), "--force")[0] == 0
    assert "[staging]" in target.read_text(encoding="utf-8")
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left


def test_the_input_is_never_the_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = old_file(tmp_path, MINIMAL)
    code, _, _ = convert(capsys, settings, "-o", str(settings), "--force")
    assert code == 2
    assert settings.read_text(encoding="utf-8") == MINIMAL


def test_a_sqlite_review_database_and_its_table_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "db").mkdir()
    with sqlite3.connect(tmp_path / "db" / "review.db") as db:  # a very old install's tables
        db.execute("create table staging_radiologystudy (id integer primary key)")
    settings = old_file(
        tmp_path,
        MINIMAL + "DATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3',"
        " 'NAME': 'db/review.db'}}\n",
    )
    target = tmp_path / "anonpipe.toml"
    code, _, err = convert(capsys, settings, "-o", str(target))
    assert code == 0, err
    review = tomllib.loads(target.read_text(encoding="utf-8"))["review"]
    # Relative to the old pipeline's folder, where it ran, not to wherever this command runs.
    assert review == {"database": str(tmp_path / "db" / "review.db"), "table_prefix": "staging_"}
    assert main(["check-config", "-c", str(target)]) == 0


def test_postgresql_options_and_a_socket_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = old_file(
        tmp_path,
        MINIMAL + "DATABASES = {'default': {'ENGINE': 'django.db.backends.postgresql',"
        " 'NAME': 'review db', 'USER': 'pipe line', 'PASSWORD': '',"
        " 'HOST': '/var/run/postgresql', 'OPTIONS': {'sslmode': 'verify-full',"
        " 'passfile': '/root/.pgpass', 'isolation_level': 1}}}\n",
    )
    code, out, err = convert(capsys, settings)
    assert code == 0, err
    assert tomllib.loads(out)["review"]["database"] == (
        "postgresql://pipe%20line@/review%20db?host=/var/run/postgresql&sslmode=verify-full"
    )
    assert "password_file" not in err  # no PASSWORD: nothing to do
    assert "# not converted: DATABASES['default']['OPTIONS']['passfile']" in out
    assert "/root/.pgpass" not in out
    assert "# not converted: DATABASES['default']['OPTIONS']['isolation_level']" in out


def test_values_that_cannot_be_read_are_named_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = old_file(
        tmp_path,
        "import os\n"
        + MINIMAL
        + "PROD_HOST = os.environ['PROD_HOST']\n"
        + "if os.uname()[1] == 'test':\n    STAGE_AE = 'TEST_PACS'\n"
        + "DATABASES = {'default': {'ENGINE': 'django.db.backends.mysql', 'NAME': 'review'}}\n"
        + "AWS_SECRET_ACCESS_KEY = 'AKIAverysecret'\n"
        + "from site_settings import *\n",
    )
    code, out, err = convert(capsys, settings)
    assert code == 1
    assert "research.host: PROD_HOST is computed when the file runs" in err
    assert "staging.ae_title: STAGE_AE is set inside an if block (line" in err
    assert "review.database:" in err and "django.db.backends.mysql" in err
    assert "# not converted: AWS_SECRET_ACCESS_KEY (" in out
    assert "AKIAverysecret" not in out + err
    assert "# not converted: from site_settings import * (" in out
    settings_toml = tomllib.loads(out)
    assert "host" not in settings_toml["research"]
    assert "ae_title" not in settings_toml["staging"]


def test_the_blank_old_template_is_refused_by_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The old sample as shipped: empty hosts and engines are not silently given defaults."""
    settings = old_file(
        tmp_path,
        'LOCAL_AE = "DCMQR"\nSTAGE_AE = "DCM4CHEE"\nPROD_AE = "DCM4CHEE"\nLOCAL_HOST = ""\n'
        'STAGE_HOST = ""\nPROD_HOST =  ""\nDEFAULT_PORT = 11112\nSTAGE_PORT = DEFAULT_PORT\n'
        "PROD_PORT = DEFAULT_PORT\nLOCAL_PORT = DEFAULT_PORT\n"
        "DATABASES = {'default': {'ENGINE': '', 'NAME': '', 'USER': '', 'PASSWORD': ''}}\n",
    )
    target = tmp_path / "anonpipe.toml"
    code, _, err = convert(capsys, settings, "-o", str(target))
    assert code == 1
    assert "needs attention: staging.host:" in err
    assert "needs attention: research.host:" in err
    assert "needs attention: review.database:" in err
    text = target.read_text(encoding="utf-8")
    assert "bind" not in tomllib.loads(text)["local"]  # LOCAL_HOST "" meant every interface
    assert main(["check-config", "-c", str(target)]) == 2


def test_a_site_hook_is_a_step_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = old_file(tmp_path, MINIMAL + "POST_ANON_HOOK = 'link_encounters'\n")
    (tmp_path / "custom_hooks.py").write_text("raise SystemExit('never imported')\n")
    (tmp_path / "identity.db").write_bytes(b"")
    code, out, err = convert(capsys, settings)
    assert code == 0
    assert tomllib.loads(out)["pipeline"] == {"post_anon_hook": "link_encounters"}
    assert "to do: port the hook 'link_encounters'" in err
    assert str(tmp_path / "custom_hooks.py") in out
    assert f"# $ anonpipe import-identity -c FILE {tmp_path / 'identity.db'}\n" in out
