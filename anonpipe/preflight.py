"""Pre-flight checks of ``anonpipe check-config``: what start-up would refuse, and with ``--live``
whether the things the configuration points at answer.

Configuration problems (:func:`config_problems`) are what the daemon refuses at start-up with exit
2: an unknown hook (built in, from ``hook_files`` or from an installed package), a hook file that
fails to load, an identity.db anonpipe did not create. Live checks (:func:`live_checks`) connect:
the review database and its schema, identity.db and the key (ours, and matching), the data
folder's free space, and a C-ECHO to both PACS with our AE title. Each gives one :class:`Check`
that says what is wrong and how to fix it; none changes or creates anything.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from anonpipe.anon.identity import IdentityError, check_identity, check_store
from anonpipe.config import (
    AnonSettings,
    ConfigProblem,
    LocalSettings,
    ResearchSettings,
    ReviewSettings,
    Settings,
    StagingSettings,
)
from anonpipe.daemon.reviewdb import (
    POSTGRESQL_SCHEMES,
    ReviewDatabaseError,
    ReviewSchemaError,
    review_database,
)
from anonpipe.hooks import HookError, builtin_registry, load_hook_files, resolve_hook
from anonpipe.scu import echo
from anonpipe.tools.cleandata import format_size

__all__ = ["Check", "config_problems", "live_checks"]

#: The fix for a review database that cannot be opened, by backend.
_REVIEW_CONNECT_FIX: Final = {
    "postgresql": "check [review] database (host, port, database name, user), that PostgreSQL is"
    " running and listening there, that its pg_hba.conf allows this host and user, and the"
    " password ([review] password_file, or PGPASSWORD / PGPASSFILE)",
    "sqlite": "[review] database must name the django-dicom-review SQLite file (the review app's"
    " DATABASES NAME), readable and writable by the user anonpipe runs as",
}
_REVIEW_SCHEMA_FIX: Final = (
    "point [review] database at the django-dicom-review database, set [review] table_prefix to"
    " its tables' prefix (very old installs: 'staging_'), or run the review app's migrations"
)
_AS_SERVICE_USER: Final = (
    "run the check as the user the service runs as (systemd User=), or give that user the file"
    " (chown; mode 600)"
)


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one live check: ``what`` is the finding, ``fix`` what to do when not ok."""

    subject: str
    ok: bool
    what: str
    fix: str = ""

    def line(self) -> str:
        """``OK subject: what`` or ``PROBLEM subject: what → fix``."""
        if self.ok:
            return f"OK      {self.subject}: {self.what}"
        return f"PROBLEM {self.subject}: {self.what}" + (f" → {self.fix}" if self.fix else "")


def config_problems(settings: Settings) -> list[ConfigProblem]:
    """What start-up would refuse beyond the file's own validation, as configuration problems.

    Loads the hook files and, for an installed hook, its module: start-up does the same.
    """
    file = settings.source or Path("(built-in defaults)")
    problems: list[ConfigProblem] = []
    anon = settings.anon
    if os.access(anon.identity_db, os.R_OK):  # another user's store: --live says so
        try:
            check_store(anon.identity_db)
        except IdentityError as exc:
            problems.append(
                ConfigProblem(file, "anon.identity_db", str(anon.identity_db), str(exc))
            )
    pipeline = settings.pipeline
    hooks = builtin_registry()  # not the hooks earlier loads in this process registered
    try:
        load_hook_files(pipeline.hook_files, hooks)
    except HookError as exc:
        files = [str(f) for f in pipeline.hook_files]
        problems.append(ConfigProblem(file, "pipeline.hook_files", files, str(exc)))
        return problems
    try:
        resolve_hook(pipeline.post_anon_hook, (), hooks)
    except HookError as exc:
        problems.append(
            ConfigProblem(file, "pipeline.post_anon_hook", pipeline.post_anon_hook, str(exc))
        )
    return problems


async def live_checks(settings: Settings) -> list[Check]:
    """Connect to everything the configuration names; the slow ones (network) side by side."""
    review, staging, research = await asyncio.gather(
        check_review_database(settings.review),
        asyncio.to_thread(check_pacs, "staging", settings.local, settings.staging),
        asyncio.to_thread(check_pacs, "research", settings.local, settings.research),
    )
    return [
        review,
        check_identity_store(settings.anon),
        check_data_folder(settings),
        staging,
        research,
    ]


