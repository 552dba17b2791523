"""Disposable Orthanc servers for tests and benchmarks.

Each :class:`OrthancServer` is a real Debian ``Orthanc`` process with its own generated
configuration, free loopback ports and temporary storage, so tests exercise a real PACS (C-ECHO,
C-FIND, C-MOVE, C-STORE, transfer syntax negotiation) rather than a mock. The REST helpers use only
the standard library so the harness adds no dependency.

Examples
--------
>>> with OrthancFactory() as start:                       # doctest: +SKIP
...     research = start("RESEARCH")
...     staging = start("STAGING", modalities={"research": research})
...     staging.upload(manifest.paths)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeAlias

from tests.harness.ports import LOOPBACK, free_ports

__all__ = [
    "Modality",
    "OrthancError",
    "OrthancFactory",
    "OrthancHTTPError",
    "OrthancServer",
    "PeerSpec",
    "die_with_parent",
    "find_orthanc_executable",
    "wait_for_stopped",
]

JsonObject: TypeAlias = dict[str, Any]

_DEFAULT_EXECUTABLE = "/usr/sbin/Orthanc"
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 40


class OrthancError(RuntimeError):
    """An Orthanc server could not be started, stopped or used."""


class OrthancHTTPError(OrthancError):
    """Orthanc answered a REST request with an HTTP error status.

    Attributes
    ----------
    status : int
        The HTTP status code.
    body : str
        The response body (Orthanc describes the error there).
    """

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body.strip()[:500]}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Modality:
    """A remote DICOM node as Orthanc's ``DicomModalities`` entry describes it.

    Attributes
    ----------
    name : str
        Orthanc's symbolic name for the peer (used in REST URLs).
    aet : str
        The peer's AE title; C-MOVE destinations are matched on it.
    host : str
        The peer's address.
    port : int
        The peer's DICOM port.
    tls : bool
        Orthanc's associations to this peer use DICOM TLS (``UseDicomTls``).
    """

    name: str
    aet: str
    host: str
    port: int
    tls: bool = False

    def to_orthanc(self) -> JsonObject:
        """Return the JSON object Orthanc accepts in its configuration and ``PUT /modalities``."""
        entry: JsonObject = {"AET": self.aet, "Host": self.host, "Port": self.port}
        if self.tls:
            entry["UseDicomTls"] = True
        return entry


def find_orthanc_executable() -> str:
    """Locate the Orthanc binary.

    ``$ANONPIPE_ORTHANC`` wins, then ``Orthanc`` on ``PATH``, then Debian's ``/usr/sbin/Orthanc``
    (``/usr/sbin`` is often not on a normal user's ``PATH``).

    Raises
    ------
    OrthancError
        If no executable is found; the message says how to install it.
    """
    candidates = [os.environ.get("ANONPIPE_ORTHANC"), shutil.which("Orthanc"), _DEFAULT_EXECUTABLE]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise OrthancError(
        "Orthanc executable not found: install the Debian package 'orthanc' "
        "or set ANONPIPE_ORTHANC to the binary's path"
    )


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies, even by SIGKILL.

    Meant as ``subprocess.Popen(preexec_fn=die_with_parent)`` so servers started by a test run
    never outlive it. Linux only; elsewhere a no-op. The signal follows the *thread* that
    started the child: start servers from the main thread or a long-lived one.
    """
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


# Servers still running; stopped at interpreter exit if a test or benchmark forgot to.
_running: weakref.WeakSet[OrthancServer] = weakref.WeakSet()
# Threads waiting for servers stopped with wait=False.
_reapers: list[threading.Thread] = []
_reapers_lock = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        server.stop()
    wait_for_stopped()


def wait_for_stopped() -> None:
    """Wait until every server stopped with ``stop(wait=False)`` has exited."""
    while True:
        with _reapers_lock:
            if not _reapers:
                return
            reaper = _reapers.pop()
        reaper.join()


def _finish(
    proc: subprocess.Popen[bytes] | None,
    log: IO[bytes] | None,
    timeout: float,
    cleanup: Path | None,
) -> None:
    """Wait for a terminated Orthanc (SIGKILL after `timeout`), then release its files."""
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if log is not None:
        log.close()
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)


