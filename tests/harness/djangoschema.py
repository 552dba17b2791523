"""Review-database schemas created by Django's own migrations, on SQLite and on PostgreSQL.

The tables come from ``tests/harness/dicom_staging`` (a models module mirroring
django-dicom-models) and its committed migration, applied with ``migrate``: the column types are
whatever Django creates on each backend (``bool``/``datetime`` declarations on SQLite,
``boolean``/``timestamp with time zone`` on PostgreSQL), never a schema of ours. Django is a
test-only dependency (the ``test`` extra) and is configured here, once per process, with no
database of its own: each :func:`migrate` call adds a connection for the database it is given and
removes it afterwards (so no connection stays open on a template database).
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["APP", "migrate"]

#: The Django app holding the models and the migration.
APP = "tests.harness.dicom_staging"

_lock = threading.Lock()
_aliases = itertools.count(1)


def _setup() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(INSTALLED_APPS=[APP], DATABASES={}, USE_TZ=False)
        django.setup()


def _database_settings(database: str | Path) -> dict[str, Any]:
    """Django ``DATABASES`` entry for a SQLite path or a password-free ``postgresql://`` URL."""
    text = str(database)
    if "://" not in text:
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": text}
    parts = urlsplit(text)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


def migrate(database: str | Path) -> None:
    """Apply the ``dicom_staging`` migrations to `database` (a SQLite path, created if absent,
    or a ``postgresql://`` URL of an existing database), as ``manage.py migrate`` would."""
    from django.core.management import call_command
    from django.db import connections

    with _lock:
        _setup()
        alias = f"review_{next(_aliases)}"
        given = {"default": {}, alias: _database_settings(database)}
        connections.settings[alias] = connections.configure_settings(given)[alias]
        try:
            call_command("migrate", "dicom_staging", database=alias, verbosity=0)
        finally:
            connections[alias].close()
            del connections[alias]
            del connections.settings[alias]
