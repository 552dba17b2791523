#!/usr/bin/env bash
# Production install of anonpipe on Debian (README "Install"). As root, from a checkout:
#   scripts/install.sh                 install, or upgrade an installed anonpipe
#   scripts/install.sh --uninstall     remove the program; keep configuration, data and user
#   scripts/install.sh --root DIR ...  the same into a staging root DIR (as DESTDIR)
# What it puts where (inside DIR with --root):
#   /opt/anonpipe                      a virtual environment with anonpipe built from this tree
#   /usr/bin/anonpipe, anonpipectl     symlinks into it: where the unit's ExecStart looks
#   /usr/lib/systemd/system/anonpipe.service, /usr/share/doc/anonpipe/ (README.md, the sample
#                                      anonpipe.toml, the example hook: the unit's Documentation=)
#   /etc/anonpipe/anonpipe.toml        the sample, only when absent: an existing one is never touched
#   /etc/systemd/system/anonpipe.service.d/50-anonpipe-paths.conf
#                                      ReadWritePaths= for what the configuration puts outside
#                                      /var/lib/anonpipe (e.g. a SQLite review database's folder)
#   the system user and group anonpipe, /var/lib/anonpipe (0700)
# An upgrade is the same command: the program is rebuilt, /etc/anonpipe, /var/lib/anonpipe (runs,
# state, anon.key, identity.db) and the user are kept, a running service is restarted.
# With --root no user is created (useradd would need the root's own /etc) and systemd is not
# told; the environment's scripts name DIR/opt/anonpipe/bin/python, so the tree is for checking
# on this machine (systemd-analyze verify --root=DIR), not for copying elsewhere.
# Missing build tools for systemd-python (python3-venv, python3-dev, gcc, pkg-config,
# libsystemd-dev) are installed with apt. PYTHON selects the interpreter (default /usr/bin/python3).
set -euo pipefail

usage() {
  echo "usage: $0 [--root DIR] [--uninstall]" >&2
  exit 2
}

root=/
uninstall=false
while (($#)); do
  case "$1" in
    --root)
      (($# >= 2)) || usage
      root=$2
      shift 2
      ;;
    --root=*)
      root=${1#--root=}
      shift
      ;;
    --uninstall)
      uninstall=true
      shift
      ;;
    -h | --help) usage ;;
    *) usage ;;
  esac
done

src=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root"
root=$(cd "$root" && pwd)
R=${root%/} # prefix of every installed path; empty for the real root
real=false
[ -z "$R" ] && real=true
if $real && [ "$(id -u)" -ne 0 ]; then
  echo "$0: run as root (or with --root DIR for a staging root)" >&2
  exit 2
fi
systemd_running=false
$real && [ -d /run/systemd/system ] && systemd_running=true

venv=/opt/anonpipe
unit=/usr/lib/systemd/system/anonpipe.service
doc=/usr/share/doc/anonpipe
config=/etc/anonpipe/anonpipe.toml
state=/var/lib/anonpipe
dropin_dir=/etc/systemd/system/anonpipe.service.d
dropin=$dropin_dir/50-anonpipe-paths.conf
commands=(anonpipe anonpipectl)

if $uninstall; then
  if $systemd_running; then
    systemctl disable --now anonpipe.service || true
  fi
  for cmd in "${commands[@]}"; do
    link=$R/usr/bin/$cmd
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$venv/bin/$cmd" ]; then
      rm -f "$link"
    fi
  done
  rm -f "$R$unit" "$R$dropin"
  [ -d "$R$dropin_dir" ] && rmdir --ignore-fail-on-non-empty "$R$dropin_dir"
  rm -rf "$R$venv" "$R$doc"
  if $systemd_running; then
    systemctl daemon-reload
  fi
  echo "== anonpipe removed from ${root}; kept: $R/etc/anonpipe (configuration),"
  echo "   $R$state (runs, state, anon.key, identity.db) and the user anonpipe"
  exit 0
fi

# -- build tools ---------------------------------------------------------------------------------
python=${PYTHON:-/usr/bin/python3}
missing=()
"$python" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -e "$include/Python.h" ] || missing+=(python3-dev)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists libsystemd 2>/dev/null || missing+=(libsystemd-dev)
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "$0: missing ${missing[*]}; install them as root" >&2
    exit 1
  fi
  echo "== installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "$0: $python is older than Python 3.11" >&2
  exit 1
}

# -- the program ---------------------------------------------------------------------------------
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Built from a copy, so that the checkout gets no build/ or egg-info of its own.
mkdir "$work/src"
cp "$src/pyproject.toml" "$src/README.md" "$work/src/"
(cd "$src" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' anonpipe) | tar -xf - -C "$work/src"

version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }
if [ "$(version "$R$venv/bin/python")" != "$(version "$python")" ]; then
  # Absent, or made by another Python (a Debian upgrade): it holds only the program, rebuild it.
  rm -rf "$R/opt/anonpipe" # $venv; R is empty on the real root
  echo "== creating $R$venv"
  "$python" -m venv "$R$venv"