class OrthancServer:
    """One Orthanc process with a generated configuration, reachable on 127.0.0.1.

    The configuration allows C-ECHO, C-FIND, C-MOVE and C-STORE from any calling AE (a C-MOVE
    destination must still be a known modality), keeps ``SynchronousCMove`` on (the final C-MOVE
    response only comes after every object was sent), disables remote HTTP access, authentication,
    plugins and storage compression, and runs the process with ``TCP_NODELAY=1`` (otherwise DCMTK
    inside Orthanc waits about 45 ms per received object).

    Parameters
    ----------
    aet : str
        Orthanc's own AE title (at most 16 characters); also its ``Name``.
    workdir : Path or None, optional
        Directory for the configuration, storage, index and log. When None a temporary
        directory is created and removed by :meth:`stop`.
    modalities : mapping of str to PeerSpec, optional
        Peers known from the start, by Orthanc's symbolic name. More can be added later with
        :meth:`add_modality` (for a peer whose port is known only after this server started).
    dicom_scu_timeout : int, optional
        Seconds Orthanc waits for a peer as SCU (``DicomScuTimeout``), including while sending
        C-MOVE sub-operations to a slow Storage SCP.
    startup_timeout : float, optional
        Seconds to wait for ``GET /system`` to answer after the process started.
    executable : str or None, optional
        Orthanc binary; see :func:`find_orthanc_executable` for the default.
    extra_config : mapping, optional
        Keys merged over the generated configuration last (for example
        ``{"UnknownSopClassAccepted": True}``).
    verbose : bool, optional
        Pass ``--verbose`` so the log shows each DICOM association.

    Attributes
    ----------
    host : str
        Always ``127.0.0.1``: Orthanc 1.10 cannot bind one interface, so we only ever use loopback.
    dicom_port, http_port : int
        Chosen when :meth:`start` runs (0 before).
    log_path : Path
        Orthanc's combined stdout and stderr.
    """

    host: str = LOOPBACK

    def __init__(
        self,
        aet: str,
        workdir: Path | None = None,
        modalities: Mapping[str, PeerSpec] | None = None,
        *,
        dicom_scu_timeout: int = 10,
        startup_timeout: float = 30.0,
        executable: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
        verbose: bool = False,
    ) -> None:
        if not aet or len(aet) > 16 or aet != aet.strip():
            raise ValueError(f"aet must be 1-16 characters without padding, got {aet!r}")
        self.aet = aet
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix=f"orthanc-{aet.lower()}-"))
            if workdir is None
            else Path(workdir)
        )
        self._modalities: dict[str, Modality] = {
            name: _to_modality(name, peer) for name, peer in (modalities or {}).items()
        }
        self.dicom_scu_timeout = dicom_scu_timeout
        self.startup_timeout = startup_timeout
        self.executable = executable or find_orthanc_executable()
        self.extra_config: dict[str, Any] = dict(extra_config or {})
        self.verbose = verbose
        self.dicom_port = 0
        self.http_port = 0
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return (
            f"OrthancServer(aet={self.aet!r}, dicom_port={self.dicom_port}, "
            f"http_port={self.http_port}, {state})"
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_running(self) -> bool:
        """Whether the Orthanc process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while running, else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def base_url(self) -> str:
        """Root URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    def as_modality(self, name: str | None = None) -> Modality:
        """Describe this server as a peer for another node's configuration.

        Parameters
        ----------
        name : str or None, optional
            Symbolic name; defaults to the lower-cased AE title.
        """
        if not self.dicom_port:
            raise OrthancError(f"{self.aet}: not started, its DICOM port is not known yet")
        return Modality(name or self.aet.lower(), self.aet, self.host, self.dicom_port)

    def build_config(self) -> JsonObject:
        """Return the Orthanc configuration for the current ports and modalities."""
        storage = self.workdir / "storage"
        index = self.workdir / "index"
        tmp = self.workdir / "tmp"
        config: JsonObject = {
            "Name": self.aet,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(index),
            "TemporaryDirectory": str(tmp),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {
                name: modality.to_orthanc() for name, modality in self._modalities.items()
            },
            "DicomScuTimeout": self.dicom_scu_timeout,
            # Close SCU associations as soon as Orthanc is done, so peers see a clean release.
            "DicomAssociationCloseDelay": 0,
            "SynchronousCMove": True,
            "SaveJobs": False,
            "OverwriteInstances": False,
        }
        config.update(self.extra_config)
        return config

    def start(self, *, same_ports: bool = False) -> Self:
        """Start Orthanc and wait until its REST API and DICOM port answer.

        Ports are chosen here; if another process takes one in the short window before Orthanc
        binds it, start is retried with new ports. With `same_ports`, a restart keeps the ports
        of the previous start (a PACS coming back where its clients expect it).

        Returns
        -------
        OrthancServer
            ``self``, for chaining.

        Raises
        ------
        OrthancError
            If Orthanc exits or does not answer within `startup_timeout`; the message includes
            the tail of its log.
        """
        if self.is_running:
            raise OrthancError(f"{self.aet}: already running (pid {self.pid})")
        for directory in ("storage", "index", "tmp"):
            (self.workdir / directory).mkdir(parents=True, exist_ok=True)
        attempt = 1
        while True:
            if not (same_ports and attempt == 1 and self.dicom_port and self.http_port):
                self.dicom_port, self.http_port = free_ports(2)
            self.config_path.write_text(json.dumps(self.build_config(), indent=2))
            self._spawn()
            try:
                self._wait_ready()
            except OrthancError as exc:
                self._terminate()
                if "already in use" not in str(exc) or attempt >= _PORT_ATTEMPTS:
                    raise
                attempt += 1
            else:
                _running.add(self)
                return self

    def _spawn(self) -> None:
        env = dict(os.environ, TCP_NODELAY="1")
        # Never let a test Orthanc notify a systemd supervisor of the test runner.
        env.pop("NOTIFY_SOCKET", None)
        args = [self.executable, str(self.config_path)]
        if self.verbose:
            args.insert(1, "--verbose")
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            preexec_fn=die_with_parent,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise OrthancError(
                    f"{self.aet}: Orthanc exited with code {code} during start-up "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise OrthancError(
                    f"{self.aet}: Orthanc did not answer GET /system on port {self.http_port} "
                    f"within {self.startup_timeout:.0f} s (log {self.log_path}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            system = self.get_json("/system", timeout=1.0)
        except (OSError, OrthancError):
            return False
        if system.get("DicomAet") != self.aet:
            raise OrthancError(
                f"{self.aet}: port {self.http_port} is answered by another server "
                f"({system.get('DicomAet')!r})"
            )
        try:
            with socket.create_connection((self.host, self.dicom_port), timeout=1.0):
                return True
        except OSError:
            return False

    def _terminate(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        log, self._log = self._log, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
        _finish(proc, log, timeout, None)

    def stop(self, timeout: float = 10.0, *, wait: bool = True) -> None:
        """Stop Orthanc: SIGTERM, then SIGKILL after `timeout` seconds; idempotent.

        A temporary working directory created by the constructor is removed afterwards.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait for a clean exit before SIGKILL.
        wait : bool, optional
            Orthanc 1.10 needs about 3.5 s to shut down cleanly. With ``wait=False`` the SIGTERM
            is sent now and a background thread waits (and kills if needed), so a test's teardown
            does not pay that time; :func:`wait_for_stopped` joins those threads, and the
            interpreter joins them at exit in any case.
        """
        proc, self._proc = self._proc, None
        log, self._log = self._log, None
        _running.discard(self)
        if proc is not None and proc.poll() is None:
            proc.terminate()
        cleanup = self.workdir if self._own_workdir else None
        if wait:
            _finish(proc, log, timeout, cleanup)
            return
        reaper = threading.Thread(
            target=_finish,
            args=(proc, log, timeout, cleanup),
            name=f"stop-orthanc-{self.aet}",
            daemon=False,  # the interpreter joins it before exiting: nothing leaks
        )
        reaper.start()
        with _reapers_lock:
            _reapers.append(reaper)

    def __enter__(self) -> Self:
        return self if self.is_running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last `lines` lines of Orthanc's log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ REST plumbing

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str | None = None,
        timeout: float = 60.0,
    ) -> bytes:
        """Send one REST request to this server and return the response body.

        Proxies from the environment are ignored: the server is always on loopback.

        Raises
        ------
        OrthancHTTPError
            For an HTTP error status.
        OSError
            If the server cannot be reached.
        """
        headers = {"Content-Type": content_type} if content_type else {}
        req = urllib.request.Request(
            self.base_url + path, data=body, method=method, headers=headers
        )
        try:
            with self._opener.open(req, timeout=timeout) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            raise OrthancHTTPError(
                method, path, exc.code, exc.read().decode(errors="replace")
            ) from None

    def get_json(self, path: str, *, timeout: float = 60.0) -> Any:
        """``GET`` `path` and decode the JSON answer."""
        return json.loads(self.request("GET", path, timeout=timeout))

    def post_json(self, path: str, payload: Any, *, timeout: float = 60.0) -> Any:
        """``POST`` `payload` as JSON to `path` and decode the JSON answer (None if empty)."""
        data = self.request(
            "POST",
            path,
            json.dumps(payload).encode(),
            content_type="application/json",
            timeout=timeout,
        )
        return json.loads(data) if data.strip() else None

    def put_json(self, path: str, payload: Any, *, timeout: float = 60.0) -> Any:
        """``PUT`` `payload` as JSON to `path` and decode the JSON answer (None if empty)."""
        data = self.request(
            "PUT",
            path,
            json.dumps(payload).encode(),
            content_type="application/json",
            timeout=timeout,
        )
        return json.loads(data) if data.strip() else None

    def delete(self, path: str) -> None:
        """``DELETE`` the resource at `path`."""
        self.request("DELETE", path)

    # ------------------------------------------------------------------ REST helpers

    def system(self) -> JsonObject:
        """``GET /system``: version, AE title, ports."""
        result: JsonObject = self.get_json("/system")
        return result

    def statistics(self) -> JsonObject:
        """``GET /statistics``: totals such as ``CountInstances`` and ``CountStudies``."""
        result: JsonObject = self.get_json("/statistics")
        return result

    def upload_bytes(self, data: bytes) -> str:
        """Store one DICOM file (``POST /instances``) and return its Orthanc instance id.

        Raises
        ------
        OrthancHTTPError
            If Orthanc refuses the file (for example an unknown SOP class).
        """
        answer = json.loads(
            self.request("POST", "/instances", data, content_type="application/dicom")
        )
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"{self.aet}: upload not stored: {answer}")
        instance_id: str = answer["ID"]
        return instance_id

    def upload(self, paths: Iterable[Path | str]) -> list[str]:
        """Store DICOM files over REST; return their Orthanc instance ids in order."""
        return [self.upload_bytes(Path(path).read_bytes()) for path in paths]

    def upload_dir(self, directory: Path | str) -> list[str]:
        """Store every regular file below `directory` (recursively, sorted)."""
        return self.upload(sorted(p for p in Path(directory).rglob("*") if p.is_file()))

    def patients(self) -> list[str]:
        """Orthanc ids of all patients."""
        result: list[str] = self.get_json("/patients")
        return result

    def studies(self) -> list[str]:
        """Orthanc ids of all studies."""
        result: list[str] = self.get_json("/studies")
        return result

    def series(self) -> list[str]:
        """Orthanc ids of all series."""
        result: list[str] = self.get_json("/series")
        return result

    def instances(self) -> list[str]:
        """Orthanc ids of all instances."""
        result: list[str] = self.get_json("/instances")
        return result

    def find(
        self, level: str, query: Mapping[str, str], *, expand: bool = True
    ) -> list[JsonObject]:
        """Search the local database (``POST /tools/find``).

        Parameters
        ----------
        level : {"Patient", "Study", "Series", "Instance"}
            The level of the resources returned.
        query : mapping
            DICOM keyword -> value (exact match, or Orthanc wildcards).
        expand : bool, optional
            Return full resource descriptions (with ``MainDicomTags``) instead of ids only.

        Returns
        -------
        list of dict
            Resource descriptions; with ``expand=False`` dicts of the form ``{"ID": ...}``.
        """
        answer = self.post_json(
            "/tools/find", {"Level": level, "Query": dict(query), "Expand": expand}
        )
        if expand:
            found: list[JsonObject] = answer
            return found
        return [{"ID": resource_id} for resource_id in answer]

    def study_instance_uids(self) -> set[str]:
        """The Study Instance UIDs of all stored studies."""
        studies = self.get_json("/studies?expand")
        return {study["MainDicomTags"]["StudyInstanceUID"] for study in studies}

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc id of the study with Study Instance UID `study_uid`, or None if absent."""
        found = self.find("Study", {"StudyInstanceUID": study_uid}, expand=False)
        return str(found[0]["ID"]) if found else None

    def instance_ids(self, study_uid: str | None = None) -> list[str]:
        """Orthanc ids of all instances, or of those of one study."""
        if study_uid is None:
            return self.instances()
        return [str(i["ID"]) for i in self.find("Instance", {"StudyInstanceUID": study_uid})]

    def sop_instance_uids(self, study_uid: str | None = None) -> set[str]:
        """SOP Instance UIDs of all stored instances, or of those of one study."""
        if study_uid is None:
            instances = self.get_json("/instances?expand")
        else:
            instances = self.find("Instance", {"StudyInstanceUID": study_uid})
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}

    def count_instances(self, study_uid: str) -> int:
        """Number of stored instances of the study with UID `study_uid` (0 if absent)."""
        return len(self.find("Instance", {"StudyInstanceUID": study_uid}, expand=False))

    def instance_counts(self) -> dict[str, int]:
        """Study Instance UID -> number of stored instances, for every stored study."""
        return {
            study["MainDicomTags"]["StudyInstanceUID"]: int(
                self.get_json(f"/studies/{_quote(study['ID'])}/statistics")["CountInstances"]
            )
            for study in self.get_json("/studies?expand")
        }

    def download(self, instance_id: str) -> bytes:
        """The stored DICOM file of one instance, byte for byte (``GET /instances/{id}/file``)."""
        return self.request("GET", f"/instances/{_quote(instance_id)}/file")

    def tags(self, instance_id: str) -> JsonObject:
        """Simplified tags of one instance: DICOM keyword -> value (sequences as lists)."""
        result: JsonObject = self.get_json(f"/instances/{_quote(instance_id)}/simplified-tags")
        return result

    def delete_all(self) -> None:
        """Delete every stored patient (and so every study, series and instance)."""
        for patient in self.patients():
            self.delete(f"/patients/{_quote(patient)}")

    def modalities(self) -> dict[str, Modality]:
        """The DICOM peers Orthanc currently knows, by symbolic name."""
        known = self.get_json("/modalities?expand")
        return {
            name: Modality(name, value["AET"], value["Host"], int(value["Port"]))
            for name, value in known.items()
        }

    def add_modality(
        self, name: str, aet: str, host: str, port: int, *, tls: bool = False
    ) -> Modality:
        """Register (or replace) a DICOM peer at run time (``PUT /modalities/{name}``).

        Use for peers whose port is only known after Orthanc started, such as the service's own
        Storage SCP as a C-MOVE destination. `tls`: Orthanc talks DICOM TLS to it.
        """
        modality = Modality(name, aet, host, port, tls)
        self._modalities[name] = modality
        self.put_json(f"/modalities/{_quote(name)}", modality.to_orthanc())
        return modality

    def echo(self, modality: str, *, timeout: int = 10) -> None:
        """C-ECHO a known peer from Orthanc; raise :class:`OrthancHTTPError` if it fails."""
        self.post_json(f"/modalities/{_quote(modality)}/echo", {"Timeout": timeout})

    def send_to(self, modality: str, resource_ids: Iterable[str]) -> JsonObject:
        """C-STORE stored resources (any level, by Orthanc id) to a known peer, synchronously.

        Returns
        -------
        dict
            Orthanc's job summary (``InstancesCount``, ``FailedInstancesCount``, ...).
        """
        result: JsonObject = self.post_json(
            f"/modalities/{_quote(modality)}/store",
            {"Resources": list(resource_ids), "Synchronous": True},
        )
        return result


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


#: A peer Orthanc must know: a :class:`Modality`, another (started) :class:`OrthancServer`, or
#: the ``(AE title, host, port)`` triple of Orthanc's ``DicomModalities``.
PeerSpec: TypeAlias = Modality | OrthancServer | tuple[str, str, int]


def _to_modality(name: str, peer: PeerSpec) -> Modality:
    if isinstance(peer, Modality):
        return Modality(name, peer.aet, peer.host, peer.port, peer.tls)
    if isinstance(peer, OrthancServer):
        return peer.as_modality(name)
    aet, host, port = peer
    return Modality(name, aet, host, int(port))


class OrthancFactory:
    """Start any number of Orthanc servers and stop them all together.

    Used as the ``orthanc_factory`` pytest fixture and by benchmarks. Calling the factory starts
    a server; :meth:`stop_all` (or leaving the ``with`` block) stops every server it started,
    also when a test failed.

    Parameters
    ----------
    base_dir : Path or None, optional
        Parent of each server's working directory (kept after stop, for post-mortems). When None
        each server uses a temporary directory removed at stop.
    **defaults
        Default keyword arguments for :class:`OrthancServer`.
    """

    def __init__(self, base_dir: Path | None = None, **defaults: Any) -> None:
        self.base_dir = base_dir
        self.defaults = defaults
        self.servers: list[OrthancServer] = []
        self._lock = threading.Lock()

    def __call__(
        self,
        aet: str,
        modalities: Mapping[str, PeerSpec] | None = None,
        **kwargs: Any,
    ) -> OrthancServer:
        """Start an Orthanc with AE title `aet` and the given peers; see :class:`OrthancServer`."""
        options = {**self.defaults, **kwargs}
        with self._lock:
            workdir = None
            if self.base_dir is not None:
                workdir = self.base_dir / f"{aet.lower()}-{len(self.servers)}"
            server = OrthancServer(aet, workdir, modalities, **options)
            self.servers.append(server)
        return server.start()

    def stop_all(self, *, wait: bool = True) -> None:
        """Stop every server started by this factory, all at once.

        Parameters
        ----------
        wait : bool, optional
            Wait for the processes to exit; see :meth:`OrthancServer.stop`.
        """
        with self._lock:
            servers, self.servers = self.servers, []
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop(wait=False)
        if wait:
            wait_for_stopped()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def __iter__(self) -> Iterator[OrthancServer]:
        return iter(list(self.servers))
