"""A disposable PostgreSQL server for the review-database tests (Debian package ``postgresql``).

PostgreSQL refuses to run as root, and the tests run as root: the cluster is made by ``initdb``
in a fresh folder under ``/tmp`` owned by an unprivileged user (``postgres`` when the package
created it, else ``nobody``), and ``postgres`` runs as that user, listening on 127.0.0.1 on a
free port and on a Unix socket in the same folder. Authentication is ``trust`` except for one
role, :data:`PASSWORD_ROLE`, that must give its password (``scram-sha-256``), so that a test can
prove the password reaches the server from ``[review] password_file``. Durability is off
(``fsync``): the data is thrown away.

Examples
--------
>>> with PostgresServer() as server:                                   # doctest: +SKIP
...     url = server.create_database("review")
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql

from tests.harness.ports import LOOPBACK, free_port

__all__ = [
    "PASSWORD_ROLE",
    "SUPERUSER",
    "PostgresError",
    "PostgresServer",
    "find_postgres_bindir",
]

#: The superuser initdb creates (trusted: no password).
SUPERUSER = "postgres"
#: A role that must authenticate with a password over TCP (scram-sha-256).
PASSWORD_ROLE = "anonpipe_pw"


class PostgresError(RuntimeError):
    """The server could not be found, initialised or started; the message says why."""


def find_postgres_bindir() -> Path:
    """The folder of ``initdb`` and ``postgres``: ``$ANONPIPE_PG_BINDIR``, else the newest
    ``/usr/lib/postgresql/<version>/bin`` (Debian keeps them off ``PATH``)."""
    chosen = os.environ.get("ANONPIPE_PG_BINDIR")
    candidates = [Path(chosen)] if chosen else []
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(
        versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    )[::-1]
    for candidate in candidates:
        if os.access(candidate / "postgres", os.X_OK) and os.access(candidate / "initdb", os.X_OK):
            return candidate
    raise PostgresError(
        "PostgreSQL not found: install the Debian package 'postgresql' (scripts/setup.sh does) "
        "or set ANONPIPE_PG_BINDIR to the folder holding initdb and postgres"
    )


def _server_user() -> pwd.struct_passwd:
    for name in (os.environ.get("ANONPIPE_PG_USER"), "postgres", "nobody"):
        if not name:
            continue
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresError("no unprivileged user to run PostgreSQL as; set ANONPIPE_PG_USER")


def _die_with_parent() -> None:
    """Fast shutdown (SIGINT) of the server if the test process dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT, 0, 0, 0)  # PR_SET_PDEATHSIG


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, started by :meth:`start`.

    Attributes
    ----------
    port : int
        The TCP port on 127.0.0.1 (0 until started).
    root : Path
        The folder holding ``data/``, the socket and ``postgres.log`` (removed by :meth:`stop`).
    """

    def __init__(self) -> None:
        self.bindir = find_postgres_bindir()
        self.user = _server_user() if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        self.root = Path(tempfile.mkdtemp(prefix="anonpipe-pg-", dir="/tmp"))
        self.port = 0
        self.log_path = self.root / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._databases = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """Popen arguments that drop root to the server user (nothing to drop otherwise)."""
        if os.geteuid() != 0:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _as_server_user(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            **self._identity(),
            cwd=self.root,
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def _env(self) -> dict[str, str]:
        # Nothing of ours (PGPASSWORD, PGHOST, ...) reaches the server; C.UTF-8 always exists.
        return {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "TZ": os.environ.get("TZ", "UTC")}

    def start(self, timeout: float = 30.0) -> Self:
        """initdb, write the access rules, start ``postgres`` and wait until it answers."""
        if os.geteuid() == 0:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        os.chmod(self.root, 0o700)
        data = self.root / "data"
        done = self._as_server_user(
            [
                str(self.bindir / "initdb"),
                "-D", str(data),
                "-U", SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )  # fmt: skip
        if done.returncode:
            raise PostgresError(f"initdb failed ({done.returncode}): {done.stderr.strip()}")
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_ROLE} {LOOPBACK}/32 scram-sha-256\n"
            f"host all all {LOOPBACK}/32 trust\n",
            encoding="utf-8",
        )
        deadline = time.monotonic() + timeout
        for _attempt in range(3):  # another process may take the free port before we bind it
            self.port = free_port()
            if self._launch(data, deadline):
                return self
        raise PostgresError(f"PostgreSQL did not start; see {self.log_path}:\n{self.log_tail()}")

    def _launch(self, data: Path, deadline: float) -> bool:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D", str(data),
                    "-k", str(self.root),
                    "-p", str(self.port),
                    "-c", f"listen_addresses={LOOPBACK}",
                    "-c", "fsync=off",
                    "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off",
                    "-c", "max_connections=50",
                    "-c", "log_min_messages=warning",
                ],
                **self._identity(),
                cwd=self.root,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        self.stop()
        raise PostgresError(f"PostgreSQL did not answer in time; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (clients disconnected), SIGKILL after `timeout`; remove the folder."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for failure messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- databases ------------------------------------------------------------------------------

    def url(self, database: str, user: str = SUPERUSER) -> str:
        """A ``postgresql://`` URL over TCP to `database` as `user`, without a password."""
        return f"postgresql://{user}@{LOOPBACK}:{self.port}/{database}"

    def execute(self, statement: sql.Composed, database: str = "postgres") -> None:
        """Run one statement as the superuser outside a transaction (CREATE/DROP DATABASE)."""
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, prefix: str = "review", template: str | None = None) -> str:
        """Create a new, uniquely named database (a copy of `template` if given); return its
        name."""
        self._databases += 1
        name = f"{prefix}_{self._databases}"
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        self.execute(statement)
        return name

    def drop_database(self, name: str) -> None:
        """Drop `name`, disconnecting whoever is still connected."""
        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def create_password_role(self, password: str) -> None:
        """(Re)create :data:`PASSWORD_ROLE`, a superuser that must give `password` over TCP."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            role = sql.Identifier(PASSWORD_ROLE)
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                    role, sql.Literal(password)
                )
            )

    def __repr__(self) -> str:
        return f"PostgresServer({LOOPBACK}:{self.port}, {self.root})"
