"""Typed, immutable settings loaded from one TOML file (``etc/anonpipe.toml`` documents it).

The schema is the dataclasses below and nothing else: a field's type says which TOML value it
takes, its default is the documented default (ARCHITECTURE.md, "Configuration contract"), and its
metadata names a validator (``check`` for the whole value, ``each`` for every item of an array)
that returns the value, possibly normalised, or raises ``ValueError`` saying what is expected.
The loader walks these definitions generically, so a new key is one line here and one in the
sample file. Loading is pure: it reads files and raises :class:`ConfigError`, it never exits.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from anonpipe import tls
from anonpipe.anon.profile import OPTION_NAMES  # the [anon] options, by name
from anonpipe.anon.vocabulary import Vocabulary

DEFAULT_CONFIG_PATH: Final = Path("/etc/anonpipe/anonpipe.toml")
CONFIG_ENV: Final = "ANONPIPE_CONFIG"
Check = Callable[[Any], Any]


# -- validators: return the (normalised) value or raise ValueError("expected ...") -------------


def _between(low: float, high: float = math.inf, what: str = "a value") -> Check:
    def check(value: float) -> float:
        if not low <= value <= high:
            bounds = f">= {low:g}" if high == math.inf else f"{low:g}..{high:g}"
            raise ValueError(f"expected {what} {bounds}")
        return value

    return check


def _matching(pattern: str, what: str, normalise: Callable[[str], str] = str) -> Check:
    def check(value: str) -> str:
        value = normalise(value)
        if not re.fullmatch(pattern, value):
            raise ValueError(f"expected {what}")
        return value

    return check


def _positive(value: float) -> float:
    if not value > 0:
        raise ValueError("expected a number of seconds > 0")
    return value


def _one_of(*choices: str) -> Check:
    def check(value: str) -> str:
        if value in choices:
            return value
        hint = difflib.get_close_matches(value.lower(), choices, n=1)
        again = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"expected one of {', '.join(choices)}{again}")

    return check


_port = _between(1, 65535, "a TCP port number")
_non_empty = _matching(r"(?s).*\S.*", "a non-empty string")
_sql_identifier = _matching(
    r"[A-Za-z_][A-Za-z0-9_]*", "an SQL identifier: a letter or _, then letters, digits or _"
)
_modality = _matching(
    r"[A-Z0-9_ ]{1,16}|\*",
    "a modality code (up to 16 letters, digits, _ or space), e.g. CT, or * for every modality",
    lambda v: v.strip().upper(),
)


def _ae_title(value: str) -> str:
    """Apply the DICOM AE VR: spaces at either end are insignificant, so they are stripped."""
    title = value.strip(" ")
    if not title:
        raise ValueError("expected an AE title; it must not be empty or all spaces")
    if len(title) > 16:
        raise ValueError(f"expected an AE title of at most 16 characters, this has {len(title)}")
    if any(not " " <= c <= "~" or c == "\\" for c in title):
        raise ValueError("expected an AE title of printable ASCII characters without backslash")
    return title


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?\Z")


def _host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.match(value):
            raise ValueError("expected an IP address or a DNS host name") from None
    return value


def _database(value: str) -> str:
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("expected a SQLite file path or a postgresql:// URL")
        if parts.password is not None or any(
            k == "password" for k, _ in parse_qsl(parts.query, keep_blank_values=True)
        ):
            raise ValueError(
                "expected a URL without a password: this file is no place for secrets; put the "
                "password in [review] password_file, or in PGPASSWORD or PGPASSFILE"
            )
    _non_empty(value)
    return value


def _non_empty_list(value: tuple[Any, ...]) -> tuple[Any, ...]:
    if not value:
        raise ValueError("expected at least one entry")
    return value


def _pdu_size(value: int) -> int:
    if value != 0 and not 4096 <= value <= 0xFFFFFFFF:
        raise ValueError("expected 0 (unlimited) or a size in bytes 4096..4294967295")
    return value


def _shift_range(value: tuple[int, int]) -> tuple[int, int]:
    low, high = value
    if low > high:
        raise ValueError("expected [min, max] with min <= max")
    if low <= 0 <= high:
        raise ValueError("expected a range without 0: a zero shift would keep the real dates")
    return value


def _existing_file(value: Path) -> Path:
    if not value.exists():
        raise ValueError(
            "file not found; relative paths are resolved against the configuration file's folder"
        )
    if not value.is_file() or not os.access(value, os.R_OK):
        raise ValueError("expected a readable regular file")
    return value


_VOCABULARY_SHAPE = 'expected JSON of the shape {"gggg,eeee": ["allowed value", ...]}'


def _private_key_file(value: Path) -> Path:
    _existing_file(value)
    if value.stat().st_mode & 0o007:
        raise ValueError(
            "the private key is readable by every user; chmod 600 it (or 640, group ssl-cert)"
        )
    return value


def _password_file(value: Path) -> Path:
    _existing_file(value)
    if value.stat().st_mode & 0o007:
        raise ValueError(
            "the password file is readable by every user; chmod 600 it (or 640, group of the "
            "service)"
        )
    return value


def _server_tls(value: ServerTls) -> ServerTls:
    tls.server_context(value)  # raises TlsConfigError, a ValueError that says what is wrong
    return value


def _client_tls(value: ClientTls) -> ClientTls:
    if (value.certificate is None) != (value.private_key is None):
        raise ValueError("expected certificate and private_key together, or neither")
    tls.client_context(value)
    return value


def _vocabulary_file(value: Path) -> Path:
    _existing_file(value)
    try:
        Vocabulary.load(value)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot be read as JSON ({exc}); {_VOCABULARY_SHAPE}") from None
    except ValueError as exc:
        raise ValueError(f"{exc}; {_VOCABULARY_SHAPE}") from None
    return value


def _writable_dir(value: Path) -> Path:
    """Accept a directory we can write, or one we can create (nearest existing parent writable)."""
    if value.exists() and not value.is_dir():
        raise ValueError("exists but is not a directory")
    probe = value
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot be created: {str(probe)!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        user = f"uid {os.geteuid()}"
        raise ValueError(f"{str(probe)!r} is not writable by {user}; fix its owner or mode")
    return value


def _socket_path(value: Path) -> Path:
    if len(os.fsencode(value)) > 107:
        raise ValueError("expected a Unix socket path of at most 107 bytes")
    return value


def split_bind(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) as ``(host, port)``; ValueError if not."""
    host, colon, port = value.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError('expected HOST:PORT, e.g. "127.0.0.1:8042" ("[::1]:8042" for IPv6)')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not isinstance(_ip(host), ipaddress.IPv6Address):
            raise ValueError('expected an IPv6 address between [ and ], e.g. "[::1]:8042"')
    elif ":" in host:
        raise ValueError('expected an IPv6 address in brackets, e.g. "[::1]:8042"')
    try:
        _host(host)
    except ValueError:
        raise ValueError(
            f"expected HOST:PORT with HOST an IP address or a DNS host name, not {host!r}"
        ) from None
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError("expected a TCP port number 1..65535 after the colon")
    return host, number


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _web_bind(value: str) -> str:
    split_bind(value)
    return value


