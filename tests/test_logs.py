"""The logging set-up: formats, and no identifier reaching a log at any level."""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
import structlog
from pydicom import config as pydicom_config
from pydicom.valuerep import validate_value
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
)

from anonpipe import logs
from anonpipe.daemon.pipeline import Step, enter_step, in_step
from tests.harness.ports import free_port
from tests.harness.studygen import generate


def _exercise_network(paths: list[Path], find_name: str) -> None:
    """C-STORE files and a C-FIND by patient name over a real pynetdicom association."""
    log = logs.get_logger("anonpipe.test")

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        log.info(
            "received",
            dataset=ds,
            patient_name=ds.PatientName,
            sop_instance_uid=ds.SOPInstanceUID,
            accession_number=ds.AccessionNumber,
        )
        return 0x0000

    def on_find(event: evt.Event) -> Iterator[tuple[int, None]]:
        log.debug("find", identifier=event.identifier)
        yield 0x0000, None

    port = free_port()
    scp = AE(ae_title="LOGTEST")
    scp.add_supported_context(CTImageStorage)
    scp.add_supported_context(MRImageStorage)
    scp.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
    server = scp.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_C_FIND, on_find)],
    )
    assert server is not None
    try:
        scu = AE(ae_title="LOGSCU")
        scu.add_requested_context(CTImageStorage)
        scu.add_requested_context(MRImageStorage)
        scu.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
        assoc = scu.associate("127.0.0.1", port, ae_title="LOGTEST")
        assert assoc.is_established
        for path in paths:
            status = assoc.send_c_store(pydicom.dcmread(path))
            assert status.Status == 0x0000
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientName = find_name
        query.PatientID = ""
        for _status, _identifier in assoc.send_c_find(
            query, PatientRootQueryRetrieveInformationModelFind
        ):
            pass
        assoc.release()
    finally:
        server.shutdown()


def test_planted_identifiers_never_reach_the_log(tmp_path: Path, log_output: io.StringIO) -> None:
    manifest = generate(tmp_path / "in", series_per_study=1, instances_per_series=2, seed=7)
    paths = list(manifest.paths)
    patient_name = str(pydicom.dcmread(paths[0]).PatientName)
    _exercise_network(paths, patient_name)

    log = logs.get_logger("anonpipe.test")
    first = pydicom.dcmread(paths[0])
    try:  # an exception whose message quotes a value, logged with its traceback
        raise ValueError(f"cannot parse {first.PatientID!r} in {first.StudyInstanceUID}")
    except ValueError:
        log.exception("parse failed")
    with warnings.catch_warnings():  # pydicom's validation warnings quote the offending value
        warnings.simplefilter("always")
        validate_value("CS", str(first.AccessionNumber).lower(), pydicom_config.WARN)
    logging.getLogger("pydicom").warning("bad value '%s'", first.OtherPatientIDs)

    output = log_output.getvalue()
    assert '"event": "received"' in output, "the handler's events were not logged"
    assert "Association Accepted" in output or "Accept Parameters" in output, (
        "pynetdicom's debug output was not captured, so the test proves nothing"
    )
    assert "parse failed" in output and "Traceback" in output
    leaked = manifest.find_planted(output.encode(), uids=True, dates=False)
    assert not leaked, f"{len(leaked)} planted identifiers reached the log"


def test_the_leak_check_can_fail(tmp_path: Path, log_output: io.StringIO) -> None:
    """With pynetdicom's identifier logging forced back on, the same check sees the name."""
    manifest = generate(tmp_path / "in", series_per_study=1, instances_per_series=1, seed=8)
    paths = list(manifest.paths)
    patient_name = str(pydicom.dcmread(paths[0]).PatientName)
    _config.LOG_REQUEST_IDENTIFIERS = True
    try:
        _exercise_network(paths, patient_name)
    finally:
        _config.LOG_REQUEST_IDENTIFIERS = False
    assert manifest.find_planted(log_output.getvalue().encode(), uids=False)


