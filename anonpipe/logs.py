"""One logging set-up for every command, built so that patient data cannot reach a log.

structlog renders our own events; records of other libraries (pynetdicom, pydicom, warnings) go
through the same processors via :class:`structlog.stdlib.ProcessorFormatter`. Two processors stand
before every renderer:

- :func:`redact_phi_fields` blanks fields whose *name* says they hold an identifier
  (``patient_name``, ``accession_number``, ``study_instance_uid``, ...) and any DICOM object passed
  as a field (a dataset, element or person name);
- :func:`redact_foreign_text` and :func:`redact_tracebacks` mask, in free text we did not write
  (other libraries' messages, exception tracebacks), every quoted value and every UID that is not
  a DICOM standard UID.

pynetdicom's own identifier and DIMSE-summary logging is switched off, so its debug output carries
only association mechanics. Output is readable on a terminal, JSON lines otherwise, and native
journald fields when systemd runs us (``JOURNAL_STREAM`` set).

**Lines you can follow.** Every line of a run carries the run (``run``: its folder's name), and a
line of a study's step also the study (``study``: its review id, never a UID) and the step
(``step``: pull, deidentify, hook, push, verify, writeback, or a run's own select, check, finish).
They are structlog context variables, bound by the daemon where a run and a study's step begin
(:func:`run_scope`, :func:`structlog.contextvars.bound_contextvars`). Context variables do not
follow work into other threads or processes by themselves, so:

- ``asyncio.to_thread`` copies them (the standard library does);
- a thread pool of ours runs its work through :func:`carry_context`;
- a worker process gets the fields with each task and binds them there, after configuring its
  logging like its parent's (:func:`worker_setup`, :func:`adopt_setup`);
- threads we do not start (pynetdicom's association and DUL threads, its server's, aiosqlite's)
  see the run in progress through a process-wide fallback (:func:`merge_process_context`: a
  daemon runs one run at a time);
- an association we request lends our fields to pynetdicom's threads serving it once it is
  established (:func:`share_context`), and an SCP association that landed an object of a pull
  logs with that pull's fields from then on, in its own thread
  (:meth:`anonpipe.scp.landing.Landing.adopt_log_context`) and in its DUL thread.

In JSON and on the console they are keys; in the journal ``ANONPIPE_RUN``, ``ANONPIPE_STUDY`` and
``ANONPIPE_STEP`` (``journalctl -u anonpipe ANONPIPE_RUN=run_at_1767225600``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TextIO, TypeVar

import structlog
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName
from structlog.typing import EventDict, Processor, WrappedLogger

LogFormat = Literal["auto", "console", "json", "journal"]
LogLevel = Literal["debug", "info", "warning", "error"]
_P = ParamSpec("_P")
_R = TypeVar("_R")

REDACTED = "[redacted]"

#: The fields that tie a line to its run, its study (the review id) and the study's step.
RUN_FIELD = "run"
STUDY_FIELD = "study"
STEP_FIELD = "step"

#: Field names (case-insensitive, ``_`` and ``-`` ignored) that may never carry a value in a log.
PHI_FIELD_NAMES: frozenset[str] = frozenset(
    name.replace("_", "").lower()
    for name in (
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "patient_address",
        "patient_telephone_numbers",
        "other_patient_ids",
        "other_patient_names",
        "issuer_of_patient_id",
        "accession_number",
        "accession_no",
        "study_id",
        "referring_physician_name",
        "performing_physician_name",
        "operators_name",
        "study_instance_uid",
        "series_instance_uid",
        "sop_instance_uid",
        "frame_of_reference_uid",
        "original_study_uid",
        "original_uid",
        "original",
        "identifier",
        "dataset",
    )
)

# Any dotted numeric string of three or more components may be a UID (2.25.x has three);
# standard UIDs (1.2.840.10008.*) are kept: they name SOP classes and transfer syntaxes.
_UID = re.compile(r"(?<![\w.])(?!1\.2\.840\.10008\.)[0-9]+(?:\.[0-9]+){2,}(?![\w.])")
# Greedy to the last quote of the line, so nested quoting (a list's repr) is masked whole.
_QUOTED = re.compile(r"'[^\n]*'|\"[^\n]*\"")

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_JOURNAL_PRIORITY: dict[str, int] = {
    "critical": 2,
    "error": 3,
    "exception": 3,
    "warning": 4,
    "info": 6,
    "debug": 7,
}
_HANDLER_NAME = "anonpipe"


def redact_text(text: str) -> str:
    """Mask quoted values and non-standard UIDs in free text of unknown origin."""
    return _UID.sub(REDACTED, _QUOTED.sub(REDACTED, text))


def redact_phi_fields(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Blank fields named like identifiers, and DICOM objects passed as field values."""
    for key, value in event_dict.items():
        if key.replace("_", "").replace("-", "").lower() in PHI_FIELD_NAMES:
            event_dict[key] = REDACTED
        elif isinstance(value, Dataset | DataElement | PersonName | bytes | bytearray):
            event_dict[key] = f"[{type(value).__name__} redacted]"
    return event_dict


