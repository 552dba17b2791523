"""Tests for anonpipe.config: the contract's defaults and one test per validation rule.

Validation cases run through the real command (``anonpipe check-config -c FILE``) and check the
exit code, the dotted key and the file name on stderr, as an operator would see them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path

import pytest

from anonpipe.cli import main
from anonpipe.config import (
    ClientTls,
    ConfigError,
    ConfigProblem,
    LocalSettings,
    Peer,
    ReviewSettings,
    ServerTls,
    Settings,
    load_settings,
    settings_as_dict,
)
from tests.harness.tls import Identity, TestPki

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "etc" / "anonpipe.toml"

# The "Configuration contract" of ARCHITECTURE.md, verbatim: these keys and values must hold.
CONTRACT = """
[local]
ae_title = "ANONPIPE"
bind = "0.0.0.0"
port = 11112

[staging]
ae_title = "STAGING"
host = "127.0.0.1"
port = 4242

[research]
ae_title = "RESEARCH"
host = "127.0.0.1"
port = 4243

[review]
database = "/var/lib/anonpipe/review.db"
table_prefix = "dicom_staging_"
poll_interval = 30

[pipeline]
data_dir = "/var/lib/anonpipe/data"
max_studies = 10
practice = false
no_push = false
post_anon_hook = "default"
hook_files = []

[anon]
identity_db = "/var/lib/anonpipe/identity.db"
key_file = "/var/lib/anonpipe/anon.key"
allowed_modalities = ["CT", "MR"]
limited_vocabulary = ""
dates = "shift"
options = ["clean_descriptors"]
patient_key = "id"

