"""Thin wrappers around DCMTK's command-line tools, used as independent DICOM peers.

Tests check anonpipe and the Orthanc fixtures with a second, unrelated implementation (DCMTK),
so a bug shared by our code and pynetdicom cannot hide itself. Every function runs one tool
against 127.0.0.1 with a timeout, captures its output and raises :class:`DcmtkError` (with the
command line and stderr) when it fails. :class:`StoreSCP` runs ``storescp`` as a receiver.

All tools run with ``TCP_NODELAY=1``: without it DCMTK waits about 45 ms per object on loopback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self, TypeAlias

from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.harness.orthanc import die_with_parent
from tests.harness.ports import LOOPBACK, free_port

__all__ = [
    "DcmtkError",
    "Keys",
    "MoveResult",
    "StoreSCP",
    "ToolResult",
    "echoscu",
    "find_study",
    "findscu",
    "movescu",
    "run_tool",
    "storescu",
]

#: Query keys: DICOM keyword (or ``gggg,eeee``) -> value; None asks for the attribute back
#: (an empty return key).
Keys: TypeAlias = Mapping[str, str | int | None]
QueryLevel: TypeAlias = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]

_MODEL_FLAG = {"study": "-S", "patient": "-P"}


class DcmtkError(RuntimeError):
    """A DCMTK tool failed, timed out or reported a failure status.

    Attributes
    ----------
    result : ToolResult or None
        What the tool printed (None if it could not be started).
    """

    def __init__(self, message: str, result: ToolResult | None = None) -> None:
        detail = ""
        if result is not None:
            detail = (
                f"\ncommand: {' '.join(result.args)}\nexit code: {result.returncode}"
                f"\nstderr (tail):\n{_tail(result.stderr)}\nstdout (tail):\n{_tail(result.stdout)}"
            )
        super().__init__(message + detail)
        self.result = result


@dataclass(frozen=True)
class ToolResult:
    """Outcome of one tool run."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def output(self) -> str:
        """stdout and stderr together (DCMTK logs to stderr)."""
        return self.stdout + self.stderr


@dataclass(frozen=True)
class MoveResult:
    """Outcome of a ``movescu`` run.

    Attributes
    ----------
    status : str
        The final C-MOVE response status as DCMTK names it, e.g. ``"Success"``.
    pending_responses : int
        Number of pending responses (Orthanc sends one per sub-operation).
    tool : ToolResult
        The raw run.
    """

    status: str
    pending_responses: int
    tool: ToolResult


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _tool_env() -> dict[str, str]:
    env = dict(os.environ, TCP_NODELAY="1")
    env.pop("NOTIFY_SOCKET", None)
    return env


def run_tool(args: Sequence[str], *, timeout: float = 60.0, check: bool = True) -> ToolResult:
    """Run a DCMTK tool and capture its output.

    Parameters
    ----------
    args : sequence of str
        Command line, tool name first.
    timeout : float, optional
        Seconds before the tool is killed.
    check : bool, optional
        Raise on a non-zero exit code.

    Raises
    ------
    DcmtkError
        If the tool is missing, times out, or (with `check`) exits non-zero.
    """
    if shutil.which(args[0]) is None:
        raise DcmtkError(f"{args[0]} not found: install the Debian package 'dcmtk'")
    start = time.monotonic()
    try:
        proc = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=_tool_env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        partial = ToolResult(
            tuple(args),
            -1,
            _decode(exc.stdout),
            _decode(exc.stderr),
            time.monotonic() - start,
        )
        raise DcmtkError(f"{args[0]} timed out after {timeout:.0f} s", partial) from None
    result = ToolResult(
        tuple(args), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start
    )
    if check and result.returncode != 0:
        raise DcmtkError(f"{args[0]} failed", result)
    return result


