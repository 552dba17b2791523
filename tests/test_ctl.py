"""anonpipectl, the control-socket client: request framing, replies, and unreachable daemons."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anonpipe import ctl


@pytest.fixture
def answering_socket(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """A Unix socket that records each request line and answers like the daemon will."""
    path = tmp_path / "control.sock"
    seen: list[dict[str, Any]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                req = json.loads(conn.makefile("rb").readline())
                seen.append(req)
                if req["command"] == "pause":
                    reply: dict[str, Any] = {"ok": False, "error": "already paused"}
                else:
                    reply = {"ok": True, "result": {"state": "idle", "runs": 2}}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, seen
    server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
    server.close()
    thread.join(timeout=5)


def test_status_sends_one_json_line_and_prints_the_result(
    answering_socket: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, seen = answering_socket
    assert ctl.main(["--socket", str(path), "status", "--json"]) == 0
    assert seen == [{"command": "status", "args": {}}]
    assert json.loads(capsys.readouterr().out) == {"state": "idle", "runs": 2}


def test_arguments_travel_with_the_command(
    answering_socket: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, seen = answering_socket
    assert ctl.main(["--socket", str(path), "echo", "research"]) == 0
    assert seen[-1] == {"command": "echo", "args": {"peer": "research"}}
    assert "state" in capsys.readouterr().out


def test_daemon_error_is_a_failure(
    answering_socket: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = answering_socket
    assert ctl.main(["--socket", str(path), "pause"]) == 1
    assert "already paused" in capsys.readouterr().err


def test_absent_daemon_is_reported_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl.main(["--socket", str(tmp_path / "none.sock"), "status"]) == 1
    err = capsys.readouterr().err
    assert "no control socket" in err and "anonpipe daemon" in err


def test_socket_from_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "anonpipe.toml"
    config.write_text(
        f'[pipeline]\ndata_dir = "{tmp_path}/data"\n[control]\nsocket = "{tmp_path}/c.sock"\n'
    )
    assert ctl.main(["-c", str(config), "runs"]) == 1
    assert str(tmp_path / "c.sock") in capsys.readouterr().err


def test_bad_configuration_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "anonpipe.toml"
    config.write_text("[control]\nsockett = 'x'\n")
    assert ctl.main(["-c", str(config), "status"]) == 2
    assert "control.sockett" in capsys.readouterr().err


def test_status_is_a_readable_table() -> None:
    text = ctl.format_status(
        {
            "state": "blocked: misroute detected, pulls stopped",
            "misroute": "STAGING reported 5 completed but 0 reached ANONPIPE",
            "run": {"name": "run_at_1764000000", "state": "failed", "error": "misroute: ..."},
            "scp": {
                "ae_title": "ANONPIPE",
                "bind": "0.0.0.0",
                "port": 11112,
                "listening": True,
                "active_associations": 0,
                "landed": 12,
                "refused": {},
                "rejected_associations": {},
            },
            "peers": {
                "staging": {"peer": "STAGING@10.0.0.5:4242", "ok": True, "error": ""},
                "research": {
                    "peer": "RESEARCH@10.0.0.6:4242",
                    "ok": False,
                    "error": "no connection (refused ...)",
                },
            },
            "studies": [
                {
                    "study": 7,
                    "step": "published",
                    "expected": 6,
                    "landed": 6,
                    "clean": 6,
                    "quarantined": 0,
                    "pushed": 6,
                    "reason": None,
                },
                {
                    "study": 9,
                    "step": "held",
                    "expected": None,
                    "landed": 0,
                    "clean": 0,
                    "quarantined": 0,
                    "pushed": 0,
                    "reason": "reviews conflict: user 2 says PHI",
                },
            ],
            "errors": ["2026-11-25 00:00:00 run_at_1764000000: pulls stopped"],
        }
    )
    lines = text.splitlines()
    assert lines[0] == "state     blocked: misroute detected, pulls stopped"
    assert lines[1].startswith("MISROUTE  STAGING reported")
    assert "research  RESEARCH@10.0.0.6:4242: UNREACHABLE: no connection" in text
    header = next(line for line in lines if line.startswith("study"))
    assert header.split() == [
        "study",
        "step",
        "expected",
        "landed",
        "clean",
        "quarantined",
        "duplicates",
        "pushed",
        "reason",
        "notes",
    ]
    assert any(line.split()[:2] == ["9", "held"] and "reviews conflict" in line for line in lines)
    assert lines[-1].endswith("pulls stopped")