def test_json_lines_carry_level_logger_and_time(log_output: io.StringIO) -> None:
    logs.get_logger("anonpipe.unit").info("hello", files=3)
    line = json.loads(log_output.getvalue().strip().splitlines()[-1])
    assert line["event"] == "hello" and line["files"] == 3
    assert line["level"] == "info" and line["logger"] == "anonpipe.unit"
    assert line["timestamp"].endswith("Z")


def test_phi_named_fields_are_blanked(log_output: io.StringIO) -> None:
    logs.get_logger("anonpipe.unit").info("x", PatientID="SECRET1", accession_no="SECRET2")
    line = log_output.getvalue()
    assert "SECRET" not in line and line.count(logs.REDACTED) == 2


def test_redact_text_keeps_standard_uids() -> None:
    text = "ctx 1.2.840.10008.5.1.4.1.1.2 for 1.2.3.4.5.6 named 'DOE^JOHN'"
    assert logs.redact_text(text) == (
        f"ctx 1.2.840.10008.5.1.4.1.1.2 for {logs.REDACTED} named {logs.REDACTED}"
    )


def test_format_auto() -> None:
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    assert logs.resolve_format("auto", io.StringIO(), {}) == "json"
    assert logs.resolve_format("auto", tty, {}) == "console"
    assert logs.resolve_format("auto", io.StringIO(), {"JOURNAL_STREAM": "8:123"}) == "journal"
    assert logs.resolve_format("console", io.StringIO(), {"JOURNAL_STREAM": "8:1"}) == "console"


def test_journal_fields() -> None:
    rendered = logs.journal_fields(
        None, "warning", {"event": "peer down", "level": "warning", "peer": "research", "n": 2}
    )
    fields = json.loads(rendered)
    assert fields["MESSAGE"] == "peer down" and fields["PRIORITY"] == "4"
    assert fields["ANONPIPE_PEER"] == "research" and fields["ANONPIPE_N"] == "2"
    assert fields["SYSLOG_IDENTIFIER"] == "anonpipe"


def test_console_format_is_readable() -> None:
    buffer = io.StringIO()
    logs.configure_logging("info", "console", stream=buffer, environ={})
    try:
        logs.get_logger("anonpipe.unit").info("started", port=11112)
        logs.get_logger("anonpipe.unit").debug("hidden")
    finally:
        structlog.reset_defaults()
    text = buffer.getvalue()
    assert "started" in text and "port=11112" in text and "hidden" not in text


def test_bad_level_is_refused() -> None:
    with pytest.raises(ValueError, match="verbose"):
        logs.configure_logging("verbose", "json", stream=io.StringIO(), environ={})


# -- run, study and step on every line -------------------------------------------------------


def _lines(output: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.getvalue().splitlines()]


def _in_thread(target: Callable[[], None]) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


def test_run_scope_names_the_run_in_every_thread_until_it_ends(log_output: io.StringIO) -> None:
    log = logs.get_logger("anonpipe.unit")
    library = logging.getLogger("somelibrary")
    with logs.run_scope("run_at_1"):
        log.info("in the run")
        _in_thread(lambda: library.warning("a library's thread"))
        log.info("own run named", run="run_at_0")  # a line naming another run keeps it
    _in_thread(lambda: library.warning("after the run"))
    log.info("between runs")
    lines = {str(line["event"]): line.get(logs.RUN_FIELD) for line in _lines(log_output)}
    assert lines == {
        "in the run": "run_at_1",
        "a library's thread": "run_at_1",
        "own run named": "run_at_0",
        "after the run": None,
        "between runs": None,
    }