[control]
socket = "/run/anonpipe/control.sock"
"""

# Keys added beyond the contract, with their documented defaults.
EXTRAS = {
    "local": {
        "allowed_peers": [],
        "max_associations": 10,
        "max_pdu_size": 0,
        "acse_timeout": 30,
        "dimse_timeout": 600,
        "network_timeout": 600,
        "min_free_mb": 1024,
    },
    "staging": {"connect_timeout": 10, "max_parallel_moves": 2},
    "research": {"connect_timeout": 10, "push_associations": 2, "retries": 3, "retry_backoff": 2.0},
    "pipeline": {"studies_in_flight": 4},
    "review": {"password_file": ""},
    "anon": {"date_shift_days": [-365, -1], "jobs": 0, "safe_private": []},
    "logging": {"level": "info", "format": "auto"},
}


def write(directory: Path, text: str, name: str = "anonpipe.toml") -> Path:
    """Write a config file whose data_dir is a writable temporary folder unless it sets one."""
    if "data_dir" not in text:  # keep tests independent of /var/lib and of running as root
        line = f'data_dir = "{directory / "data"}"\n'
        if "[pipeline]\n" in text:
            text = text.replace("[pipeline]\n", "[pipeline]\n" + line, 1)
        else:
            text += "\n[pipeline]\n" + line
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    return caught.value.problems


def without_source(settings: Settings) -> Settings:
    return dataclasses.replace(settings, source=None)


# -- defaults and the sample file -----------------------------------------------------------------


def test_defaults_equal_the_contract() -> None:
    expected = tomllib.loads(CONTRACT)
    for section, table in EXTRAS.items():
        expected.setdefault(section, {}).update(table)
    assert settings_as_dict(Settings()) == expected


def test_contract_file_loads_to_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, CONTRACT.replace("/var/lib/anonpipe/data", str(tmp_path / "data")))
    settings = load_settings(path, {})
    assert settings.source == path
    assert settings.pipeline.data_dir == tmp_path / "data"
    default_pipeline = dataclasses.replace(settings.pipeline, data_dir=Settings().pipeline.data_dir)
    assert dataclasses.replace(settings, pipeline=default_pipeline, source=None) == Settings()


def test_sample_file_holds_every_key_with_its_default_in_order() -> None:
    sample = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))
    defaults = settings_as_dict(Settings())
    assert sample == defaults
    assert list(sample) == list(defaults)
    for section in defaults:
        assert list(sample[section]) == list(defaults[section]), section


def test_sample_file_loads_to_the_defaults() -> None:
    assert without_source(load_settings(SAMPLE, {})) == Settings()


def test_settings_are_immutable_and_use_tuples(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[anon]\nallowed_modalities = ["CT"]\n'), {})
    assert settings.anon.allowed_modalities == ("CT",)
    assert isinstance(settings.pipeline.hook_files, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.local.port = 1  # type: ignore[misc]
    assert not hasattr(settings.local, "__dict__")  # slots


def test_effective_allowed_peers_default_to_the_staging_pacs(tmp_path: Path) -> None:
    text = '[staging]\nae_title = "PACS1"\nhost = "10.1.2.3"\n'
    assert load_settings(write(tmp_path, text), {}).allowed_peers == (Peer("PACS1", "10.1.2.3"),)
    text += '[local]\nallowed_peers = [{ ae_title = "MODALITY", host = "10.9.9.9" }]\n'
    peers = load_settings(write(tmp_path, text), {}).allowed_peers
    assert peers == (Peer("MODALITY", "10.9.9.9"),)


def test_normalisations(tmp_path: Path) -> None:
    text = (
        '[local]\nacse_timeout = 5\nae_title = "  ANON  "\n'
        '[anon]\nallowed_modalities = ["ct", " mr "]\n'
    )
    settings = load_settings(write(tmp_path, text), {})
    assert settings.local.acse_timeout == 5.0  # an integer is a fine float
    assert isinstance(settings.local.acse_timeout, float)
    assert settings.local.ae_title == "ANON"  # spaces around an AE title are insignificant
    assert settings.anon.allowed_modalities == ("CT", "MR")


# -- where the file comes from and how its paths resolve -------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    (conf / "hooks").mkdir(parents=True)
    (conf / "hooks" / "site.py").write_text("", encoding="utf-8")
    (conf / "vocab.json").write_text('{"0008,103e": ["axial"]}', encoding="utf-8")
    text = """
        [pipeline]
        data_dir = "data"
        hook_files = ["hooks/site.py"]
        [review]
        database = "review.db"
        [anon]
        identity_db = "../state/identity.db"
        key_file = "anon.key"
        limited_vocabulary = "vocab.json"
        [control]
        socket = "run/control.sock"
    """
    path = write(conf, text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path(os.path.relpath(path)), {})
    assert settings.source == path
    assert settings.pipeline.data_dir == conf / "data"
    assert settings.pipeline.hook_files == (conf / "hooks" / "site.py",)
    assert settings.review.database == str(conf / "review.db")
    assert settings.anon.identity_db == tmp_path / "state" / "identity.db"
    assert settings.anon.key_file == conf / "anon.key"
    assert settings.anon.limited_vocabulary == conf / "vocab.json"
    assert settings.control.socket == conf / "run" / "control.sock"


def test_database_url_is_not_treated_as_a_path(tmp_path: Path) -> None:
    url = "postgresql://review@db.example:5432/review"
    path = write(tmp_path, f'[review]\ndatabase = "{url}"\n')
    assert load_settings(path, {}).review.database == url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://anon:s3cret@db.example/review",
        "postgres://anon:s3cret@db.example:5433/review?sslmode=require",
        "postgresql://db.example/review?user=anon&password=s3cret",
    ],
    ids=["user-password", "postgres-scheme", "password-parameter"],
)
def test_a_password_in_the_database_url_is_refused_and_never_shown(
    tmp_path: Path, url: str
) -> None:
    (problem,) = problems(write(tmp_path, f'[review]\ndatabase = "{url}"\n'))
    assert problem.key == "review.database"
    assert "password_file" in problem.message and "PGPASSWORD" in problem.message
    assert "s3cret" not in str(problem) and "s3cret" not in json.dumps(problem.value)
    assert "***" in str(problem)


def test_password_file_is_resolved_and_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "review.pass"
    secret.write_text("s3cret\n", encoding="utf-8")
    secret.chmod(0o600)
    url = "postgresql://anon@db.example/review"
    text = f'[review]\ndatabase = "{url}"\npassword_file = "review.pass"\n'
    assert load_settings(write(tmp_path, text), {}).review.password_file == secret
    assert settings_as_dict(load_settings(write(tmp_path, text), {}))["review"] == {
        "database": url,
        "password_file": str(secret),
        "table_prefix": "dicom_staging_",
        "poll_interval": 30.0,
    }

    secret.chmod(0o644)
    (problem,) = problems(write(tmp_path, text))
    assert problem.key == "review.password_file" and "chmod 600" in problem.message
    assert "s3cret" not in str(problem)

    secret.unlink()
    (problem,) = problems(write(tmp_path, text))
    assert problem.key == "review.password_file" and "file not found" in problem.message


def test_password_file_with_a_sqlite_database_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "review.pass"
    secret.write_text("s3cret\n", encoding="utf-8")
    secret.chmod(0o600)
    text = '[review]\ndatabase = "review.db"\npassword_file = "review.pass"\n'
    (problem,) = problems(write(tmp_path, text))
    assert problem.key == "review.password_file" and "postgresql://" in problem.message


def test_environment_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[local]\nport = 2000\n")
    assert load_settings(None, {"ANONPIPE_CONFIG": str(path)}).local.port == 2000
    other = write(tmp_path, "[local]\nport = 3000\n", name="other.toml")
    assert load_settings(other, {"ANONPIPE_CONFIG": str(path)}).local.port == 3000  # -c wins


def test_default_path_when_nothing_is_given() -> None:
    if Path("/etc/anonpipe/anonpipe.toml").exists():
        pytest.skip("a system configuration is installed")
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {})
    assert caught.value.problems[0].file == Path("/etc/anonpipe/anonpipe.toml")


def test_missing_file_names_the_path_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["check-config", "-c", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "-c FILE" in err
    assert "ANONPIPE_CONFIG" in err


def test_invalid_toml_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[local]\nae_title = "A"\nport = \n', encoding="utf-8")
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: not valid TOML")
    assert "line 3" in err


# -- one case per validation rule -----------------------------------------------------------------

LONG = "x" * 120

CASES = {
    # id: (file text, dotted key, text expected in the message)
    "unknown-section": ("[locla]\nport = 1\n", "locla", "did you mean 'local'"),
    "unknown-key": ("[local]\nprot = 1\n", "local.prot", "did you mean 'port'"),
    "unknown-top-level-key": ("port = 1\n", "port", "unknown section"),
    "section-not-a-table": ("local = 5\n", "local", "expected a table"),
    "port-is-a-string": ('[local]\nport = "abc"\n', "local.port", "expected an integer"),
    "port-is-a-bool": ("[local]\nport = true\n", "local.port", "expected an integer"),
    "timeout-is-a-bool": ("[local]\nacse_timeout = true\n", "local.acse_timeout", "number"),
    "practice-is-a-string": ('[pipeline]\npractice = "yes"\n', "pipeline.practice", "true or"),
    "list-expected": ('[anon]\noptions = "clean_descriptors"\n', "anon.options", "an array"),
    "list-item-type": ("[pipeline]\nhook_files = [1]\n", "pipeline.hook_files[0]", "a path"),
    "port-zero": ("[local]\nport = 0\n", "local.port", "1..65535"),
    "port-too-high": ("[staging]\nport = 70000\n", "staging.port", "1..65535"),
    "ae-empty": ('[staging]\nae_title = ""\n', "staging.ae_title", "empty"),
    "ae-all-spaces": ('[research]\nae_title = "    "\n', "research.ae_title", "all spaces"),
    "ae-too-long": ('[local]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', "local.ae_title", "16"),
    "ae-backslash": ('[local]\nae_title = "A\\\\B"\n', "local.ae_title", "backslash"),
    "ae-control-char": ('[local]\nae_title = "A\\tB"\n', "local.ae_title", "printable"),
    "ae-non-ascii": ('[local]\nae_title = "ÄRZTE"\n', "local.ae_title", "ASCII"),
    "peer-ae": (
        '[local]\nallowed_peers = [{ ae_title = "A\\\\B", host = "10.0.0.1" }]\n',
        "local.allowed_peers[0].ae_title",
        "backslash",
    ),
    "peer-missing-host": (
        '[local]\nallowed_peers = [{ ae_title = "X" }]\n',
        "local.allowed_peers[0].host",
        "required key missing",
    ),
    "peer-unknown-key": (
        '[local]\nallowed_peers = [{ ae_title = "X", hots = "h" }]\n',
        "local.allowed_peers[0].hots",
        "did you mean 'host'",
    ),
    "bad-host": ('[staging]\nhost = "pacs server"\n', "staging.host", "host name"),
    "pdu-size": ("[local]\nmax_pdu_size = 100\n", "local.max_pdu_size", "4096"),
    "max-associations": ("[local]\nmax_associations = 0\n", "local.max_associations", ">= 1"),
    "timeout-zero": ("[local]\ndimse_timeout = 0\n", "local.dimse_timeout", "> 0"),
    "connect-timeout": ("[staging]\nconnect_timeout = -1\n", "staging.connect_timeout", "> 0"),
    "push-associations": (
        "[research]\npush_associations = 17\n",
        "research.push_associations",
        "1..16",
    ),
    "retries": ("[research]\nretries = -1\n", "research.retries", ">= 0"),
    "hook-file-missing": (
        '[pipeline]\nhook_files = ["missing_hooks.py"]\n',
        "pipeline.hook_files[0]",
        "file not found",
    ),
    "vocabulary-missing": (
        '[anon]\nlimited_vocabulary = "missing.json"\n',
        "anon.limited_vocabulary",
        "file not found",
    ),
    "same-endpoint-same-ae": (
        '[research]\nae_title = "STAGING"\nport = 4242\n',
        "research",
        "same endpoint and AE title as staging",
    ),
    "same-endpoint-other-ae": ("[research]\nport = 4242\n", "research", "same endpoint"),
    "same-endpoint-localhost": (
        '[staging]\nhost = "localhost"\n[research]\nhost = "127.0.0.1"\nport = 4242\n',
        "research",
        "same endpoint",
    ),
    "local-ae-is-staging": ('[local]\nae_title = "STAGING"\n', "local.ae_title", "staging"),
    "dates": ('[anon]\ndates = "shfit"\n', "anon.dates", "did you mean 'shift'"),
    "options": (
        '[anon]\noptions = ["clean_descriptor"]\n',
        "anon.options[0]",
        "did you mean 'clean_descriptors'",
    ),
    "modalities-empty": ("[anon]\nallowed_modalities = []\n", "anon.allowed_modalities", "one"),
    "modality-empty-string": (
        '[anon]\nallowed_modalities = ["CT", ""]\n',
        "anon.allowed_modalities[1]",
        "modality",
    ),
    "modality-too-long": (
        '[anon]\nallowed_modalities = ["ABCDEFGHIJKLMNOPQ"]\n',
        "anon.allowed_modalities[0]",
        "16",
    ),
    "date-shift-order": ("[anon]\ndate_shift_days = [10, 1]\n", "anon.date_shift_days", "min"),
    "date-shift-zero": ("[anon]\ndate_shift_days = [-5, 5]\n", "anon.date_shift_days", "0"),
    "date-shift-length": ("[anon]\ndate_shift_days = [1]\n", "anon.date_shift_days", "2 items"),
    "date-shift-type": (
        '[anon]\ndate_shift_days = ["a", 1]\n',
        "anon.date_shift_days[0]",
        "integer",
    ),
    "jobs": ("[anon]\njobs = -1\n", "anon.jobs", ">= 0"),
    "safe-private": ('[anon]\nsafe_private = [""]\n', "anon.safe_private[0]", "non-empty"),
    "max-studies": ("[pipeline]\nmax_studies = 0\n", "pipeline.max_studies", ">= 1"),
    "post-anon-hook": ('[pipeline]\npost_anon_hook = ""\n', "pipeline.post_anon_hook", "empty"),
    "poll-interval-zero": ("[review]\npoll_interval = 0\n", "review.poll_interval", "> 0"),
    "poll-interval-negative": ("[review]\npoll_interval = -3.5\n", "review.poll_interval", "> 0"),
    "table-prefix": ('[review]\ntable_prefix = "bad-prefix"\n', "review.table_prefix", "SQL"),
    "database-scheme": (
        '[review]\ndatabase = "mysql://db/review"\n',
        "review.database",
        "postgresql://",
    ),
    "socket-too-long": (
        f'[control]\nsocket = "/run/{LONG}/control.sock"\n',
        "control.socket",
        "107",
    ),
    "logging-level": ('[logging]\nlevel = "verbose"\n', "logging.level", "debug, info"),
    "logging-format": ('[logging]\nformat = "jsonl"\n', "logging.format", "did you mean 'json'"),
}


@pytest.mark.parametrize(("text", "key", "fragment"), list(CASES.values()), ids=list(CASES))
def test_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    assert main(["check-config", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = [line for line in err.splitlines() if line.startswith(f"{path}: {key}: ")]
    assert lines, err
    assert fragment in lines[0], lines[0]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """
        [local]
        port = "abc"
        prot = 1
        [pipeline]
        practice = "yes"
        max_studies = 0
        [anon]
        dates = "never"
    """
    found = problems(write(tmp_path, text))
    keys = {p.key for p in found}
    assert keys == {
        "local.port",
        "local.prot",
        "pipeline.practice",
        "pipeline.max_studies",
        "anon.dates",
    }
    port = next(p for p in found if p.key == "local.port")
    assert port.value == "abc"
    assert port.file == tmp_path / "anonpipe.toml"
    assert str(port).startswith(f"{tmp_path / 'anonpipe.toml'}: local.port: ")
    assert '"abc"' in port.message  # the bad value is quoted


def test_cross_checks_skip_keys_that_are_already_wrong(tmp_path: Path) -> None:
    # staging.port is invalid, so it must not be compared (as its default 4242) with research.
    found = problems(write(tmp_path, '[staging]\nport = "x"\n[research]\nport = 4242\n'))
    assert [p.key for p in found] == ["staging.port"]


# -- files the configuration points at ------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "cannot be read as JSON"),
        ('["0008,103e"]', "top level is not an object"),
        ('{"SeriesDescription": ["a"]}', "is not a tag"),
        ('{"0008,103e": "axial"}', "not an array of strings"),
        ('{"0008,103e": ["axial", 3]}', "not an array of strings"),
    ],
    ids=["not-json", "not-object", "bad-tag", "not-list", "not-strings"],
)
def test_vocabulary_must_have_the_documented_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, fragment: str
) -> None:
    (tmp_path / "vocab.json").write_text(content, encoding="utf-8")
    path = write(tmp_path, '[anon]\nlimited_vocabulary = "vocab.json"\n')
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: anon.limited_vocabulary: " in err
    assert fragment in err


def test_good_vocabulary_and_hook_files_are_accepted(tmp_path: Path) -> None:
    vocabulary = {"0008,103E": ["AX T1", "sag t2"], "0018,1030": []}
    (tmp_path / "vocab.json").write_text(json.dumps(vocabulary), encoding="utf-8")
    (tmp_path / "hooks.py").write_text("", encoding="utf-8")
    text = '[anon]\nlimited_vocabulary = "vocab.json"\n[pipeline]\nhook_files = ["hooks.py"]\n'
    settings = load_settings(write(tmp_path, text), {})
    assert settings.anon.limited_vocabulary == tmp_path / "vocab.json"
    assert settings.pipeline.hook_files == (tmp_path / "hooks.py",)


def test_hook_file_that_is_a_folder_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    found = problems(write(tmp_path, '[pipeline]\nhook_files = ["hooks"]\n'))
    assert [p.key for p in found] == ["pipeline.hook_files[0]"]


def test_data_dir_under_a_file_is_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Root may write anywhere, but nobody can create a folder inside a regular file.
    (tmp_path / "afile").write_text("", encoding="utf-8")
    path = write(tmp_path, f'[pipeline]\ndata_dir = "{tmp_path / "afile" / "data"}"\n')
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: pipeline.data_dir: " in err
    assert "is a file" in err


def test_data_dir_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("", encoding="utf-8")
    found = problems(write(tmp_path, '[pipeline]\ndata_dir = "afile"\n'))
    assert [(p.key, p.value) for p in found] == [("pipeline.data_dir", tmp_path / "afile")]
    assert "not a directory" in found[0].message


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_data_dir_in_a_read_only_folder_is_rejected(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    found = problems(write(tmp_path, '[pipeline]\ndata_dir = "locked/data"\n'))
    assert [p.key for p in found] == ["pipeline.data_dir"]
    assert "not writable" in found[0].message


def test_data_dir_that_does_not_exist_yet_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, '[pipeline]\ndata_dir = "not/yet/there"\n')
    assert load_settings(path, {}).pipeline.data_dir == tmp_path / "not" / "yet" / "there"


# -- redaction ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "shown"),
    [
        ("postgresql://anon:s3cret@db.example/review", "postgresql://anon:***@db.example/review"),
        (
            "postgresql://anon:s3cret@[::1]:5433/review?sslmode=require",
            "postgresql://anon:***@[::1]:5433/review?sslmode=require",
        ),
        (
            "postgresql://db.example/review?user=anon&password=s3cret",
            "postgresql://db.example/review?user=anon&password=***",
        ),
        ("postgresql://anon@db.example/review", "postgresql://anon@db.example/review"),
        ("/var/lib/anonpipe/review.db", "/var/lib/anonpipe/review.db"),
    ],
    ids=["password", "ipv6-port-query", "password-parameter", "no-password", "sqlite-path"],
)
def test_settings_as_dict_redacts_database_passwords(database: str, shown: str) -> None:
    settings = Settings(review=ReviewSettings(database=database))
    plain = settings_as_dict(settings)
    assert plain["review"]["database"] == shown
    assert "s3cret" not in json.dumps(plain)
    assert settings.review.database == database  # the settings themselves keep the secret


def test_settings_as_dict_is_json_able() -> None:
    settings = Settings(local=LocalSettings(allowed_peers=(Peer("A", "10.0.0.1"),)))
    plain = settings_as_dict(settings)
    assert json.loads(json.dumps(plain)) == plain
    assert plain["local"]["allowed_peers"] == [{"ae_title": "A", "host": "10.0.0.1"}]
    assert "source" not in plain


# -- DICOM TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestPki, Identity, Identity]:
    """A CA with one certificate, and another CA's certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca = TestPki(folder / "ca")
    return ca, ca.issue("anonpipe"), TestPki(folder / "other").issue("other")