def _redact_url(value: str) -> str:
    """Hide the password of a database URL (in the user part or a ``password=`` parameter)."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostport}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in query):
        query = [(k, "***" if k == "password" else v) for k, v in query]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


# -- the schema ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """A calling AE allowed to C-STORE to our SCP: AE title and the host it connects from."""

    ae_title: str = field(metadata={"check": _ae_title})
    host: str = field(metadata={"check": _host})


_TLS_VERSION = _one_of("1.2", "1.3")


@dataclass(frozen=True, slots=True)
class ServerTls:
    """``[local.tls]``: DICOM TLS on our SCP (PS3.15 B.1, BCP 195): every connection is TLS.

    ``ca`` holds the CA certificates (PEM) that sign the certificates our peers present; a peer
    without one (``require_client_certificate``) or with another is refused in the handshake.
    """

    certificate: Path = field(metadata={"check": _existing_file})
    private_key: Path = field(metadata={"check": _private_key_file})
    ca: Path = field(metadata={"check": _existing_file})
    require_client_certificate: bool = True
    min_version: str = field(default="1.2", metadata={"check": _TLS_VERSION})


@dataclass(frozen=True, slots=True)
class ClientTls:
    """``[staging.tls]``, ``[research.tls]``: DICOM TLS to that PACS.

    The PACS's certificate must be signed by a CA in ``ca`` and, with ``check_hostname``, name
    the host we connect to (a DNS name or IP address in its subjectAltName). ``certificate`` and
    ``private_key`` are ours, for a PACS that asks for a client certificate (most do).
    """

    ca: Path = field(metadata={"check": _existing_file})
    certificate: Path | None = field(default=None, metadata={"check": _existing_file})
    private_key: Path | None = field(default=None, metadata={"check": _private_key_file})
    check_hostname: bool = True
    min_version: str = field(default="1.2", metadata={"check": _TLS_VERSION})


@dataclass(frozen=True, slots=True)
class LocalSettings:
    """``[local]``: our own Storage SCP (the old LOCAL_AE) and the limits of its associations."""

    ae_title: str = field(default="ANONPIPE", metadata={"check": _ae_title})
    bind: str = field(default="0.0.0.0", metadata={"check": _host})
    port: int = field(default=11112, metadata={"check": _port})
    allowed_peers: tuple[Peer, ...] = ()
    max_associations: int = field(default=10, metadata={"check": _between(1)})
    max_pdu_size: int = field(default=0, metadata={"check": _pdu_size})
    acse_timeout: float = field(default=30.0, metadata={"check": _positive})
    dimse_timeout: float = field(default=600.0, metadata={"check": _positive})
    network_timeout: float = field(default=600.0, metadata={"check": _positive})
    min_free_mb: int = field(default=1024, metadata={"check": _between(0)})
    tls: ServerTls | None = field(default=None, metadata={"check": _server_tls})


@dataclass(frozen=True, slots=True)
class StagingSettings:
    """``[staging]``: the identified PACS we C-FIND and C-MOVE from."""

    ae_title: str = field(default="STAGING", metadata={"check": _ae_title})
    host: str = field(default="127.0.0.1", metadata={"check": _host})
    port: int = field(default=4242, metadata={"check": _port})
    connect_timeout: float = field(default=10.0, metadata={"check": _positive})
    tls: ClientTls | None = field(default=None, metadata={"check": _client_tls})
    #: Study C-MOVEs at once (each its own association). Orthanc serves
    #: ``ConcurrentJobs`` moves at a time (default 2); a PACS that allows one sets 1.
    max_parallel_moves: int = field(default=2, metadata={"check": _between(1, 16, "an integer")})


@dataclass(frozen=True, slots=True)
class ResearchSettings:
    """``[research]``: the de-identified PACS we C-STORE to and verify with C-FIND."""

    ae_title: str = field(default="RESEARCH", metadata={"check": _ae_title})
    host: str = field(default="127.0.0.1", metadata={"check": _host})
    port: int = field(default=4243, metadata={"check": _port})
    connect_timeout: float = field(default=10.0, metadata={"check": _positive})
    #: Parallel C-STORE associations per study push: 2 nearly doubles the push into Orthanc on
    #: two cores, 4 adds 15-20 % more (bench/RESULTS.md, network throughput, issue 12).
    push_associations: int = field(default=2, metadata={"check": _between(1, 16, "an integer")})
    retries: int = field(default=3, metadata={"check": _between(0)})
    retry_backoff: float = field(default=2.0, metadata={"check": _between(0)})
    tls: ClientTls | None = field(default=None, metadata={"check": _client_tls})


@dataclass(frozen=True, slots=True)
class ReviewSettings:
    """``[review]``: the django-dicom-review database that says which studies may go."""

    database: str = field(
        default="/var/lib/anonpipe/review.db",
        metadata={"check": _database, "relative": True, "redact": _redact_url},
    )
    password_file: Path | None = field(default=None, metadata={"check": _password_file})
    table_prefix: str = field(default="dicom_staging_", metadata={"check": _sql_identifier})
    poll_interval: float = field(default=30.0, metadata={"check": _positive})


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    """``[pipeline]``: where runs live and the old command-line switches (-m, -p, -n)."""

    data_dir: Path = field(
        default=Path("/var/lib/anonpipe/data"), metadata={"check": _writable_dir}
    )
    max_studies: int = field(default=10, metadata={"check": _between(1)})
    practice: bool = False
    no_push: bool = False
    post_anon_hook: str = field(default="default", metadata={"check": _non_empty})
    hook_files: tuple[Path, ...] = field(default=(), metadata={"each": _existing_file})
    #: Studies between their pull and their write-back at once: one study's push overlaps
    #: the next one's pull (with a per-study hook; a per-run hook waits for every pull).
    studies_in_flight: int = field(default=4, metadata={"check": _between(1, 64, "an integer")})


@dataclass(frozen=True, slots=True)
class AnonSettings:
    """``[anon]``: the de-identification profile and the identity store."""

    identity_db: Path = field(default=Path("/var/lib/anonpipe/identity.db"))
    key_file: Path = field(default=Path("/var/lib/anonpipe/anon.key"))
    allowed_modalities: tuple[str, ...] = field(
        default=("CT", "MR"), metadata={"check": _non_empty_list, "each": _modality}
    )
    limited_vocabulary: Path | None = field(default=None, metadata={"check": _vocabulary_file})
    dates: str = field(default="shift", metadata={"check": _one_of("shift", "remove", "keep")})
    options: tuple[str, ...] = field(
        default=("clean_descriptors",), metadata={"each": _one_of(*OPTION_NAMES)}
    )
    date_shift_days: tuple[int, int] = field(default=(-365, -1), metadata={"check": _shift_range})
    jobs: int = field(default=0, metadata={"check": _between(0)})
    safe_private: tuple[str, ...] = field(default=(), metadata={"each": _non_empty})
    patient_key: str = field(default="id", metadata={"check": _one_of("id", "id+issuer")})


@dataclass(frozen=True, slots=True)
class ControlSettings:
    """``[control]``: the Unix socket anonpipectl talks to."""

    socket: Path = field(
        default=Path("/run/anonpipe/control.sock"), metadata={"check": _socket_path}
    )


@dataclass(frozen=True, slots=True)
class WebSettings:
    """``[web]``: the read-only status pages and ``/metrics``; no ``[web]`` table, nothing listens.

    ``bind`` is ``HOST:PORT``. The pages have no log-in: keep it on loopback (or behind a reverse
    proxy that authenticates) unless every host that can reach it may read them.
    """

    bind: str = field(metadata={"check": _web_bind})

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to listen on."""
        return split_bind(self.bind)


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """``[logging]``: verbosity and renderer (auto picks journal, console or JSON at start-up)."""

    level: str = field(
        default="info", metadata={"check": _one_of("debug", "info", "warning", "error")}
    )
    format: str = field(
        default="auto", metadata={"check": _one_of("auto", "console", "json", "journal")}
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """All settings; ``source`` is the file they came from (None for built-in defaults)."""

    local: LocalSettings = field(default_factory=LocalSettings)
    staging: StagingSettings = field(default_factory=StagingSettings)
    research: ResearchSettings = field(default_factory=ResearchSettings)
    review: ReviewSettings = field(default_factory=ReviewSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    anon: AnonSettings = field(default_factory=AnonSettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    web: WebSettings | None = None
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source: Path | None = field(default=None, metadata={"toml": False})

    @property
    def allowed_peers(self) -> tuple[Peer, ...]:
        """Calling AEs our SCP accepts: ``local.allowed_peers``, or else only the staging PACS."""
        if self.local.allowed_peers:
            return self.local.allowed_peers
        return (Peer(ae_title=self.staging.ae_title, host=self.staging.host),)


# -- errors --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration file; ``key`` is dotted, empty for the whole file."""

    file: Path
    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        where = f"{self.key}: " if self.key else ""
        return f"{self.file}: {where}{self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists everything found, not just the first."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))


# -- the loader ----------------------------------------------------------------------------------

_INVALID: Final = object()
_TYPE_NAMES: Final[dict[Any, str]] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    Path: "a path (a non-empty string)",
}


