"""``anonpipe import-settings``: the old pipeline's ``local_settings.py`` as an anonpipe.toml.

The old file is configuration written as Python, and it may hold secrets (a database password,
Django's SECRET_KEY) or code. It is therefore read as data, never run or imported: it is parsed
with :mod:`ast` and only top-level assignments of literal values (strings, numbers, booleans,
tuples, lists, dicts), or of a name given such a value earlier in the file (the old sample's
``STAGE_PORT = DEFAULT_PORT``), are taken. Anything else (a value computed at run time, a name
set inside an ``if`` or ``try``, names a ``from … import *`` would bring in) is reported, not
guessed. Only UPPERCASE names are settings, as in Django; lowercase helpers (the old sample's
``staging_database``) count only through the settings that refer to them.

What maps where is data: :data:`SETTINGS` (old name → TOML key), :data:`DJANGO_ENGINES`
(Django database engine → review database kind) and :data:`NO_EQUIVALENT` (why a known name has
no key). Every other UPPERCASE name becomes a ``# not converted: NAME (why)`` line, without its
value. A value that the configuration would refuse is still written, so that ``check-config``
names the key; values that cannot be written at all are listed for the operator to fill in.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import sqlite3
import tempfile
import textwrap
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode

from anonpipe import __version__
from anonpipe.config import ConfigError, load_settings

__all__ = [
    "DJANGO_ENGINES",
    "LIBPQ_OPTIONS",
    "NO_EQUIVALENT",
    "SETTINGS",
    "Assigned",
    "Conversion",
    "ImportSettingsError",
    "OldSetting",
    "check",
    "convert",
    "read_settings",
    "write_output",
]


class ImportSettingsError(Exception):
    """The file cannot be read as old settings: unreadable, not Python, or no known setting."""


@dataclass(frozen=True, slots=True)
class OldSetting:
    """One old name with an anonpipe key.

    ``fallback`` is the old name whose value stands in when this one is absent (the old sample
    set every port from DEFAULT_PORT); ``if_empty`` replaces the key by a comment when the old
    value is the empty string and that meant "the default" there.
    """

    name: str
    key: str
    fallback: str | None = None
    if_empty: str | None = None


#: Old name → anonpipe key, in the order written.
SETTINGS: Final[tuple[OldSetting, ...]] = (
    OldSetting("LOCAL_AE", "local.ae_title"),
    OldSetting(
        "LOCAL_HOST",
        "local.bind",
        if_empty="LOCAL_HOST is empty: the old receiver listened on every interface, and so "
        'does bind\'s default "0.0.0.0"',
    ),
    OldSetting("LOCAL_PORT", "local.port", fallback="DEFAULT_PORT"),
    OldSetting("STAGE_AE", "staging.ae_title"),
    OldSetting("STAGE_HOST", "staging.host"),
    OldSetting("STAGE_PORT", "staging.port", fallback="DEFAULT_PORT"),
    OldSetting("PROD_AE", "research.ae_title"),
    OldSetting("PROD_HOST", "research.host"),
    OldSetting("PROD_PORT", "research.port", fallback="DEFAULT_PORT"),
    OldSetting("POST_ANON_HOOK", "pipeline.post_anon_hook"),
)

#: Django ``ENGINE`` → the review database kind anonpipe reads (old short forms included).
DJANGO_ENGINES: Final[dict[str, str]] = {
    "django.db.backends.sqlite3": "sqlite",
    "sqlite3": "sqlite",
    "django.db.backends.postgresql": "postgresql",
    "django.db.backends.postgresql_psycopg2": "postgresql",
    "django.contrib.gis.db.backends.postgis": "postgresql",
    "postgresql_psycopg2": "postgresql",
    "postgresql": "postgresql",
}

#: Django ``OPTIONS`` of a PostgreSQL database that are libpq connection parameters (URL query).
LIBPQ_OPTIONS: Final = frozenset(
    [
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslcrl",
        "connect_timeout",
        "application_name",
        "target_session_attrs",
        "gssencmode",
        "channel_binding",
    ]
)

_DJANGO: Final = "a Django setting: anonpipe does not run Django"
#: Names that were used but have no anonpipe key, and why.
NO_EQUIVALENT: Final[dict[str, str]] = {
    "DEFAULT_PORT": "no key of its own: it is written as the port of each peer that used it",
    "DICOM_ROOT": "anonpipe makes each new UID under 2.25 from a keyed hash of the original; "
    "there is no organisation root to set",
    "DATABASE_ROUTERS": "Django's routing; the review database is [review] database",
    **dict.fromkeys(
        [
            "INSTALLED_APPS",
            "SECRET_KEY",
            "DEBUG",
            "TEMPLATE_DEBUG",
            "TIME_ZONE",
            "USE_TZ",
            "LANGUAGE_CODE",
            "SITE_ID",
            "ROOT_URLCONF",
            "MIDDLEWARE_CLASSES",
            "MIDDLEWARE",
            "TEMPLATE_DIRS",
            "TEMPLATES",
            "STATIC_ROOT",
            "STATIC_URL",
            "MEDIA_ROOT",
            "MEDIA_URL",
            "ADMINS",
            "MANAGERS",
            "LOGGING",
            "CACHES",
            "ALLOWED_HOSTS",
        ],
        _DJANGO,
    ),
}

#: A name that may hold a secret: its value is never shown, even as an expression.
_SECRET: Final = re.compile(r"PASS|SECRET|KEY|TOKEN|CREDENTIAL|PRIVATE|AUTH", re.IGNORECASE)
_SECTIONS: Final = ("local", "staging", "research", "review", "pipeline", "anon")
_WHOLE_LINE: Final = re.compile(r"[a-z_]+ = |\$ ")  # a key to uncomment, a command: not wrapped


# -- reading the file as data ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Assigned:
    """A top-level name of the old file: its literal value, or why it has none.

    ``via`` is the name a plain ``A = B`` copied the value from; ``expression`` the source of a
    value that is not literal (shown only for names that cannot hold a secret).
    """

    name: str
    line: int
    value: Any = None
    literal: bool = True
    reason: str = ""
    via: str = ""
    expression: str = ""
    imported: bool = False


class _NotLiteral(Exception):
    """The value needs running the file to be known."""


def _literal(node: ast.expr, env: Mapping[str, Assigned]) -> Any:
    """Evaluate `node` if it is a literal or a name bound to one; never runs anything."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        bound = env.get(node.id)
        if bound is None:
            raise _NotLiteral(f"refers to {node.id}, which the file does not set before")
        if not bound.literal:
            raise _NotLiteral(f"refers to {node.id}, which {bound.reason}")
        return bound.value
    if isinstance(node, ast.Tuple | ast.List):
        items = [_literal(item, env) for item in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise _NotLiteral("unpacks another dict (**)")
        pairs = [
            (_literal(key, env), _literal(value, env))
            for key, value in zip(node.keys, node.values, strict=True)
            if key is not None
        ]
        try:
            return dict(pairs)
        except TypeError:  # a list as a key
            raise _NotLiteral("has a key that cannot be a dict key") from None
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub | ast.UAdd)
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, int | float)
        and not isinstance(node.operand.value, bool)
    ):
        number: int | float = node.operand.value
        return -number if isinstance(node.op, ast.USub) else number
    raise _NotLiteral("is computed when the file runs")