async def check_review_database(review: ReviewSettings) -> Check:
    """Open the review database read-only and verify its tables (what start-up does), and that
    a SQLite file can be written back to."""
    subject = "review database"
    scheme = review.database.partition("://")[0]
    backend = "postgresql" if scheme in POSTGRESQL_SCHEMES else "sqlite"
    try:
        db = review_database(
            review.database, review.table_prefix, password_file=review.password_file
        )
        await db.check()
    except ReviewSchemaError as exc:
        return Check(subject, False, str(exc), _REVIEW_SCHEMA_FIX)
    except ReviewDatabaseError as exc:
        return Check(subject, False, str(exc), _REVIEW_CONNECT_FIX[backend])
    if backend == "sqlite":
        path = Path(review.database)
        if not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)):
            return Check(
                subject,
                False,
                f"{path} or its folder is not writable by uid {os.geteuid()}: outcomes could"
                " not be written back",
                _AS_SERVICE_USER,
            )
    return Check(
        subject, True, f"{db.name}: tables {db.study_table} and {db.review_table} as expected"
    )


def check_identity_store(anon: AnonSettings) -> Check:
    """identity.db is ours, readable and writable, and the key file is the one that made it."""
    subject = "identity store"
    path, key_file = anon.identity_db, anon.key_file
    for file in (path, key_file):
        if file.exists() and not os.access(file, os.R_OK):
            return Check(
                subject, False, f"{file} is not readable by uid {os.geteuid()}", _AS_SERVICE_USER
            )
    if path.exists() and not os.access(path, os.W_OK):
        return Check(
            subject, False, f"{path} is not writable by uid {os.geteuid()}", _AS_SERVICE_USER
        )
    try:
        check_identity(path, key_file)
    except IdentityError as exc:
        return Check(subject, False, str(exc))
    if path.exists():
        return Check(subject, True, f"{path}: made by anonpipe, with the key in {key_file}")
    if key_file.exists():
        return Check(
            subject,
            False,
            f"{path} not found, but the key {key_file} exists: if studies were de-identified"
            " with this key, their patients' date offsets and any imported mappings are in an"
            " identity.db elsewhere",
            "restore identity.db from a backup or correct [anon] identity_db; on a new"
            " installation nothing is lost and it is created at the first run",
        )
    folder = _nearest_existing(path.parent)
    if not os.access(folder, os.W_OK | os.X_OK):
        return Check(
            subject,
            False,
            f"{path} and {key_file} do not exist yet and {folder} is not writable by uid"
            f" {os.geteuid()}: they could not be created",
            "create the folder for the service's user (mode 700), or " + _AS_SERVICE_USER,
        )
    return Check(subject, True, f"{path} and {key_file}: created at the first run (mode 600)")


def check_data_folder(settings: Settings) -> Check:
    """Free space of the data folder against ``[local] min_free_mb``, below which our SCP
    refuses objects and runs wait."""
    data_dir = settings.pipeline.data_dir
    floor = settings.local.min_free_mb * 2**20
    usage = shutil.disk_usage(_nearest_existing(data_dir))
    found = f"{data_dir}: {format_size(usage.free)} free of {format_size(usage.total)}"
    if usage.free < floor:
        return Check(
            "data folder",
            False,
            f"{found}, below [local] min_free_mb = {settings.local.min_free_mb}: our SCP would"
            " refuse every object and runs would wait",
            "free space (anonpipe clean-data --before YYYY-MM-DD removes old runs' DICOM"
            " folders), move [pipeline] data_dir to a larger disk, or lower min_free_mb",
        )
    return Check("data folder", True, f"{found} (floor {format_size(floor)})")


def check_pacs(name: str, local: LocalSettings, peer: StagingSettings | ResearchSettings) -> Check:
    """C-ECHO the PACS as our AE title: its address, and that it accepts us."""
    result = echo(local, peer)
    subject = f"{name} PACS"
    if result.ok:
        return Check(
            subject,
            True,
            f"{result.peer}: answered C-ECHO from {local.ae_title} in"
            f" {result.seconds * 1000:.0f} ms",
        )
    fix = (
        f"check [{name}] ae_title, host and port, that the PACS is running and reachable from"
        f" here, and that it accepts associations from our AE title {local.ae_title}"
    )
    if name == "staging":
        fix += f" and knows it at this host, port {local.port} (where it sends the C-MOVE)"
    return Check(subject, False, f"{result.peer}: C-ECHO failed: {result.error}", fix)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