def _show(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    kinds |= {list: "an array", dict: "a table"}
    return kinds.get(type(value), "a date/time")


@cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _toml_fields(cls: Any) -> list[Any]:
    return [f for f in fields(cls) if f.metadata.get("toml", True)]


def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    if is_dataclass(tp):
        return "a table with keys " + ", ".join(f.name for f in _toml_fields(tp))
    if typing.get_origin(tp) is types.UnionType:
        return _describe(args[0]) + ', or "" for none'
    if typing.get_origin(tp) is tuple and args[-1] is Ellipsis:
        return f"an array, each item {_describe(args[0])}"
    if typing.get_origin(tp) is tuple:
        return f"an array of {len(args)} items, each {_describe(args[0])}"
    return _TYPE_NAMES[tp]


def _endpoint(host: str, port: int) -> tuple[str, int]:
    """Normalise a host so that e.g. ``localhost`` and ``127.0.0.1`` compare equal."""
    name = host.lower().rstrip(".")
    name = "127.0.0.1" if name == "localhost" else name
    with contextlib.suppress(ValueError):
        name = ipaddress.ip_address(name).compressed
    return name, port


class _Loader:
    """Turns one parsed TOML document into settings, collecting every problem on the way."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.problems: list[ConfigProblem] = []

    def problem(self, key: str, value: Any, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, key, value, message))

    def valid(self, *keys: str) -> bool:
        """Whether none of ``keys`` had a problem, so that a cross-check on them is meaningful."""
        return not any(
            p.key.startswith(k) or k.startswith(f"{p.key}.") for p in self.problems for k in keys
        )

    def read(self) -> dict[str, Any]:
        try:
            with self.file.open("rb") as stream:
                return tomllib.load(stream)
        except tomllib.TOMLDecodeError as exc:
            reason = f"not valid TOML: {exc}"
        except UnicodeDecodeError as exc:
            reason = f"not valid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})"
        except FileNotFoundError:
            reason = f"configuration file not found; pass -c FILE or set {CONFIG_ENV}"
        except OSError as exc:
            reason = f"cannot read the configuration file: {exc.strerror}"
        raise ConfigError([ConfigProblem(self.file, "", None, reason)])

    def build(self, cls: Any, table: Mapping[str, Any], prefix: str) -> Any:
        """Build dataclass ``cls`` from ``table``; invalid keys keep their defaults."""
        spec = {f.name: f for f in _toml_fields(cls)}
        for name, value in table.items():
            if name not in spec:
                key = f"{prefix}.{name}" if prefix else name
                what = "key" if prefix else "section"
                hint = difflib.get_close_matches(name, list(spec), n=1)
                again = f"did you mean {hint[0]!r}? " if hint else ""
                self.problem(key, value, f"unknown {what}; {again}(valid: {', '.join(spec)})")
        kwargs: dict[str, Any] = {}
        complete = True
        for name, spec_field in spec.items():
            key = f"{prefix}.{name}" if prefix else name
            required = spec_field.default is MISSING and spec_field.default_factory is MISSING
            if name not in table:
                if required:
                    expected = _describe(_hints(cls)[name])
                    self.problem(key, None, f"required key missing; expected {expected}")
                    complete = False
                continue
            value = self.convert(_hints(cls)[name], table[name], key, spec_field.metadata)
            if value is not _INVALID:
                kwargs[name] = value
            elif required:
                complete = False
        return cls(**kwargs) if complete else _INVALID

    def convert(self, tp: Any, raw: Any, key: str, meta: Mapping[str, Any]) -> Any:
        found = len(self.problems)
        value = self.coerce(tp, raw, key, meta)
        if value is _INVALID or value is None:
            return value
        if len(self.problems) > found:  # a key of this table is wrong: no check of the whole
            return _INVALID
        if meta.get("each") is not None:
            items = [self.check(meta["each"], v, f"{key}[{i}]") for i, v in enumerate(value)]
            if any(item is _INVALID for item in items):
                return _INVALID
            value = tuple(items)
        if not meta.get("check"):
            return value
        return self.check(meta["check"], value, key, meta.get("redact"))

    def check(
        self, check: Check, value: Any, key: str, redact: Callable[[Any], Any] | None = None
    ) -> Any:
        try:
            return check(value)
        except (ValueError, OSError) as exc:
            shown = redact(value) if redact else value  # a refused URL may carry a password
            self.problem(key, shown, f"got {_show(shown)}; {exc}")
            return _INVALID

    def coerce(self, tp: Any, raw: Any, key: str, meta: Mapping[str, Any]) -> Any:
        """Check ``raw`` against type ``tp`` and convert it (arrays to tuples, strings to paths)."""
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if is_dataclass(tp) and isinstance(raw, dict):
            return self.build(tp, raw, key)
        if origin is types.UnionType:  # only `X | None` is used: "" stands for None
            return None if raw == "" else self.coerce(args[0], raw, key, meta)
        if origin is tuple and isinstance(raw, list):
            variadic = args[-1] is Ellipsis
            if variadic or len(raw) == len(args):
                types_ = [args[0]] * len(raw) if variadic else list(args)
                items = [
                    self.coerce(t, r, f"{key}[{i}]", {})
                    for i, (t, r) in enumerate(zip(types_, raw, strict=True))
                ]
                return _INVALID if any(i is _INVALID for i in items) else tuple(items)
        elif tp is bool and isinstance(raw, bool):
            return raw
        elif tp in (int, float) and isinstance(raw, int) and not isinstance(raw, bool):
            return tp(raw)  # an integer is a fine number; a boolean is not an integer
        elif tp is float and isinstance(raw, float):
            return raw
        elif tp is str and isinstance(raw, str):
            return self.path(raw) if meta.get("relative") and "://" not in raw and raw else raw
        elif tp is Path and isinstance(raw, str) and raw:
            return Path(self.path(raw))
        self.problem(key, raw, f"got {_show(raw)} ({_kind(raw)}); expected {_describe(tp)}")
        return _INVALID

    def path(self, raw: str) -> str:
        """Resolve a path from the file against the file's folder, not the working directory."""
        return os.path.normpath(os.path.join(self.file.parent, raw))

    def cross_check(self, settings: Settings) -> None:
        """Rules that involve more than one key, checked only where those keys were valid."""
        staging, research = settings.staging, settings.research
        if self.valid("staging.host", "staging.port", "research.host", "research.port") and (
            _endpoint(staging.host, staging.port) == _endpoint(research.host, research.port)
        ):
            same_ae = " and AE title" if staging.ae_title == research.ae_title else ""
            self.problem(
                "research",
                f"{research.host}:{research.port}",
                f"research.host/research.port {research.host}:{research.port} is the same endpoint"
                f"{same_ae} as staging ({staging.ae_title}@{staging.host}:{staging.port}); "
                "de-identified data must go to another PACS: fix research.host or research.port",
            )
        review = settings.review
        if (
            self.valid("review.database", "review.password_file")
            and review.password_file is not None
            and "://" not in review.database
        ):
            self.problem(
                "review.password_file",
                str(review.password_file),
                "a password file is for a postgresql:// review database; review.database is a "
                "SQLite file, which has no password: remove review.password_file",
            )
        if settings.web is not None and self.valid("web.bind", "local.bind", "local.port"):
            web, local = settings.web.address, settings.local
            wildcard = {"0.0.0.0", "::"}
            same_host = (
                web[0] in wildcard
                or local.bind in wildcard
                or _endpoint(web[0], 0) == _endpoint(local.bind, 0)
            )
            if same_host and web[1] == local.port:
                self.problem(
                    "web.bind",
                    settings.web.bind,
                    f"got {_show(settings.web.bind)}; port {web[1]} is local.port, where our "
                    "Storage SCP listens: choose another port for web.bind",
                )
        if self.valid("local.ae_title", "staging.ae_title") and (
            settings.local.ae_title == staging.ae_title
        ):
            self.problem(
                "local.ae_title",
                settings.local.ae_title,
                f"got {_show(settings.local.ae_title)}; this is staging.ae_title too: the C-MOVE "
                "destination must be our own AE title, so choose a different local.ae_title",
            )


def _config_path(path: Path | None, environ: Mapping[str, str]) -> Path:
    chosen = path if path is not None else Path(environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    return Path(os.path.abspath(chosen))


def load_settings(path: Path | None, environ: Mapping[str, str]) -> Settings:
    """Read, check and return the settings, or raise with every problem found.

    Parameters
    ----------
    path
        The file given with ``-c/--config``; when None, ``environ["ANONPIPE_CONFIG"]``, else
        :data:`DEFAULT_CONFIG_PATH`.
    environ
        The environment to consult (passed in, so that loading has no hidden inputs).

    Returns
    -------
    Settings
        Frozen settings with every relative path resolved against the file's folder.

    Raises
    ------
    ConfigError
        The file is missing or not TOML, or any key is unknown, mistyped or unsafe.
    """
    loader = _Loader(_config_path(path, environ))
    settings: Settings = replace(loader.build(Settings, loader.read(), ""), source=loader.file)
    loader.cross_check(settings)
    if loader.problems:
        raise ConfigError(loader.problems)
    return settings


def _is_table(tp: Any) -> bool:
    return any(is_dataclass(arg) for arg in (tp, *typing.get_args(tp)))


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        out = {}
        for spec_field in _toml_fields(type(value)):
            if getattr(value, spec_field.name) is None and _is_table(
                _hints(type(value))[spec_field.name]
            ):
                continue  # an absent optional table, e.g. [local.tls]: not in the file either
            item = _plain(getattr(value, spec_field.name))
            redact = spec_field.metadata.get("redact")
            out[spec_field.name] = redact(item) if redact else item
        return out
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return "" if value is None else value


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """Return the settings as TOML-shaped, JSON-able data with secrets redacted.

    Sections map to dicts, tuples to lists, paths to strings and an absent optional path to
    ``""`` (as in the file). ``source`` is not a key of the file and is left out.
    """
    plain: dict[str, Any] = _plain(settings)
    return plain