def _decode(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _association_args(calling_aet: str, called_aet: str, timeout: float) -> list[str]:
    seconds = str(max(1, int(timeout)))
    # -to: TCP connect timeout, -ta: association negotiation, -td: each DIMSE message.
    return ["-aet", calling_aet, "-aec", called_aet, "-to", seconds, "-ta", seconds, "-td", seconds]


def _key_args(keys: Keys) -> list[str]:
    args: list[str] = []
    for key, value in keys.items():
        args += ["-k", key if value is None else f"{key}={value}"]
    return args


def echoscu(
    port: int,
    *,
    host: str = LOOPBACK,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "ECHOSCU",
    timeout: float = 30.0,
    tls: Sequence[str] = (),
) -> ToolResult:
    """C-ECHO a peer; raise :class:`DcmtkError` if it does not answer with Success. `tls`: DCMTK
    TLS options (:func:`tests.harness.tls.dcmtk_tls`)."""
    return run_tool(
        [
            "echoscu",
            "-v",
            *tls,
            *_association_args(calling_aet, called_aet, timeout),
            host,
            str(port),
        ],
        timeout=timeout + 5,
    )


def findscu(
    port: int,
    keys: Keys,
    *,
    level: QueryLevel = "STUDY",
    host: str = LOOPBACK,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "FINDSCU",
    model: Literal["study", "patient"] = "study",
    timeout: float = 30.0,
) -> list[Dataset]:
    """C-FIND and return every response identifier.

    Parameters
    ----------
    port : int
        The peer's DICOM port.
    keys : Keys
        Matching and return keys, e.g. ``{"StudyInstanceUID": uid,
        "NumberOfStudyRelatedInstances": None}``. ``QueryRetrieveLevel`` comes from `level`.
    level : {"PATIENT", "STUDY", "SERIES", "IMAGE"}, optional
        Query/Retrieve level.
    model : {"study", "patient"}, optional
        Study Root (default) or Patient Root information model.

    Returns
    -------
    list of Dataset
        The identifiers of the pending responses, as ``findscu --extract`` wrote them.

    Raises
    ------
    DcmtkError
        If the association or the query fails.
    """
    with tempfile.TemporaryDirectory(prefix="findscu-") as out:
        run_tool(
            [
                "findscu",
                "-v",
                _MODEL_FLAG[model],
                *_association_args(calling_aet, called_aet, timeout),
                "-X",
                "-od",
                out,
                *_key_args({"QueryRetrieveLevel": level, **keys}),
                host,
                str(port),
            ],
            timeout=timeout + 5,
        )
        return [dcmread(path, force=True) for path in sorted(Path(out).glob("rsp*.dcm"))]


def find_study(
    port: int,
    study_uid: str,
    *,
    host: str = LOOPBACK,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "FINDSCU",
    return_keys: Iterable[str] = (
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "ModalitiesInStudy",
    ),
    timeout: float = 30.0,
) -> Dataset | None:
    """C-FIND one study by Study Instance UID only (Orthanc matches on Accession Number instead
    whenever that key is present) and return its identifier, or None if the peer has no match.

    Raises
    ------
    DcmtkError
        If the query fails or more than one study matches.
    """
    keys: dict[str, str | int | None] = {"StudyInstanceUID": study_uid}
    keys.update(dict.fromkeys(return_keys))
    found = findscu(
        port,
        keys,
        level="STUDY",
        host=host,
        called_aet=called_aet,
        calling_aet=calling_aet,
        timeout=timeout,
    )
    if len(found) > 1:
        raise DcmtkError(f"{len(found)} studies match Study Instance UID {study_uid}")
    return found[0] if found else None


_FINAL_MOVE = re.compile(r"Received Final Move Response \(([^)]*)\)")


def movescu(
    port: int,
    destination: str,
    keys: Keys,
    *,
    level: QueryLevel = "STUDY",
    host: str = LOOPBACK,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "MOVESCU",
    model: Literal["study", "patient"] = "study",
    timeout: float = 120.0,
) -> MoveResult:
    """C-MOVE to a third party (`destination` AE title), as an operator would with DCMTK.

    Parameters
    ----------
    destination : str
        Move destination AE title; the peer must know it (Orthanc: ``DicomModalities``).
    keys : Keys
        Identifier, e.g. ``{"StudyInstanceUID": uid}``; ``QueryRetrieveLevel`` comes from
        `level`.

    Returns
    -------
    MoveResult
        Final status "Success" (anything else raises).

    Raises
    ------
    DcmtkError
        If the move fails, partly fails (Warning) or times out.
    """
    tool = run_tool(
        [
            "movescu",
            "-v",
            _MODEL_FLAG[model],
            *_association_args(calling_aet, called_aet, timeout),
            "-aem",
            destination,
            *_key_args({"QueryRetrieveLevel": level, **keys}),
            host,
            str(port),
        ],
        timeout=timeout + 5,
        check=False,
    )
    match = _FINAL_MOVE.search(tool.output)
    status = match.group(1) if match else "no final response"
    if tool.returncode != 0 or status != "Success":
        raise DcmtkError(f"C-MOVE to {destination} ended with status {status!r}", tool)
    pending = len(re.findall(r"Received Move Response \d+ \(Pending\)", tool.output))
    return MoveResult(status=status, pending_responses=pending, tool=tool)


def storescu(
    port: int,
    paths: Iterable[Path | str],
    *,
    host: str = LOOPBACK,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "STORESCU",
    propose: str = "--propose-rle",
    timeout: float = 120.0,
    tls: Sequence[str] = (),
) -> ToolResult:
    """C-STORE files (or directories, recursively) in one association.

    Only the presentation contexts the files need are proposed (``--required``); `propose`
    chooses their transfer syntaxes. The default proposes RLE Lossless and every uncompressed
    syntax, which covers all that :mod:`tests.harness.studygen` writes: ``storescu`` cannot
    decompress on the fly, so a file is only sent in its own transfer syntax.

    Raises
    ------
    DcmtkError
        If the association fails or any store is refused.
    """
    files = [str(p) for p in paths]
    if not files:
        raise ValueError("storescu needs at least one file or directory")
    return run_tool(
        [
            "storescu",
            "-v",
            *tls,
            "--required",
            propose,
            "+sd",
            "+r",
            *_association_args(calling_aet, called_aet, timeout),
            host,
            str(port),
            *files,
        ],
        timeout=timeout + 5,
    )


class StoreSCP:
    """DCMTK ``storescp`` as a Storage SCP on a free loopback port.

    Parameters
    ----------
    output_dir : Path or None
        Where received files are written (created if needed); None discards them
        (``--ignore``, a throughput sink).
    aet : str, optional
        AE title it answers to.
    port : int or None, optional
        Port; a free one by default.
    accept_all : bool, optional
        Accept every transfer syntax DCMTK knows (``+xa``), compressed included.
    fork : bool, optional
        ``--fork``: a child process per association, so parallel senders do not queue (the
        default single-process mode serves one association at a time).
    tls : sequence of str, optional
        DCMTK TLS options (:func:`tests.harness.tls.dcmtk_tls`): ``storescp`` then speaks only
        TLS, and the readiness echo uses the same identity.
    """

    def __init__(
        self,
        output_dir: Path | None,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        accept_all: bool = True,
        fork: bool = False,
        tls: Sequence[str] = (),
    ) -> None:
        self.output_dir = output_dir
        self.tls = list(tls)
        self.aet = aet
        self.port = port or free_port()
        self.accept_all = accept_all
        self.fork = fork
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Self:
        """Start ``storescp`` and wait until it accepts an association."""
        args = ["storescp", *self.tls, "-aet", self.aet]
        if self.fork:
            args.append("--fork")
        if self.accept_all:
            args.append("+xa")
        if self.output_dir is None:
            args.append("--ignore")
        else:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            args += ["-od", str(self.output_dir)]
        args.append(str(self.port))
        # A file, not a pipe: nobody reads the output while it runs, so a pipe could fill up.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_tool_env(),
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                output = self.log_text()
                self.stop()
                raise DcmtkError(f"storescp exited with code {code}: {output}")
            try:
                echoscu(self.port, called_aet=self.aet, timeout=2, tls=self.tls)
                return self
            except DcmtkError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate ``storescp`` (kill after `timeout` seconds); idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def log_text(self) -> str:
        """What ``storescp`` printed so far."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def received(self) -> list[Path]:
        """Files received so far (empty with ``output_dir=None``)."""
        if self.output_dir is None:
            return []
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
