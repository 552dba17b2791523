"""anonpipectl, the control-socket client: request framing, every command's readable and
``--json`` output, exit codes, unreachable daemons, and a reader that closes the pipe."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anonpipe import ctl
from anonpipe.daemon.states import Failure, RunState, StudyState
from anonpipe.daemon.status import (
    DeferredStudy,
    HeldStudy,
    PeerStatus,
    RunDetail,
    RunSummary,
    ServiceState,
    StatusReport,
    StudyStatus,
)
from anonpipe.scp import ScpStatus
from tests.harness.shell import shell

RUN = RunSummary(
    name="run_at_1764000000",
    state=RunState.PUSHING,
    error=None,
    started="2026-11-24T16:00:00+00:00",
)
DONE = RunSummary(
    name="run_at_1763990000",
    state=RunState.DONE,
    error=None,
    practice=True,
    started="2026-11-24T13:13:20+00:00",
    finished="2026-11-24T13:15:25+00:00",
)
PUSHING = StudyStatus(
    study=7,
    step=StudyState.PUSHING,
    expected=6,
    landed=6,
    clean=6,
    quarantined=0,
    duplicates=0,
    pushed=2,
    reason=None,
    notes=None,
    cleaned_study_uid="2.25.1234",
    retries=2,
    push_error="association aborted by the peer",
)
FAILED = StudyStatus(
    study=8,
    step=StudyState.FAILED_REPORTED,
    expected=3,
    landed=3,
    clean=0,
    quarantined=3,
    duplicates=0,
    pushed=0,
    reason="every file was quarantined (burned-in annotation: 3)",
    notes=None,
    failure=Failure.ALL_QUARANTINED,
)
HELD = StudyStatus(
    study=9,
    step=StudyState.HELD,
    expected=None,
    landed=0,
    clean=0,
    quarantined=0,
    duplicates=0,
    pushed=0,
    reason="reviews conflict: user 2 says PHI",
    notes=None,
)
STATUS = StatusReport(
    state="running run_at_1764000000: pushing",
    service=ServiceState.RUNNING,
    current=RUN.name,
    run=RUN,
    studies=(PUSHING, FAILED, HELD),
    held=(HeldStudy(9, "reviews conflict: user 2 says PHI"),),
    deferred=(DeferredStudy(11, "2026-11-24T17:00:00+00:00", 2, "staging PACS unavailable"),),
    scp=ScpStatus("ANONPIPE", "0.0.0.0", 11112, True, 1, 1, 12, {"not expected": 2}, {}),
    peers={
        "staging": PeerStatus("STAGING@10.0.0.5:4242", True, "", checked="2026-11-24T16:00:00Z"),
        "research": PeerStatus(
            "RESEARCH@10.0.0.6:4242",
            False,
            "no connection (refused ...)",
            down_since="2026-11-24T15:58:00+00:00",
            next_check="2026-11-24T16:00:30+00:00",
        ),
    },
    errors=("2026-11-24 16:59:00 run_at_1764000000: study 8: every file was quarantined",),
    runs=(DONE, RUN),
)
DETAIL = RunDetail(
    name=DONE.name,
    state=DONE.state,
    error=None,
    practice=True,
    started=DONE.started,
    finished=DONE.finished,
    path="/var/lib/anonpipe/data/run_at_1763990000",
    studies=(FAILED,),
    overview=(
        "Starting at 2026-11-24 14:13",
        "1 valid reviewed studies. Please review comments.txt",
    ),
)

#: What the fake daemon answers, by command.
REPLIES: dict[str, dict[str, Any]] = {
    "status": {"ok": True, "result": STATUS.to_json()},
    "runs": {"ok": True, "result": [DONE.to_json(), RUN.to_json()]},
    "show": {"ok": True, "result": DETAIL.to_json()},
    "restart-run": {"ok": True, "result": "run_at_1 will resume at its first unfinished step"},
    "pause": {"ok": False, "error": "already paused"},
    "resume": {"ok": True, "result": "resumed"},
    "poll": {"ok": True, "result": "polling the review database now"},
}


def _echo_reply(args: dict[str, Any]) -> dict[str, Any]:
    if args.get("peer") == "research":
        result = {"peer": "RESEARCH@10.0.0.6:4242", "ok": False, "seconds": 0.01, "status": None}
        return {"ok": True, "result": {**result, "error": "no connection (refused)"}}
    result = {"peer": "STAGING@10.0.0.5:4242", "ok": True, "seconds": 0.003, "status": 0}
    return {"ok": True, "result": {**result, "error": ""}}


@pytest.fixture
def daemon_socket(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """A Unix socket that records each request line and answers as the daemon does."""
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
                if req["command"] == "echo":
                    reply = _echo_reply(req["args"])
                else:
                    reply = REPLIES.get(req["command"], {"ok": False, "error": "unknown command"})
                conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, seen
    server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
    server.close()
    thread.join(timeout=5)


def _ctl(path: Path, *argv: str) -> int:
    return ctl.main(["--socket", str(path), *argv])


def test_status_sends_one_json_line(
    daemon_socket: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, seen = daemon_socket
    assert _ctl(path, "status", "--json") == ctl.EXIT_OK
    assert seen == [{"command": "status", "args": {}}]
    printed = json.loads(capsys.readouterr().out)
    assert printed == STATUS.to_json()
    assert StatusReport.from_json(printed) == STATUS  # the same model, read back


def test_status_is_readable(
    daemon_socket: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = daemon_socket
    assert _ctl(path, "status") == ctl.EXIT_OK
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "state     running run_at_1764000000: pushing"
    assert lines[1] == "run       run_at_1764000000: pushing"
    assert "scp       ANONPIPE on 0.0.0.0:11112, listening, 1 active, 12 landed" in text
    assert "refused not expected: 2" in text
    assert "staging   STAGING@10.0.0.5:4242: ok" in lines
    research = next(line for line in lines if line.startswith("research "))
    assert "UNREACHABLE since " in research and "no connection" in research
    assert "asking again about" in research
    header = next(line for line in lines if line.startswith("study"))
    assert header.split() == list(ctl._STUDY_COLUMNS)
    assert any(line.split()[:2] == ["9", "held"] and "reviews conflict" in line for line in lines)
    # Per study in its push: the retries so far and the last refusal or abort.
    assert (
        "  study 7: 2 of 6 in the research PACS, 2 retries, last refusal or abort: "
        "association aborted by the peer"
    ) in lines
    assert "held back (reviews conflict):" in lines and "  study 9: reviews conflict" in text
    assert "deferred (failed again; tried later):" in lines and "after 2 failures" in text
    assert lines[-1].endswith("every file was quarantined")


def test_status_of_a_paused_and_blocked_daemon() -> None:
    report = StatusReport(
        state="blocked: misroute detected, pulls stopped",
        service=ServiceState.BLOCKED,
        paused=True,
        paused_since="2026-11-24T16:00:00+00:00",
        misroute="STAGING reported 5 completed but 0 reached ANONPIPE",
    )
    lines = ctl.format_status(report).splitlines()
    assert lines[0] == "state     blocked: misroute detected, pulls stopped"
    assert lines[1].startswith("paused    since 2026-11-24 ") and "anonpipectl resume" in lines[1]
    assert lines[2].startswith("MISROUTE  STAGING reported")
    assert ctl.format_status(report.to_json()) == "\n".join(lines)  # a reply reads the same


def test_runs(
    daemon_socket: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = daemon_socket
    assert _ctl(path, "runs") == ctl.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "state", "started", "finished", "took", "kind", "error"]
    assert lines[1].split()[:2] == ["run_at_1763990000", "done"]
    assert "2:05" in lines[1] and "practice" in lines[1]
    assert lines[2].split()[:2] == ["run_at_1764000000", "pushing"]
    assert _ctl(path, "runs", "--json") == ctl.EXIT_OK
    runs = json.loads(capsys.readouterr().out)
    assert [RunSummary.from_json(r) for r in runs] == [DONE, RUN]


def test_show(
    daemon_socket: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, seen = daemon_socket
    assert _ctl(path, "show", DONE.name) == ctl.EXIT_OK
    assert seen[-1] == {"command": "show", "args": {"run": DONE.name}}
    text = capsys.readouterr().out
    assert text.startswith("run       run_at_1763990000 (practice): done\n")
    assert "folder    /var/lib/anonpipe/data/run_at_1763990000" in text
    assert "(took 2:05)" in text
    assert "8      failed-reported" in text and "every file was quarantined" in text
    assert text.endswith("overview.txt:\n  Starting at 2026-11-24 14:13\n"
                         "  1 valid reviewed studies. Please review comments.txt\n")  # fmt: skip
    assert _ctl(path, "show", DONE.name, "--json") == ctl.EXIT_OK
    assert RunDetail.from_json(json.loads(capsys.readouterr().out)) == DETAIL


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["restart-run"], "run_at_1 will resume at its first unfinished step"),
        (["resume"], "resumed"),
        (["poll"], "polling the review database now"),
    ],
)
def test_sentences(
    daemon_socket: tuple[Path, list[dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    text: str,
) -> None:
    path, _ = daemon_socket
    assert _ctl(path, *argv) == ctl.EXIT_OK
    assert capsys.readouterr().out == text + "\n"
    assert _ctl(path, *argv, "--json") == ctl.EXIT_OK
    assert json.loads(capsys.readouterr().out) == text


def test_echo_says_ok_or_failed_and_exits_accordingly(
    daemon_socket: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, seen = daemon_socket
    assert _ctl(path, "echo", "staging") == ctl.EXIT_OK
    assert seen[-1] == {"command": "echo", "args": {"peer": "staging"}}
    assert capsys.readouterr().out == "staging: STAGING@10.0.0.5:4242: ok (3 ms)\n"
    assert _ctl(path, "echo", "research") == ctl.EXIT_FAILURE
    out = capsys.readouterr().out
    assert out == "research: RESEARCH@10.0.0.6:4242: FAILED: no connection (refused)\n"
    assert _ctl(path, "echo", "research", "--json") == ctl.EXIT_FAILURE
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_daemon_error_is_a_failure(
    daemon_socket: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = daemon_socket
    assert _ctl(path, "pause") == ctl.EXIT_FAILURE
    captured = capsys.readouterr()
    assert captured.err == "anonpipectl: already paused\n" and captured.out == ""


def test_a_reply_not_understood_is_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.makefile("rb").readline()
                conn.sendall(b'{"ok": true, "result": {"studies": 3}}\n')

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        assert _ctl(path, "status") == ctl.EXIT_FAILURE
        thread.join(5)
    err = capsys.readouterr().err
    assert "reply was not understood" in err and "StatusReport" in err


def test_absent_daemon_is_unreachable_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _ctl(tmp_path / "none.sock", "status") == ctl.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "no control socket" in err and "anonpipe daemon" in err


def test_a_dead_socket_is_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # bound, never listening: a daemon that died
    assert _ctl(path, "runs", "--json") == ctl.EXIT_UNREACHABLE
    assert "cannot talk to the daemon" in capsys.readouterr().err


def test_socket_from_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "anonpipe.toml"
    config.write_text(
        f'[pipeline]\ndata_dir = "{tmp_path}/data"\n[control]\nsocket = "{tmp_path}/c.sock"\n'
    )
    assert ctl.main(["-c", str(config), "runs"]) == ctl.EXIT_UNREACHABLE
    assert str(tmp_path / "c.sock") in capsys.readouterr().err


def test_bad_configuration_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "anonpipe.toml"
    config.write_text("[control]\nsockett = 'x'\n")
    assert ctl.main(["-c", str(config), "status"]) == ctl.EXIT_USAGE
    assert "control.sockett" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["echo", "pacs"], ["show"]])
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(argv) == ctl.EXIT_USAGE
    assert "usage: anonpipectl" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--help"]) == ctl.EXIT_OK
    text = capsys.readouterr().out
    assert "exit codes:" in text
    for code in ("0  done", "1  the daemon refused", "2  usage", "3  the daemon could not"):
        assert code in text
    assert ctl.main(["status", "--help"]) == ctl.EXIT_OK
    assert "--json" in capsys.readouterr().out


@pytest.mark.parametrize("reader", ["head -1", "true", "head -c 10"])
def test_a_closed_pipe_ends_quietly(
    daemon_socket: tuple[Path, list[dict[str, Any]]], tmp_path: Path, reader: str
) -> None:
    """``anonpipectl status | head -1`` exits 0 without a traceback; so does a reader that
    reads nothing (``true`` closes the pipe before anonpipectl writes: a sure EPIPE)."""
    path, _ = daemon_socket
    for command in ("status", "runs", "show run_at_1763990000", "status --json"):
        done = shell(f"anonpipectl --socket {path} {command} | {reader}", tmp_path)
        assert done.returncode == 0, (command, done.stderr)
        assert done.stderr == "", command
    done = shell(f"anonpipectl --socket {path} status | {reader}", tmp_path)
    if reader == "head -1":
        assert done.stdout == "state     running run_at_1764000000: pushing\n"


def test_a_closed_pipe_keeps_the_exit_code(
    daemon_socket: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    path, _ = daemon_socket
    done = shell(f"anonpipectl --socket {path} echo research | true", tmp_path)
    assert (done.returncode, done.stderr) == (ctl.EXIT_FAILURE, "")
    done = shell(f"anonpipectl --socket {tmp_path}/none.sock status | true", tmp_path)
    assert done.returncode == ctl.EXIT_UNREACHABLE and "no control socket" in done.stderr
    done = shell("anonpipectl --help | head -1", tmp_path)
    assert (done.returncode, done.stderr) == (0, "")


def test_check_config_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    config = tmp_path / "anonpipe.toml"
    config.write_text(f'[pipeline]\ndata_dir = "{tmp_path}/data"\n')
    for reader in ("head -1", "true"):
        done = shell(f"anonpipe check-config -c {config} | {reader}", tmp_path)
        assert (done.returncode, done.stderr) == (0, ""), reader
    done = shell(f"anonpipe check-config -c {config} | head -1", tmp_path)
    assert done.stdout.startswith("# anonpipe configuration from")
