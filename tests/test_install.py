"""The production install (``scripts/install.sh``): into a scratch root, verified by systemd.

The scratch root starts with the host's systemd units, as a fresh Debian machine has them, so
that ``systemd-analyze verify --root`` resolves the targets the unit names; it then checks the
installed unit, its drop-ins and its ExecStart binary inside that root. An upgrade and an
uninstall must keep the configuration, the data, the key and identity.db byte for byte. A
second test runs the install for real (user, group, ownership) on an overlay of this machine's
root in a private mount namespace, where it can be mounted: nothing reaches the host.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from anonpipe import __version__
from anonpipe.tools.unitpaths import dropin, writable_folders

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install.sh"
UNIT = "usr/lib/systemd/system/anonpipe.service"
DROPIN = "etc/systemd/system/anonpipe.service.d/50-anonpipe-paths.conf"
HOST_UNITS = next(
    (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
    None,
)

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or HOST_UNITS is None,
    reason="systemd-analyze and the systemd units are needed (Debian package systemd)",
)


def install(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    result = subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def analyze(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "anonpipe.service"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def verify(root: Path) -> None:
    """systemd-analyze verify, inside `root`: exit 0 and not a single warning."""
    result = analyze(root)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def digests(root: Path, *paths: str) -> dict[str, str]:
    return {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths}


def plant_data(root: Path) -> tuple[str, ...]:
    """What a running site has in /var/lib/anonpipe: a key, identity.db, a run folder."""
    state = root / "var/lib/anonpipe"
    (state / "anon.key").write_bytes(os.urandom(32))
    with sqlite3.connect(state / "identity.db") as db:
        db.execute("create table patient (original text, cleaned text)")
        db.execute("insert into patient values ('12345', 'ANON1')")
    run = state / "data" / "run_at_1700000000"
    run.mkdir(parents=True)
    (run / "overview.txt").write_text("Starting at 2023-11-14 22:13\n")
    return (
        "var/lib/anonpipe/anon.key",
        "var/lib/anonpipe/identity.db",
        "var/lib/anonpipe/data/run_at_1700000000/overview.txt",
    )


def in_root(root: Path, path: str) -> Path:
    """Follow `path`'s symlinks as systemd does with --root: absolute targets inside `root`."""
    for _ in range(40):
        here = root / path.lstrip("/")
        if not here.is_symlink():
            return here
        target = os.readlink(here)
        path = target if target.startswith("/") else str(PurePosixPath(path).parent / target)
    raise AssertionError(f"symlink loop at {path}")


def unit_values(unit: Path, key: str) -> list[str]:
    prefix = f"{key}="
    return [
        line[len(prefix) :].strip()
        for line in unit.read_text().splitlines()
        if line.startswith(prefix)
    ]