def test_tls_tables_load_with_paths_beside_the_file(
    tmp_path: Path, pki: tuple[TestPki, Identity, Identity]
) -> None:
    ca, ours, _ = pki
    text = (
        f'[local.tls]\ncertificate = "{ours.certificate}"\nprivate_key = "{ours.private_key}"\n'
        f'ca = "{ca.ca}"\n[research.tls]\nca = "{ca.ca}"\ncheck_hostname = false\n'
        '[staging.tls]\nca = "ca/ca.crt"\ncertificate = "ca/anonpipe.crt"\n'
        'private_key = "ca/anonpipe.key"\nmin_version = "1.3"\n'
    )
    settings = load_settings(write(ca.folder.parent, text), {})
    assert settings.local.tls == ServerTls(ours.certificate, ours.private_key, ca.ca)
    assert settings.research.tls == ClientTls(ca.ca, check_hostname=False)
    assert settings.staging.tls == ClientTls(ca.ca, ours.certificate, ours.private_key, True, "1.3")
    assert settings_as_dict(settings)["research"]["tls"]["check_hostname"] is False
    assert "tls" not in settings_as_dict(Settings())["local"]  # absent: plain TCP


def test_unusable_tls_files_stop_start_up_naming_the_key(
    tmp_path: Path, pki: tuple[TestPki, Identity, Identity]
) -> None:
    ca, ours, other = pki
    readable = tmp_path / "readable.key"
    readable.write_bytes(ours.private_key.read_bytes())
    readable.chmod(0o644)
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    cases = {
        "local.tls.private_key": (
            f'[local.tls]\ncertificate = "{ours.certificate}"\nprivate_key = "{readable}"\n'
            f'ca = "{ca.ca}"\n',
            "readable by every user; chmod 600",
        ),
        "local.tls": (
            f'[local.tls]\ncertificate = "{ours.certificate}"\n'
            f'private_key = "{other.private_key}"\nca = "{ca.ca}"\n',
            "cannot be used together",
        ),
        "research.tls": (
            f'[research.tls]\nca = "{not_pem}"\n',
            "holds no usable CA certificate",
        ),
        "staging.tls": (
            f'[staging.tls]\nca = "{ca.ca}"\ncertificate = "{ours.certificate}"\n',
            "certificate and private_key together",
        ),
        "staging.tls.min_version": (
            f'[staging.tls]\nca = "{ca.ca}"\nmin_version = "1.1"\n',
            "expected one of 1.2, 1.3",
        ),
        "local.tls.ca": (
            f'[local.tls]\ncertificate = "{ours.certificate}"\n'
            f'private_key = "{ours.private_key}"\n',
            "required key missing",
        ),
    }
    for key, (text, message) in cases.items():
        (problem,) = problems(write(tmp_path, text))
        assert problem.key == key and message in problem.message, (key, str(problem))