def test_steps_bind_study_and_step_and_restore_them(log_output: io.StringIO) -> None:
    log = logs.get_logger("anonpipe.unit")
    with logs.run_scope("run_at_2"), in_step(Step.PULL, 7):
        log.info("pulling")
        enter_step(Step.DEIDENTIFY)
        log.info("deidentifying")
        with in_step(Step.CHECK):
            log.info("nested")
        log.info("back")
    log.info("after")
    seen = {
        str(line["event"]): (line.get("run"), line.get("study"), line.get("step"))
        for line in _lines(log_output)
    }
    assert seen == {
        "pulling": ("run_at_2", 7, "pull"),
        "deidentifying": ("run_at_2", 7, "deidentify"),
        "nested": ("run_at_2", 7, "check"),
        "back": ("run_at_2", 7, "deidentify"),
        "after": (None, None, None),
    }


def test_carry_context_takes_the_fields_into_a_thread_pool(log_output: io.StringIO) -> None:
    library = logging.getLogger("somelibrary")

    def work(n: int) -> int:
        library.info("sending share %d", n)
        return n

    with (
        structlog.contextvars.bound_contextvars(study=7, step="push"),
        ThreadPoolExecutor(2) as pool,
    ):
        assert list(pool.map(logs.carry_context(work), [1, 2])) == [1, 2]
        assert list(pool.map(work, [3])) == [3]  # without: a pool thread has no context
    fields = {str(line["event"]): line.get("study") for line in _lines(log_output)}
    assert fields == {"sending share 1": 7, "sending share 2": 7, "sending share 3": None}


def test_share_context_lends_the_fields_to_a_library_thread(log_output: io.StringIO) -> None:
    """As for pynetdicom's DUL thread: it logs with the fields of the step it serves."""
    library = logging.getLogger("somelibrary")
    go, lent = threading.Event(), threading.Event()

    def reader() -> None:
        library.info("before")
        go.set()
        lent.wait(5)
        library.info("after")

    thread = threading.Thread(target=reader)
    thread.start()
    go.wait(5)
    with structlog.contextvars.bound_contextvars(study=9, step="pull"):
        logs.share_context(thread, None, object())  # what is not a thread is ignored
    lent.set()
    thread.join()
    fields = {str(x["event"]): (x.get("study"), x.get("step")) for x in _lines(log_output)}
    assert fields == {"before": (None, None), "after": (9, "pull")}


def test_journal_carries_run_study_and_step_as_fields() -> None:
    rendered = logs.journal_fields(
        None,
        "info",
        {"event": "push finished", "level": "info", "run": "run_at_3", "study": 12, "step": "push"},
    )
    fields = json.loads(rendered)
    assert fields["ANONPIPE_RUN"] == "run_at_3"
    assert fields["ANONPIPE_STUDY"] == "12" and fields["ANONPIPE_STEP"] == "push"
    absent = json.loads(logs.journal_fields(None, "info", {"event": "x", "study": None}))
    assert "ANONPIPE_STUDY" not in absent


def test_console_and_json_show_the_fields_as_keys(log_output: io.StringIO) -> None:
    with logs.run_scope("run_at_4"), in_step(Step.VERIFY, 5):
        logs.get_logger("anonpipe.unit").info("push verified")
    (line,) = _lines(log_output)
    assert (line["run"], line["study"], line["step"]) == ("run_at_4", 5, "verify")
    buffer = io.StringIO()
    logs.configure_logging("info", "console", stream=buffer, environ={})
    with logs.run_scope("run_at_4"), in_step(Step.VERIFY, 5):
        logs.get_logger("anonpipe.unit").info("push verified")
    text = buffer.getvalue()
    assert "run=run_at_4" in text and "study=5" in text and "step=verify" in text


def test_aiosqlite_chatter_stays_out_even_at_debug(log_output: io.StringIO) -> None:
    logging.getLogger("aiosqlite").debug("executing %r", ("SELECT ?", "1.2.3.4.5.6"))
    logging.getLogger("aiosqlite").warning("a real problem")
    events = [line["event"] for line in _lines(log_output)]
    assert events == ["a real problem"]