def _assigned_names(statement: ast.stmt) -> Iterable[tuple[str, int]]:
    """Names a compound statement assigns somewhere inside, not counting function/class bodies."""
    pending: list[ast.AST] = [statement]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            yield node.id, node.lineno
        pending.extend(ast.iter_child_nodes(node))


_BLOCKS: Final[dict[type[ast.stmt], str]] = {
    ast.If: "an if",
    ast.Try: "a try",
    ast.TryStar: "a try",
    ast.For: "a for",
    ast.AsyncFor: "a for",
    ast.While: "a while",
    ast.With: "a with",
    ast.AsyncWith: "a with",
    ast.Match: "a match",
}


@dataclass(slots=True)
class _Reader:
    """Walks the module's top-level statements in order, as Python would bind them."""

    names: dict[str, Assigned] = field(default_factory=dict)
    star_imports: list[str] = field(default_factory=list)

    def bind(self, name: str, value: ast.expr, line: int) -> None:
        via = value.id if isinstance(value, ast.Name) else ""
        try:
            self.names[name] = Assigned(name, line, _literal(value, self.names), via=via)
        except _NotLiteral as exc:
            self.unknown(name, line, str(exc), ast.unparse(value))

    def unknown(
        self, name: str, line: int, reason: str, expression: str = "", *, imported: bool = False
    ) -> None:
        self.names[name] = Assigned(
            name, line, literal=False, reason=reason, expression=expression, imported=imported
        )

    def statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.bind(target.id, node.value, node.lineno)
                else:
                    self.changed(target, node.lineno, "an unpacking or item assignment")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.value is not None:
                self.bind(node.target.id, node.value, node.lineno)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Delete) else [node.target]
            for target in targets:
                self.changed(target, node.lineno, f"a {type(node).__name__} statement")
        elif isinstance(node, ast.ImportFrom | ast.Import):
            for alias in node.names:
                if alias.name == "*" and isinstance(node, ast.ImportFrom):
                    self.star_imports.append("." * node.level + (node.module or ""))
                else:
                    bound = (alias.asname or alias.name).partition(".")[0]
                    line = node.lineno
                    self.unknown(bound, line, f"is imported at line {line}", imported=True)
        elif type(node) in _BLOCKS:
            self.block(node, _BLOCKS[type(node)])
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and any(a.name == "*" for a in inner.names):
                    self.star_imports.append("." * inner.level + (inner.module or ""))

    def changed(self, target: ast.expr, line: int, how: str) -> None:
        """The names whose value `target` changes in a way only running the file tells:
        each name unpacked into, or the object an item or attribute is set on."""
        while isinstance(target, ast.Subscript | ast.Attribute | ast.Starred):
            target = target.value
        if isinstance(target, ast.Tuple | ast.List):
            for item in target.elts:
                self.changed(item, line, how)
        elif isinstance(target, ast.Name):
            self.unknown(target.id, line, f"is changed by {how} at line {line}")

    def block(self, node: ast.stmt, kind: str) -> None:
        for name, line in _assigned_names(node):
            self.unknown(
                name,
                line,
                f"is set inside {kind} block (line {line}): which value applies is only known "
                "by running the file",
            )