def redact_foreign_text(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Mask identifiers in messages of other libraries, whose text we did not compose."""
    if not event_dict.get("_from_structlog", False) and isinstance(event_dict.get("event"), str):
        event_dict["event"] = redact_text(event_dict["event"])
    return event_dict


def redact_tracebacks(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Mask identifiers in rendered tracebacks: exception messages often quote the bad value."""
    for key in ("exception", "stack"):
        if isinstance(event_dict.get(key), str):
            event_dict[key] = redact_text(event_dict[key])
    return event_dict


# -- context: run, study, step ------------------------------------------------------------------

#: The run in progress, for lines of threads that carry no context of their own (replaced whole,
#: never mutated, so readers need no lock).
_process_context: dict[str, object] = {}
_process_lock = threading.Lock()
#: Context fields lent to threads we did not start (see :func:`share_context`).
_thread_context: weakref.WeakKeyDictionary[threading.Thread, dict[str, object]] = (
    weakref.WeakKeyDictionary()
)


def merge_process_context(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Add to a line the fields its thread was lent (:func:`share_context`), then the run in
    progress (:func:`run_scope`), where the line does not carry them already."""
    lent = _thread_context.get(threading.current_thread())
    if lent:
        for key, value in lent.items():
            event_dict.setdefault(key, value)
    for key, value in _process_context.items():
        event_dict.setdefault(key, value)
    return event_dict


def share_context(*threads: object) -> None:
    """Lend the caller's context fields to *threads*, another library's threads doing the same
    work (pynetdicom's association and DUL threads of an association we requested, or whose
    handler runs here), for as long as they live. What is not a :class:`threading.Thread`
    (None, a stand-in) is ignored."""
    fields = structlog.contextvars.get_contextvars()
    if not fields:
        return
    for thread in threads:
        if isinstance(thread, threading.Thread):
            _thread_context[thread] = fields


@contextmanager
def run_scope(run: str) -> Iterator[None]:
    """Bind *run* to this task's lines and, as the process-wide fallback, to every line of a
    thread that carries no run of its own, until the block ends.

    A daemon works on one run at a time; the fallback is only replaced back if it still names
    *run* (a scope that ends late never takes another run's away).
    """
    global _process_context
    with _process_lock:
        previous, _process_context = _process_context, {RUN_FIELD: run}
    try:
        with structlog.contextvars.bound_contextvars(**{RUN_FIELD: run}):
            yield
    finally:
        with _process_lock:
            if _process_context.get(RUN_FIELD) == run:
                _process_context = previous


def carry_context(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """*fn*, run with the caller's context fields bound, in whatever thread calls it.

    For work handed to a thread pool (``asyncio.to_thread`` copies the context itself;
    :class:`~concurrent.futures.ThreadPoolExecutor` and plain threads do not).
    """
    fields = structlog.contextvars.get_contextvars()

    @functools.wraps(fn)
    def carried(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with structlog.contextvars.bound_contextvars(**fields):
            return fn(*args, **kwargs)

    return carried


@dataclass(frozen=True)
class LoggingSetup:
    """How this process configured its logging, for a worker process to do the same."""

    level: str
    fmt: LogFormat
    pid: int


_setup: LoggingSetup | None = None


def worker_setup() -> LoggingSetup | None:
    """The logging set-up of this process (None when :func:`configure_logging` was not called)."""
    return _setup


def adopt_setup(setup: LoggingSetup | None) -> None:
    """In a worker process: configure logging as its parent did (*setup*), once per process.

    Without it a worker's records reach stderr unformatted and unredacted (logging's last-resort
    handler, warnings' own printing).
    """
    if setup is None or (_setup is not None and _setup.pid == os.getpid()):
        return
    configure_logging(setup.level, setup.fmt, libraries=False)


# -- rendering ----------------------------------------------------------------------------------


def journal_fields(_logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
    """Render an event as journald fields (JSON-encoded for :class:`JournalHandler` to send).

    ``MESSAGE`` is the event text; every other key becomes ``ANONPIPE_<KEY>``, so operators can
    filter with ``journalctl ANONPIPE_RUN=...`` (or ``ANONPIPE_STUDY=``, ``ANONPIPE_STEP=``). A
    key whose value is None is left out.
    """
    level = str(event_dict.pop("level", method))
    fields: dict[str, str] = {
        "MESSAGE": str(event_dict.pop("event", "")),
        "PRIORITY": str(_JOURNAL_PRIORITY.get(level, 6)),
        "SYSLOG_IDENTIFIER": "anonpipe",
    }
    for key, value in event_dict.items():
        if value is None:
            continue
        name = re.sub(r"[^A-Z0-9_]", "_", str(key).upper()).lstrip("_")
        fields[f"ANONPIPE_{name}"] = (
            value if isinstance(value, str) else json.dumps(value, default=str)
        )
    return json.dumps(fields)


class JournalHandler(logging.Handler):
    """Send records formatted by :func:`journal_fields` to journald as native fields."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from systemd import journal

            journal.send(**json.loads(self.format(record)))
        except Exception:  # never let logging take the service down
            self.handleError(record)


def resolve_format(fmt: LogFormat, stream: TextIO, environ: MutableMapping[str, str]) -> LogFormat:
    """Pick the format for ``auto``: journald under systemd, console on a tty, else JSON."""
    if fmt != "auto":
        return fmt
    if environ.get("JOURNAL_STREAM") and _journal_available():
        return "journal"
    return "console" if stream.isatty() else "json"


def _journal_available() -> bool:
    try:
        from systemd import journal  # noqa: F401
    except ImportError:
        return False
    return True


def configure_libraries() -> None:
    """Switch off the identifier logging of pynetdicom, which is on by default.

    pynetdicom logs C-FIND / C-MOVE identifiers and, through its default handlers, the SOP
    Instance UIDs of every request; both are patient data for us.
    """
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


def configure_logging(
    level: LogLevel | str = "info",
    fmt: LogFormat = "auto",
    *,
    stream: TextIO | None = None,
    environ: MutableMapping[str, str] | None = None,
    libraries: bool = True,
) -> LogFormat:
    """Configure structlog and the standard library logging once, for the whole process.

    Parameters
    ----------
    level
        Lowest level emitted, one of debug, info, warning, error.
    fmt
        ``auto`` chooses journal (under systemd), console (on a terminal) or json.
    stream
        Where console and JSON output go (default ``sys.stderr``).
    environ
        Environment to inspect for ``JOURNAL_STREAM`` (default ``os.environ``).
    libraries
        Also switch pynetdicom's identifier logging off (:func:`configure_libraries`); a
        de-identification worker, which never imports pynetdicom, passes False.

    Returns
    -------
    LogFormat
        The concrete format chosen.
    """
    if level not in _LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(_LEVELS)}")
    stream = sys.stderr if stream is None else stream
    chosen = resolve_format(fmt, stream, os.environ if environ is None else environ)
    if libraries:
        configure_libraries()

    renderer: Processor
    handler: logging.Handler
    if chosen == "journal":
        renderer, handler = journal_fields, JournalHandler()
    elif chosen == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        handler = logging.StreamHandler(stream)
    else:
        renderer, handler = structlog.processors.JSONRenderer(), logging.StreamHandler(stream)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        merge_process_context,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                redact_foreign_text,  # reads _from_structlog: before remove_processors_meta
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_tracebacks,
                redact_phi_fields,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    # pynetdicom's debug output is PDU-level chatter: only at debug do we want it.
    logging.getLogger("pynetdicom").setLevel(
        _LEVELS[level] if level == "debug" else logging.WARNING
    )
    # aiosqlite's debug lines repeat every SQL call of the state store with its arguments
    # (original UIDs among them, masked only as quoted text) from a thread no run or study owns:
    # nothing an operator follows.
    logging.getLogger("aiosqlite").setLevel(max(_LEVELS[level], logging.INFO))
    logging.captureWarnings(True)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    global _setup
    _setup = LoggingSetup(str(level), chosen, os.getpid())
    return chosen


def get_logger(name: str) -> Any:
    """The module logger: a lazy structlog proxy, safe to create at import time."""
    return structlog.stdlib.get_logger(name)
