"""``[web]``: absent means off; a bad ``bind`` stops start-up naming the file, the key and the fix.

Through the real command (``anonpipe check-config``), as an operator sees it; one case per rule.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from anonpipe.cli import main
from anonpipe.config import load_settings, settings_as_dict


def _write(directory: Path, text: str) -> Path:
    path = directory / "anonpipe.toml"
    path.write_text(f'[pipeline]\ndata_dir = "{directory / "data"}"\n{text}', encoding="utf-8")
    return path


def test_without_web_nothing_is_configured(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, ""), {})
    assert settings.web is None
    assert "web" not in settings_as_dict(settings)


@pytest.mark.parametrize(
    ("bind", "address"),
    [
        ("127.0.0.1:8042", ("127.0.0.1", 8042)),
        ("[::1]:8042", ("::1", 8042)),
        ("monitor.example.org:9000", ("monitor.example.org", 9000)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_bind_is_host_and_port(tmp_path: Path, bind: str, address: tuple[str, int]) -> None:
    settings = load_settings(_write(tmp_path, f'[web]\nbind = "{bind}"\n'), {})
    assert settings.web is not None and settings.web.address == address
    assert settings_as_dict(settings)["web"] == {"bind": bind}


CASES = {
    "no-port": ('[web]\nbind = "127.0.0.1"\n', "expected HOST:PORT"),
    "empty-port": ('[web]\nbind = "127.0.0.1:"\n', "expected HOST:PORT"),
    "port-not-a-number": ('[web]\nbind = "127.0.0.1:http"\n', "expected HOST:PORT"),
    "port-zero": ('[web]\nbind = "127.0.0.1:0"\n', "1..65535"),
    "port-too-high": ('[web]\nbind = "127.0.0.1:70000"\n', "1..65535"),
    "bad-host": ('[web]\nbind = "my host:8042"\n', "IP address or a DNS host name"),
    "no-host": ('[web]\nbind = ":8042"\n', "expected HOST:PORT"),
    "ipv6-without-brackets": ('[web]\nbind = "::1:8042"\n', "in brackets"),
    "not-ipv6-in-brackets": ('[web]\nbind = "[localhost]:8042"\n', "IPv6 address between"),
    "not-a-string": ("[web]\nbind = 8042\n", "expected a string"),
    "missing": ("[web]\n", "required key missing"),
    "unknown-key": ('[web]\nbind = "127.0.0.1:8042"\nport = 1\n', "unknown key"),
    "scp-port": (
        '[local]\nport = 11112\n[web]\nbind = "127.0.0.1:11112"\n',
        "is local.port, where our Storage SCP listens",
    ),
}


@pytest.mark.parametrize(("text", "fragment"), list(CASES.values()), ids=list(CASES))
def test_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    path = _write(tmp_path, text)
    assert main(["check-config", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = [line for line in err.splitlines() if line.startswith(f"{path}: web.")]
    assert lines, err
    assert fragment in lines[0], lines[0]


def test_the_scp_port_on_another_address_is_fine(tmp_path: Path) -> None:
    path = _write(
        tmp_path, '[local]\nbind = "10.0.0.1"\nport = 11112\n[web]\nbind = "127.0.0.1:11112"\n'
    )
    web = load_settings(path, {}).web
    assert web is not None and web.address == ("127.0.0.1", 11112)