@needs_systemd
def test_install_upgrade_uninstall_in_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert HOST_UNITS is not None
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)

    first = install("--root", str(root))
    assert "user and group anonpipe not created" in first.stdout
    unit = root / UNIT
    assert unit.read_bytes() == (REPO / "systemd/anonpipe.service").read_bytes()
    for command in ("anonpipe", "anonpipectl"):
        link = root / "usr/bin" / command
        assert os.readlink(link) == f"/opt/anonpipe/bin/{command}"
        assert os.access(root / "opt/anonpipe/bin" / command, os.X_OK)
    # What the unit points at exists in the root: its binary and its documentation.
    (exec_start,) = unit_values(unit, "ExecStart")
    binary = in_root(root, exec_start.split()[0])
    assert binary == root / "opt/anonpipe/bin/anonpipe" and os.access(binary, os.X_OK)
    for entry in unit_values(unit, "Documentation"):
        for uri in entry.split():
            assert uri.startswith("file:/"), uri
            assert (root / uri.removeprefix("file:/")).is_file(), uri
    config = root / "etc/anonpipe/anonpipe.toml"
    assert config.read_bytes() == (REPO / "etc/anonpipe.toml").read_bytes()
    assert config.stat().st_mode & 0o777 == 0o640
    assert (root / "var/lib/anonpipe").stat().st_mode & 0o777 == 0o700
    assert not (root / DROPIN).exists()  # the sample keeps everything in /var/lib/anonpipe
    verify(root)
    # The verification is not vacuous: without the program, the unit does not verify.
    (root / "opt/anonpipe").rename(root / "opt/elsewhere")
    refused = analyze(root)
    assert refused.returncode != 0
    assert "/usr/bin/anonpipe is not executable" in refused.stderr
    (root / "opt/elsewhere").rename(root / "opt/anonpipe")
    version = subprocess.run(
        [str(root / "opt/anonpipe/bin/anonpipe"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == f"anonpipe {__version__}"

    # An operator's edits and a site's data, then an upgrade.
    kept = plant_data(root)
    text = config.read_text().replace(
        'database = "/var/lib/anonpipe/review.db"', 'database = "/srv/review app/review.db"'
    )
    config.write_text("# edited by the operator\n" + text)
    before = digests(root, "etc/anonpipe/anonpipe.toml", *kept)
    # As after a Debian upgrade that replaced its Python: the environment no longer runs.
    (root / "opt/anonpipe/bin/python").unlink()
    upgrade = install("--root", str(root))
    assert f"creating {root}/opt/anonpipe" in upgrade.stdout  # rebuilt, not patched
    assert f"kept {root}/etc/anonpipe/anonpipe.toml" in upgrade.stdout
    assert digests(root, "etc/anonpipe/anonpipe.toml", *kept) == before
    assert unit_values(root / DROPIN, "ReadWritePaths") == ['"-/srv/review app"']
    verify(root)  # with the drop-in

    install("--root", str(root), "--uninstall")
    for gone in ("opt/anonpipe", "usr/bin/anonpipe", "usr/bin/anonpipectl", UNIT, DROPIN):
        assert not os.path.lexists(root / gone), gone
    assert not (root / "usr/share/doc/anonpipe").exists()
    assert digests(root, "etc/anonpipe/anonpipe.toml", *kept) == before
    shutil.rmtree(root)  # a passing run leaves no environment behind (kept for a failing one)


def _overlay_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


@needs_systemd
@pytest.mark.skipif(not _overlay_available(), reason="needs root and mount namespaces")
def test_a_real_install_on_an_overlay_of_this_machine(tmp_path: Path) -> None:
    """As root on the machine itself: the user and group, ownership, verify without --root."""
    layers = tmp_path / "overlay"
    for name in ("upper", "work", "merged"):
        (layers / name).mkdir(parents=True)
    merged = layers / "merged"
    inside = f"""
set -euo pipefail
install=/{INSTALL.relative_to("/")}
bash "$install" | grep -F 'verify anonpipe.service'
getent passwd anonpipe | cut -d: -f1,6,7
stat -c '%n %U:%G %a' /etc/anonpipe /etc/anonpipe/anonpipe.toml /var/lib/anonpipe
systemd-analyze verify anonpipe.service 2>&1
runuser -u anonpipe -- anonpipe check-config -c /etc/anonpipe/anonpipe.toml >/dev/null
echo check-config ok
head -c 32 /dev/urandom >/var/lib/anonpipe/anon.key
echo '# edited' >>/etc/anonpipe/anonpipe.toml
before=$(sha256sum /var/lib/anonpipe/anon.key /etc/anonpipe/anonpipe.toml)
bash "$install" >/dev/null
bash "$install" --uninstall >/dev/null
after=$(sha256sum /var/lib/anonpipe/anon.key /etc/anonpipe/anonpipe.toml)
[ "$before" = "$after" ] && echo kept
test ! -e /usr/bin/anonpipe && test ! -e /opt/anonpipe && echo removed
"""
    script = f"""
set -euo pipefail
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/,upperdir={layers}/upper,workdir={layers}/work {merged} \
  || exit 77
for fs in proc sys dev; do mount --rbind /$fs {merged}/$fs; done
exec chroot {merged} bash -c {_quote(inside)}
"""
    host_before = [os.path.lexists(p) for p in ("/opt/anonpipe", "/usr/bin/anonpipe")]
    mounted = subprocess.run(
        ["unshare", "--mount", "--fork", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if mounted.returncode == 77:
        pytest.skip(f"an overlay over / cannot be mounted here: {mounted.stderr.strip()}")
    assert mounted.returncode == 0, mounted.stdout + mounted.stderr
    lines = mounted.stdout.splitlines()
    assert lines[0] == "== systemd-analyze verify anonpipe.service: ok"  # the script's own check
    assert lines[1] == "anonpipe:/var/lib/anonpipe:/usr/sbin/nologin"
    assert lines[2:5] == [
        "/etc/anonpipe root:anonpipe 750",
        "/etc/anonpipe/anonpipe.toml root:anonpipe 640",
        "/var/lib/anonpipe anonpipe:anonpipe 700",
    ]
    assert lines[5:] == ["check-config ok", "kept", "removed"]  # and verify printed nothing
    assert [os.path.lexists(p) for p in ("/opt/anonpipe", "/usr/bin/anonpipe")] == host_before
    shutil.rmtree(layers)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# -- the drop-in computed from the configuration (fast, no install) ----------------------------


def test_only_folders_outside_the_state_directory_are_opened() -> None:
    config = PurePosixPath("/etc/anonpipe/anonpipe.toml")
    settings = tomllib.loads(
        """
        [review]
        database = "reviews/review.db"
        [pipeline]
        data_dir = "/srv/anonpipe/data"
        [anon]
        identity_db = "/srv/anonpipe/identity.db"
        """
    )
    folders, warnings = writable_folders(settings, config)
    # Relative to the configuration's folder; data_dir collapses into the identity.db's folder;
    # the key file keeps its default, inside the state directory.
    assert folders == [PurePosixPath("/etc/anonpipe/reviews"), PurePosixPath("/srv/anonpipe")]
    assert warnings == []
    assert dropin(folders, config).splitlines()[-3:] == [
        "[Service]",
        "ReadWritePaths=-/etc/anonpipe/reviews",
        "ReadWritePaths=-/srv/anonpipe",
    ]


def test_defaults_and_postgresql_need_no_drop_in() -> None:
    config = PurePosixPath("/etc/anonpipe/anonpipe.toml")
    settings = tomllib.loads('[review]\ndatabase = "postgresql://anonpipe@db/review"\n')
    assert writable_folders(settings, config) == ([], [])
    assert writable_folders({}, config) == ([], [])
    assert dropin([], config) == ""


def test_hidden_folders_are_warned_about_and_odd_names_escaped() -> None:
    config = PurePosixPath("/etc/anonpipe/anonpipe.toml")
    settings = tomllib.loads(
        '[review]\ndatabase = "/home/ops/review.db"\n[pipeline]\ndata_dir = "/srv/100% data"\n'
    )
    folders, warnings = writable_folders(settings, config)
    assert folders == [PurePosixPath("/srv/100% data")]
    assert len(warnings) == 1 and "review.database" in warnings[0]
    assert dropin(folders, config).splitlines()[-1] == 'ReadWritePaths="-/srv/100%% data"'


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_install_script_is_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", str(INSTALL)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout
