"""The de-identification workers' log lines: formatted and redacted as the daemon's, and carrying
the run, study and step of the file they work on."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

#: Run as its own process, like the daemon: JSON logging to stderr, a second thread running so the
#: workers come from a forkserver (they inherit nothing of this process's logging set-up).
_SCRIPT = """
import asyncio, sys, threading
from pathlib import Path

import structlog

from anonpipe import logs
from anonpipe.anon.batch import EngineSpec
from anonpipe.daemon.pipeline import Step, in_step
from anonpipe.daemon.workers import DeidWorkers

logs.configure_logging("info", "json", stream=sys.stderr, environ={})
threading.Thread(target=threading.Event().wait, daemon=True).start()
source, clean, quarantine, db = map(Path, sys.argv[1:5])
spec = EngineSpec(db, b"k" * 32, (), "shift", ("CT",))


async def main() -> None:
    workers = DeidWorkers(spec, 1)
    try:
        with logs.run_scope("run_at_9"), in_step(Step.PULL, 42):
            fields = {**structlog.contextvars.get_contextvars(), "step": "deidentify"}
            outcome = await workers.submit((source, clean, quarantine), fields)
    finally:
        workers.shutdown()
    print(outcome.status)


asyncio.run(main())
"""

CHARSET = "ISO_IR 999"  # unknown: pydicom warns as the engine decodes the name, quoting it
NAME = "PLANTEDSURNAME^GIV\xc9N"


def _object_pydicom_warns_about(path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.add_new(0x00080005, "CS", CHARSET)  # Specific Character Set
    ds.add_new(0x00100010, "PN", NAME.encode("latin-1"))  # Patient's Name
    ds.PatientID = "PLANTEDID77"
    ds.PatientBirthDate = "19700317"
    with warnings.catch_warnings():  # this process's own warnings are not the test's
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)


def test_a_workers_lines_are_the_daemons_and_name_run_study_and_step(tmp_path: Path) -> None:
    source = tmp_path / "in.dcm"
    _object_pydicom_warns_about(source)
    for folder in ("clean", "quarantine"):
        (tmp_path / folder).mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _SCRIPT,
            str(source),
            str(tmp_path / "clean"),
            str(tmp_path / "quarantine"),
            str(tmp_path / "identity.db"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() in ("clean", "quarantined")
    lines = done.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line JSON: none printed raw
    from_worker = [r for r in records if r.get("logger") in ("pydicom", "py.warnings")]
    assert from_worker, f"the worker logged nothing, so the test proves nothing: {lines[:5]}"
    for record in from_worker:
        assert (record.get("run"), record.get("study"), record.get("step")) == (
            "run_at_9",
            42,
            "deidentify",
        ), record
    assert any("Unknown encoding" in str(r["event"]) for r in from_worker)
    for planted in (CHARSET, "PLANTEDSURNAME", "PLANTEDID77", "19700317"):
        assert planted not in done.stderr