def read_settings(path: Path) -> tuple[dict[str, Assigned], list[str]]:
    """Parse `path` as Python without running it: its top-level names and star imports.

    Raises
    ------
    ImportSettingsError
        The file cannot be read, or is not Python 3 source.
    """
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ImportSettingsError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        where = f" (line {exc.lineno}: {exc.msg})" if exc.lineno else f" ({exc.msg})"
        raise ImportSettingsError(
            f"{path} is not a Python file{where}; if it is Python 2, fix that line first: the "
            "file is only parsed, never run"
        ) from None
    except ValueError as exc:  # e.g. NUL bytes: a binary file
        raise ImportSettingsError(f"{path} is not a Python file ({exc})") from None
    reader = _Reader()
    for statement in tree.body:
        reader.statement(statement)
    return reader.names, reader.star_imports


# -- the conversion ----------------------------------------------------------------------------


@dataclass(slots=True)
class Conversion:
    """The TOML text and what the operator must still do.

    ``attention``: settings that could not be converted or that check-config refuses (the file
    is not yet equivalent); ``todo``: steps outside the file (a password file, a hook to port).
    """

    text: str
    attention: list[str] = field(default_factory=list)
    todo: list[str] = field(default_factory=list)


def _string(text: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(text, ensure_ascii=False)


def _toml(value: Any) -> str | None:
    """A TOML scalar for a str, int, float or bool; None for anything else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    return None


def _comment(text: str) -> str:
    """``# …`` lines of `text`, wrapped, control characters escaped; a line that is a TOML
    key (a suggestion to uncomment) or a command (``$ …``) is kept whole."""
    clean = "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)
    lines: list[str] = []
    for line in clean.splitlines():
        if _WHOLE_LINE.match(line):
            lines.append(line)
        else:
            lines += textwrap.wrap(
                line, 97, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
            )
    return "\n".join(f"# {line}".rstrip() for line in lines)


def _shown(assigned: Assigned) -> str:
    """How a not-literal value is described: its expression, unless the name may be secret."""
    if _SECRET.search(assigned.name) or not assigned.expression:
        return ""
    expression = assigned.expression
    return f" ({expression[:57]}...)" if len(expression) > 60 else f" ({expression})"


@dataclass(slots=True)
class _Output:
    """The sections being written; each is a list of lines."""

    sections: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in _SECTIONS})
    not_converted: list[str] = field(default_factory=list)
    conversion: Conversion = field(default_factory=lambda: Conversion(""))

    def key(self, dotted: str, value: str, source: str) -> None:
        section, _, key = dotted.partition(".")
        self.sections[section].append(f"{key} = {value}  # {source}")

    def note(self, section: str, text: str) -> None:
        self.sections[section].append(_comment(text))

    def skip(self, name: str, why: str) -> None:
        self.not_converted.append(_comment(f"not converted: {name} ({why})"))


def _setting(out: _Output, spec: OldSetting, names: Mapping[str, Assigned]) -> None:
    section, _, key = spec.key.partition(".")
    assigned = names.get(spec.name)
    source = spec.name
    if assigned is None and spec.fallback is not None and spec.fallback in names:
        assigned, source = names[spec.fallback], f"{spec.fallback} (as {spec.name} is not set)"
    if assigned is None:
        out.note(section, f"{spec.name} is not set: {key} keeps its default")
        return
    if not assigned.literal:
        what = f"{assigned.name} {assigned.reason}"
        out.note(section, f"{what}{_shown(assigned)}; set {key} here")
        out.conversion.attention.append(f"{spec.key}: {what}; set it by hand")
        return
    if assigned.via:
        source = f"{source} (= {assigned.via})"
    if assigned.value == "" and spec.if_empty:
        out.note(section, spec.if_empty)
        return
    value = _toml(assigned.value)
    if value is None:
        out.note(section, f"{spec.name} is {assigned.value!r}, which has no TOML form: set {key}")
        out.conversion.attention.append(f"{spec.key}: {spec.name} is {assigned.value!r}")
        return
    out.key(spec.key, value, source)


def _hook(out: _Output, names: Mapping[str, Assigned], folder: Path) -> None:
    """What the hook name meant then, and what it takes now."""
    hook = names.get("POST_ANON_HOOK")
    if hook is not None and not hook.literal:
        return  # reported with the key
    name = hook.value if hook is not None else "default"
    if name == "default":
        out.note(
            "pipeline",
            'The old "default" hook ran loadstudies.py, linking studies to encounters in the '
            'research database. anonpipe\'s "default" only writes a per-study report: if you '
            "relied on the linking, port it as a hook file (see hooks/example_hook.py in the "
            "source) and list it in hook_files.",
        )
        return
    if not isinstance(name, str):
        return
    old = folder / "custom_hooks.py"
    where = f" ({old})" if old.is_file() else ""
    out.note(
        "pipeline",
        f"The hook {name!r} was registered by the old custom_hooks.py{where}: port it to "
        "anonpipe.hooks (see hooks/example_hook.py in the source), list its file in hook_files; "
        "the daemon refuses to start while the name is unknown.",
    )
    out.conversion.todo.append(
        f"port the hook {name!r} from the old custom_hooks.py and list its file in "
        "[pipeline] hook_files"
    )


def _sqlite_prefix(path: Path) -> str | None:
    """The table prefix of an existing django-dicom-review SQLite file, read without a lock."""
    if not path.is_file():
        return None
    busy = any(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-journal"))
    uri = f"{path.resolve().as_uri()}?{'mode=ro' if busy else 'immutable=1'}"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master")}
    except sqlite3.Error:
        return None
    for prefix in ("dicom_staging_", "staging_"):
        if f"{prefix}radiologystudy" in tables:
            return prefix
    return None


def _postgres_url(db: Mapping[str, Any], alias: str, out: _Output) -> str | None:
    """A ``postgresql://`` URL of a Django database dict, never with its password."""
    name, user, host, port = (str(db.get(k) or "") for k in ("NAME", "USER", "HOST", "PORT"))
    if not name:
        return None
    query: dict[str, str] = {}
    netloc = quote(user, safe="") + "@" if user else ""
    if host.startswith("/"):  # a Unix socket folder: libpq takes it as a parameter
        query["host"] = host
    elif host:
        netloc += f"[{host}]" if ":" in host else host
    if port and not port.isdigit():
        out.conversion.attention.append(
            f"review.database: DATABASES[{alias!r}] PORT is not a number"
        )
    elif port:
        netloc += f":{port}"
    options = db.get("OPTIONS") or {}
    for option, value in options.items() if isinstance(options, dict) else ():
        if option in LIBPQ_OPTIONS and isinstance(value, str | int) and not _SECRET.search(option):
            query[option] = str(value)
        else:
            out.skip(
                f"DATABASES[{alias!r}]['OPTIONS'][{option!r}]",
                "not a libpq connection parameter anonpipe passes on",
            )
    url = f"postgresql://{netloc}/{quote(name, safe='')}"
    return f"{url}?{urlencode(query, safe='/')}" if query else url


def _review(out: _Output, names: Mapping[str, Assigned], folder: Path) -> None:
    """``[review] database`` from Django's DATABASES: the alias the review tables were read from."""
    assigned = names.get("DATABASES")
    if assigned is None:
        out.note("review", "DATABASES is not set: database keeps its default")
        return
    if not assigned.literal or not isinstance(assigned.value, dict):
        why = assigned.reason if not assigned.literal else "is not a dict"
        out.note("review", f"DATABASES {why}: set database here")
        out.conversion.attention.append(f"review.database: DATABASES {why}; set it by hand")
        return
    databases: dict[Any, Any] = assigned.value
    alias = "staging" if "staging" in databases else "default"
    db = databases.get(alias)
    for other, value in databases.items():
        if other != alias and value != db:
            why = (
                "the research database, used only by the old copytoprod.py script"
                if other == "production"
                else "anonpipe reads one review database"
            )
            out.skip(f"DATABASES[{other!r}]", why)
    if not isinstance(db, dict):
        out.note("review", f"DATABASES has no {alias!r} database: set database here")
        out.conversion.attention.append(f"review.database: DATABASES[{alias!r}] is not set")
        return
    where = f"DATABASES[{alias!r}]"
    engine = str(db.get("ENGINE") or "")
    kind = DJANGO_ENGINES.get(engine)
    for extra in sorted(set(db) - {"ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT"}):
        if extra != "OPTIONS" and db[extra] not in ("", None, {}, []):
            out.skip(f"{where}[{extra!r}]", "a Django connection setting")
    if kind is None:
        out.note("review", f"{where} uses ENGINE {engine!r}: set database here")
        out.conversion.attention.append(
            f"review.database: {where} ENGINE {engine!r} is not SQLite or PostgreSQL, the "
            "review databases anonpipe reads"
        )
        return
    if kind == "sqlite":
        if not db.get("NAME") or not isinstance(db["NAME"], str):
            out.note("review", f"{where} has no NAME (the SQLite file): set database here")
            out.conversion.attention.append(f"review.database: {where} has no NAME")
            return
        path = Path(os.path.normpath(folder / db["NAME"]))  # the old pipeline ran from there
        out.key("review.database", _string(str(path)), f"{where} NAME (SQLite)")
        prefix = _sqlite_prefix(path)
        if prefix is not None:
            out.key("review.table_prefix", _string(prefix), f"the tables found in {path.name}")
        out.note(
            "review",
            "anonpipe writes publication results back to this file: the service needs write "
            "access to it and to its folder (scripts/install.sh opens the folder to the unit).",
        )
        return
    url = _postgres_url(db, alias, out)
    if url is None:
        out.note("review", f"{where} has no NAME (the database name): set database here")
        out.conversion.attention.append(f"review.database: {where} has no NAME")
        return
    out.key("review.database", _string(url), f"{where} (PostgreSQL)")
    if db.get("PASSWORD"):
        out.note(
            "review",
            f"{where} has a PASSWORD; it is not copied (this file refuses passwords). Put it "
            "alone on the first line of a file only the service can read (chmod 600, owner "
            "anonpipe) and name that file:\n"
            'password_file = "/etc/anonpipe/review.pass"',
        )
        out.conversion.todo.append(
            "put the review database's password in a file (chmod 600, owner anonpipe) and name "
            "it in [review] password_file"
        )
    out.note(
        "review",
        'table_prefix keeps its default "dicom_staging_"; very old installs used "staging_".',
    )


def _old_files(out: _Output, folder: Path) -> None:
    """Files of the old pipeline beside local_settings.py that have their own migration path."""
    identity = folder / "identity.db"
    if identity.is_file():
        out.note(
            "anon",
            f"The old identity.db ({identity}) is never used directly: import it once, before "
            f"the first run, with\n$ anonpipe import-identity -c FILE {identity}",
        )
    for name in ("dicom_limited_vocab.json", "dicom_limited_vocabulary.json"):
        vocabulary = folder / name
        if vocabulary.is_file():
            out.note(
                "anon",
                f"The old white list {vocabulary} can be kept:\n"
                f"limited_vocabulary = {_string(str(vocabulary))}",
            )


def _toml_hint(path: Path) -> str:
    """A hint when the file given is TOML already (then it also parses as Python, oddly)."""
    with contextlib.suppress(OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        if tomllib.loads(path.read_text(encoding="utf-8")):
            return "; it is a TOML file: check it with `anonpipe check-config -c FILE` instead"
    return ""


def convert(path: Path) -> Conversion:
    """Convert the old settings file `path` to anonpipe TOML (not yet checked by the loader).

    Raises
    ------
    ImportSettingsError
        Not a Python file, or none of the old settings is set in it.
    """
    names, star_imports = read_settings(path)
    known = {s.name for s in SETTINGS} | {"DATABASES", "DEFAULT_PORT"}
    if not known & {n for n, a in names.items() if not a.imported}:
        raise ImportSettingsError(
            f"{path} has no recognisable settings: none of {', '.join(sorted(known))} is set "
            f"at its top level{_toml_hint(path)}"
        )
    folder = path.resolve().parent
    out = _Output()
    for spec in SETTINGS:
        _setting(out, spec, names)
    _hook(out, names, folder)
    _review(out, names, folder)
    _old_files(out, folder)
    mapped = {s.name for s in SETTINGS} | {"DATABASES"}
    for name in names:
        if not name.isupper() or name in mapped:
            continue
        why = NO_EQUIVALENT.get(name, "no equivalent in anonpipe")
        secret = "; its value is not copied" if _SECRET.search(name) else ""
        out.skip(name, why + secret)
    for module in star_imports:
        out.skip(f"from {module} import *", "the names it brings in are not read")
    header = [
        f"# anonpipe configuration converted from {path.resolve()}",
        f"# by `anonpipe import-settings` (anonpipe {__version__}). The old file was read as "
        "data, never run:",
        "# only values written literally (or copied from a name that was) are taken.",
        "# Keys not written here keep their defaults: the sample configuration (etc/anonpipe.toml",
        "# in the source, /usr/share/doc/anonpipe/anonpipe.toml when installed) lists them all.",
        "# Check this file with `anonpipe check-config -c FILE`.",
    ]
    body: list[str] = []
    for section, lines in out.sections.items():
        if lines:
            body += ["", f"[{section}]", *lines]
    if out.not_converted:
        body += ["", "# Old settings without an equivalent:", *out.not_converted]
    out.conversion.text = "\n".join(header + body) + "\n"
    return out.conversion


def check(conversion: Conversion, name: str) -> None:
    """Load the result as check-config would; add its problems to ``conversion.attention``.

    Only the keys written are checked (absent keys keep defaults, which are not judged), so a
    problem here is one of the old values, or a rule between them (staging and research being
    the same PACS).
    """
    with tempfile.TemporaryDirectory(prefix="anonpipe-import-") as tmp:
        probe = Path(tmp) / "anonpipe.toml"
        probe.write_text(conversion.text, encoding="utf-8")
        try:
            load_settings(probe, {})
        except ConfigError as exc:
            for problem in exc.problems:
                where = f"{problem.key}: " if problem.key else ""
                conversion.attention.append(f"{where}{problem.message}".replace(str(probe), name))


def write_output(text: str, path: Path, *, force: bool) -> None:
    """Write `text` to `path`: never over an existing file unless `force` (then atomically).

    Raises
    ------
    FileExistsError
        `path` exists and `force` is false.
    """
    if not force:
        with path.open("x", encoding="utf-8") as stream:  # fails, race-free, if it exists
            stream.write(text)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
