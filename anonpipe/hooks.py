"""Post-anonymization hooks: site code run once a run's files are de-identified.

As in the old pipeline's ``custom_hooks.py``, a site writes a Python file that registers a
function, and the configuration names it::

    # /etc/anonpipe/hooks/link.py, listed in [pipeline] hook_files
    from pathlib import Path

    from anonpipe.hooks import OverviewWriter, registry

    def link(run_dir: Path, overview: OverviewWriter, practice: bool) -> str:
        ...  # cleaned files are in run_dir / "to_production" / <study> / <series> / <sop>.dcm
        overview.write("12 files containing 1 studies were linked.\\n")
        return "the detailed report, saved to post_anon_output.txt"

    registry.register(link, name="link")  # then [pipeline] post_anon_hook = "link"

The hook gets the run folder (a :class:`~pathlib.Path`; the old code passed a string), a stream
whose lines go to overview.txt, and whether this is a practice run (it must then change nothing
outside the run folder). Its return value is saved to post_anon_output.txt
(post_anon_output_practice.txt in practice). ``@registry.register`` and
``@registry.register(name="link")`` work as decorators too.

An installed package can offer hooks too, through the entry-point group ``anonpipe.hooks``
(:data:`ENTRY_POINT_GROUP`), so a site's hooks can be versioned and installed like any package::

    # the site package's pyproject.toml
    [project.entry-points."anonpipe.hooks"]
    link = "site_hooks.link:link"      # then [pipeline] post_anon_hook = "link"

Only the hook named in the configuration is imported; the others are listed by name.

**Per-study hooks.** A hook registered through :func:`per_study` is called once per study, as
soon as that study is de-identified, with a :class:`HookStudy` (its folder, cleaned UID, counts,
modality and SOP class, from the state store) and whether the run practises; its return value is
appended to post_anon_output.txt. The run then never waits: one study is pushed while the next is
still being pulled. A per-run hook (the form above) needs every study of the run de-identified
before it starts, so no push can begin before the last pull ends::

    @per_study
    def link(study: HookStudy, practice: bool) -> str:
        ...  # study.folder / <series> / <sop>.dcm
        return f"{study.study_uid}\tlinked"

    registry.register(link, name="link")

Unlike the old code, which silently fell back to the default hook, an unknown name is an error at
start-up (:func:`resolve_hook`), and ``check-config`` says so with the names it knows. Built in:
``default`` (per study: one line describing it) and ``none`` (per study: does nothing).
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Final, Protocol, TypeVar, overload

from anonpipe.daemon.audit import study_report
from anonpipe.logs import get_logger

__all__ = [
    "ENTRY_POINT_GROUP",
    "AnyHook",
    "Hook",
    "HookError",
    "HookRegistry",
    "HookStudy",
    "OverviewWriter",
    "StudyHook",
    "builtin_registry",
    "default_hook",
    "installed_hooks",
    "is_per_study",
    "known_hooks",
    "load_hook_files",
    "none_hook",
    "per_study",
    "registry",
    "resolve_hook",
    "run_hook",
    "run_study_hook",
]

log = get_logger(__name__)

#: Entry-point group through which installed distributions offer hooks (``name = "module:attr"``).
ENTRY_POINT_GROUP: Final = "anonpipe.hooks"


class OverviewWriter(Protocol):
    """What a hook may do with ``overview``: write text; complete lines go to overview.txt."""

    def write(self, text: str, /) -> int:
        """Write `text`; returns the number of characters written."""
        ...


#: ``hook(run_dir, overview, practice) -> report``: once per run.
Hook = Callable[[Path, OverviewWriter, bool], str]


@dataclass(frozen=True, slots=True)
class HookStudy:
    """One de-identified study, as a per-study hook sees it (no original identifier)."""

    #: The run folder.
    run_dir: Path
    #: ``run_dir / "to_production" / study_uid``: ``<series>/<sop>.dcm`` below it.
    folder: Path
    #: The cleaned Study Instance UID.
    study_uid: str
    #: The study's id in the review DB.
    review_id: int
    files: int
    series: int
    #: The first clean file's Modality and SOP Class UID.
    modality: str | None
    sop_class: str | None


#: ``hook(study, practice) -> report``: once per study (registered through :func:`per_study`).
StudyHook = Callable[[HookStudy, bool], str]
AnyHook = Hook | StudyHook
H = TypeVar("H", bound=AnyHook)

_PER_STUDY_MARK: Final = "__anonpipe_per_study__"


def per_study(fn: Callable[[HookStudy, bool], object]) -> StudyHook:
    """Mark `fn` as a per-study hook (use as a decorator); register it as any other."""
    setattr(fn, _PER_STUDY_MARK, True)
    return fn  # type: ignore[return-value]


def is_per_study(hook: AnyHook) -> bool:
    """Whether `hook` runs once per study (:func:`per_study`) rather than once per run."""
    return bool(getattr(hook, _PER_STUDY_MARK, False))


class HookError(RuntimeError):
    """A hook is unknown, registered twice, failed to load, or failed when run."""


# While load_hook_files(into=...) runs, registrations through the module registry go there.
_redirect: contextvars.ContextVar[HookRegistry | None] = contextvars.ContextVar(
    "anonpipe_hook_redirect", default=None
)


class HookRegistry:
    """Hooks by name. Thread-safe.

    Registering a name twice with a different function is an error; the same function, or the
    function of the same name from the same file (a hook file loaded again), replaces it.
    """

    def __init__(self) -> None:
        self._hooks: dict[str, AnyHook] = {}
        self._lock = threading.Lock()

    @overload
    def register(self, fn: H, name: str | None = None) -> H: ...

    @overload
    def register(self, fn: None = None, name: str | None = None) -> Callable[[H], H]: ...

    def register(self, fn: H | None = None, name: str | None = None) -> H | Callable[[H], H]:
        """Register `fn` under `name` (default: the function's ``__name__``).

        Parameters
        ----------
        fn : callable or None
            ``fn(run_dir, overview, practice) -> str``. None returns a decorator, for
            ``@registry.register(name="x")``.
        name : str or None, optional
            The name ``[pipeline] post_anon_hook`` uses.

        Returns
        -------
        callable
            `fn` itself, so the method works as a decorator.

        Raises
        ------
        HookError
            If `fn` is not callable, `name` is empty, or `name` is taken by another function.
        """
        if fn is None:
            return lambda f: self.register(f, name)
        target = _redirect.get() if self is registry else None
        if target is not None and target is not self:
            return target.register(fn, name)
        if not callable(fn):
            raise HookError(f"cannot register {fn!r} as a hook: it is not callable")
        key = name if name is not None else getattr(fn, "__name__", "")
        if not isinstance(key, str) or not key.strip():
            raise HookError("a hook needs a non-empty name: registry.register(fn, name='my_hook')")
        with self._lock:
            old = self._hooks.get(key)
            if old is not None and not _same_hook(old, fn):
                raise HookError(
                    f"post_anon_hook {key!r} is already registered by {_where(old)}; "
                    f"register {_where(fn)} under another name"
                )
            self._hooks[key] = fn
        return fn

    def get(self, name: str) -> AnyHook:
        """The hook registered as `name`.

        Raises
        ------
        HookError
            If no hook has that name; the message lists the known names and the fix.
        """
        with self._lock:
            hook = self._hooks.get(name)
            known = ", ".join(self._hooks)
        if hook is None:
            raise HookError(
                f"unknown post_anon_hook {name!r}; known: {known or '(none)'}; set [pipeline] "
                "post_anon_hook or add the file defining it to [pipeline] hook_files"
            )
        return hook

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        with self._lock:
            return tuple(self._hooks)

    def _items(self) -> list[tuple[str, AnyHook]]:
        with self._lock:
            return list(self._hooks.items())


def _same_hook(old: AnyHook, new: AnyHook) -> bool:
    if old is new:
        return True
    old_code, new_code = getattr(old, "__code__", None), getattr(new, "__code__", None)
    return (
        old_code is not None
        and new_code is not None
        and old_code.co_filename == new_code.co_filename
        and getattr(old, "__qualname__", None) == getattr(new, "__qualname__", None)
    )


def _where(fn: AnyHook) -> str:
    code = getattr(fn, "__code__", None)
    place = f" in {code.co_filename}" if code is not None else ""
    return f"{getattr(fn, '__qualname__', repr(fn))}{place}"


def load_hook_files(paths: Iterable[Path], into: HookRegistry | None = None) -> None:
    """Import each site hook file by path; their ``registry.register`` calls land in `into`.

    All or nothing: if a file fails, no registration of this call is kept.

    Parameters
    ----------
    paths : iterable of Path
        Python files (``[pipeline] hook_files``). Each is imported as a module of its own,
        named after its resolved path, so loading a file again re-registers its hooks.
    into : HookRegistry or None, optional
        Where registrations made through ``anonpipe.hooks.registry`` go; default that registry.

    Raises
    ------
    HookError
        Naming the file, the exception type and its message, for a file that is missing, not a
        ``.py`` file, or raises while imported.
    """
    target = registry if into is None else into
    staging = HookRegistry()
    for name, fn in target._items():
        staging._hooks[name] = fn
    files = [Path(path) for path in paths]
    token = _redirect.set(staging)
    try:
        for path in files:
            _import_file(path)
    finally:
        _redirect.reset(token)
    for name, fn in staging._items():
        target.register(fn, name)
    if files:
        log.info("hook files loaded", files=len(files), hooks=list(staging.names()))


def _import_file(path: Path) -> None:
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    module_name = f"anonpipe_site_hook_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HookError(f"cannot load hook file {path}: not a Python source file (*.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise HookError(f"cannot load hook file {path}: {type(exc).__name__}: {exc}") from exc


def installed_hooks() -> dict[str, tuple[EntryPoint, ...]]:
    """The hooks installed distributions offer (group :data:`ENTRY_POINT_GROUP`), by name.

    Nothing is imported: listing them runs no code of theirs. A name offered by two
    distributions has two entries (:func:`resolve_hook` refuses it).
    """
    found: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(point.name, []).append(point)
    return {name: tuple(points) for name, points in found.items()}


def _origin(point: EntryPoint) -> str:
    dist = point.dist
    return f"package {dist.name} {dist.version}" if dist is not None else point.value


def known_hooks(into: HookRegistry | None = None) -> dict[str, str | None]:
    """Every hook name start-up could resolve now: registered ones (built in, hook files) map
    to None, installed ones to the package offering them."""
    target = registry if into is None else into
    known: dict[str, str | None] = dict.fromkeys(target.names())
    for name, points in installed_hooks().items():
        known.setdefault(name, ", ".join(_origin(p) for p in points))
    return known


def _load_installed(name: str, target: HookRegistry) -> None:
    """Import the installed hook `name`, if a distribution offers it, and register it."""
    points = installed_hooks().get(name, ())
    if len(points) > 1:
        raise HookError(
            f"post_anon_hook {name!r} is offered by several installed packages "
            f"({', '.join(_origin(p) for p in points)}); uninstall all but one"
        )
    if not points:
        return
    try:
        fn = points[0].load()
    except (Exception, SystemExit) as exc:
        raise HookError(
            f"cannot load post_anon_hook {name!r} from {_origin(points[0])} "
            f"({points[0].value}): {type(exc).__name__}: {exc}"
        ) from exc
    target.register(fn, name)


def builtin_registry() -> HookRegistry:
    """A new registry holding only the built-in hooks (a check that must not see hooks
    registered earlier in this process)."""
    fresh = HookRegistry()
    fresh.register(default_hook, name="default")
    fresh.register(none_hook, name="none")
    return fresh


def resolve_hook(name: str, files: Iterable[Path], into: HookRegistry | None = None) -> AnyHook:
    """Load `files`, then return the hook `name`: what start-up (and check-config) calls.

    The installed distributions' entry points (:func:`installed_hooks`) are asked for `name`
    too, and only that one is imported; a name both a hook file and a package define with
    different functions is refused rather than one silently winning.

    Raises
    ------
    HookError
        If a file or the installed hook fails to load, two packages offer `name`, or no hook
        is called `name` (the message lists the known ones and where they come from).
    """
    target = registry if into is None else into
    load_hook_files(files, target)
    _load_installed(name, target)
    if name not in target.names():
        known = ", ".join(
            known if origin is None else f"{known} ({origin})"
            for known, origin in known_hooks(target).items()
        )
        raise HookError(
            f"unknown post_anon_hook {name!r}; known: {known or '(none)'}; set [pipeline] "
            "post_anon_hook to one of them, add the file defining it to [pipeline] hook_files, "
            f"or install the package that offers it (entry-point group {ENTRY_POINT_GROUP})"
        )
    return target.get(name)


def run_hook(
    hook: Hook, run_dir: Path, overview: OverviewWriter, practice: bool, name: str | None = None
) -> str:
    """Run the per-run `hook` and return its report.

    A pending partial line of `overview` is flushed afterwards (if it has ``flush``). A return
    value that is not a string is converted with ``str()``; None (a hook without ``return``)
    gives "".

    Parameters
    ----------
    name : str or None, optional
        The registered name, for messages (default: the function's name).

    Raises
    ------
    HookError
        If the hook raises; the message names the hook and quotes the exception, which may
        carry data the hook handled: record it in the run folder, do not log it.
    """
    try:
        return _called(hook, name, lambda: hook(run_dir, overview, practice))
    finally:
        flush = getattr(overview, "flush", None)
        if callable(flush):
            flush()


def run_study_hook(
    hook: StudyHook, study: HookStudy, practice: bool, name: str | None = None
) -> str:
    """Run the per-study `hook` on `study` and return its report (as :func:`run_hook`)."""
    return _called(hook, name, lambda: hook(study, practice))


def _called(hook: AnyHook, name: str | None, call: Callable[[], object]) -> str:
    label = name if name is not None else getattr(hook, "__name__", repr(hook))
    try:
        report = call()
    except (Exception, SystemExit) as exc:
        log.warning("post_anon_hook failed", hook=label, error_type=type(exc).__name__)
        raise HookError(f"post_anon_hook {label!r} failed: {type(exc).__name__}: {exc}") from exc
    if report is None:
        return ""
    return report if isinstance(report, str) else str(report)


# ------------------------------------------------------------------------- built-in hooks


@per_study
def default_hook(study: HookStudy, practice: bool) -> str:
    """Describe the de-identified study: ``<cleaned study uid>\\t<n> series\\t<n> images
    \\t<modality>\\t<sop class uid>`` (the first file's), as the old default hook reported
    each folder of ``to_production``. Practice changes nothing here (the caller picks the file).
    The run writes the overview's ``N files containing N studies were successfully hooked up``.
    """
    return study_report(study.study_uid, study.series, study.files, study.modality, study.sop_class)


@per_study
def none_hook(study: HookStudy, practice: bool) -> str:
    """Do nothing: for sites that link studies some other way."""
    return ""


registry = HookRegistry()
registry.register(default_hook, name="default")
registry.register(none_hook, name="none")