fi
echo "== installing anonpipe from $src into $R$venv"
if ! "$R$venv/bin/python" -m pip install --disable-pip-version-check --no-warn-script-location \
  "$work/src" >"$work/pip.log" 2>&1; then
  cat "$work/pip.log" >&2
  exit 1
fi
installed=$("$R$venv/bin/anonpipe" --version)

mkdir -p "$R/usr/bin" # not install -d: that would chmod an existing folder
for cmd in "${commands[@]}"; do
  link=$R/usr/bin/$cmd
  if { [ -e "$link" ] || [ -L "$link" ]; } && [ "$(readlink "$link")" != "$venv/bin/$cmd" ]; then
    echo "$0: $link exists and is not this install's; move it away first" >&2
    exit 1
  fi
  ln -sfn "$venv/bin/$cmd" "$link"
done
install -D -m 0644 "$src/systemd/anonpipe.service" "$R$unit"
install -D -m 0644 "$src/README.md" "$R$doc/README.md"
install -D -m 0644 "$src/etc/anonpipe.toml" "$R$doc/anonpipe.toml"
install -D -m 0644 "$src/hooks/example_hook.py" "$R$doc/examples/example_hook.py"

# -- user, configuration, state ------------------------------------------------------------------
if $real; then
  getent group anonpipe >/dev/null || groupadd --system anonpipe
  getent passwd anonpipe >/dev/null || useradd --system --gid anonpipe --home-dir "$state" \
    --no-create-home --shell /usr/sbin/nologin --comment "anonpipe DICOM de-identification" anonpipe
else
  echo "== staging root: user and group anonpipe not created"
fi
owned() { # owned MODE PATH: the mode, and group anonpipe on a real system (the service reads it)
  if $real; then chgrp anonpipe "$2"; fi
  chmod "$1" "$2"
}
if [ ! -d "$R/etc/anonpipe" ]; then
  install -d "$R/etc/anonpipe"
  owned 0750 "$R/etc/anonpipe"
fi
if [ -e "$R$config" ] || [ -L "$R$config" ]; then
  echo "== kept $R$config"
else
  install -m 0640 "$src/etc/anonpipe.toml" "$R$config"
  owned 0640 "$R$config"
  echo "== installed $R$config from the sample: edit it, then anonpipe check-config"
fi
if [ ! -d "$R$state" ]; then
  install -d -m 0700 "$R$state"
  if $real; then chown anonpipe:anonpipe "$R$state"; fi
fi

# -- what the configuration needs writable -------------------------------------------------------
if paths=$("$R$venv/bin/python" -m anonpipe.tools.unitpaths --root "$root" "$config"); then
  if [ -n "$paths" ]; then
    mkdir -p "$R$dropin_dir"
    printf '%s\n' "$paths" >"$R$dropin.new"
    chmod 0644 "$R$dropin.new"
    mv -f "$R$dropin.new" "$R$dropin"
    echo "== $R$dropin: $(grep -c '^ReadWritePaths=' "$R$dropin") folder(s) outside $state writable"
  elif [ -e "$R$dropin" ]; then
    rm -f "$R$dropin"
    rmdir --ignore-fail-on-non-empty "$R$dropin_dir"
  fi
else
  echo "$0: warning: $R$config is not valid TOML; $R$dropin not refreshed (run again once fixed)" >&2
fi
if [ -e "$R/etc/systemd/system/anonpipe.service" ]; then
  echo "$0: warning: $R/etc/systemd/system/anonpipe.service overrides the unit installed in" \
    "$R$unit; remove it unless you keep it on purpose (changes belong in a drop-in)" >&2
fi

if $real && command -v systemd-analyze >/dev/null 2>&1; then
  # A missing binary or a key this systemd does not know would show here (warnings included).
  if report=$(systemd-analyze verify anonpipe.service 2>&1) && [ -z "$report" ]; then
    echo "== systemd-analyze verify anonpipe.service: ok"
  else
    echo "$0: warning: systemd-analyze verify anonpipe.service:" >&2
    echo "$report" >&2
  fi
fi
if $systemd_running; then
  systemctl daemon-reload
  systemctl try-restart anonpipe.service # an upgrade: a running service resumes its run
fi
echo "== $installed installed in ${root}"
if $real && ! $systemd_running; then
  echo "   systemd is not running here: start the service where it is"
elif $real; then
  echo "   next: edit $config, anonpipe check-config, systemctl enable --now anonpipe"
fi
