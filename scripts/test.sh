#!/usr/bin/env bash
# The project's test command (README "Testing"): installs whatever is missing on a fresh Debian
# machine (apt packages as root or through sudo, a virtual environment with the package and its
# test extra), then runs ruff, mypy and the whole test suite against real Orthanc and DCMTK.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k harness`.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
command -v storescp >/dev/null 2>&1 || missing+=(dcmtk)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists libsystemd 2>/dev/null || missing+=(libsystemd-dev)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "== installing ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$python" -m venv .venv
fi
echo "== installing anonpipe[test] into .venv"
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' >.venv/pip.log 2>&1; then
  cat .venv/pip.log
  exit 1
fi
.venv/bin/python -c "import anonpipe, pydicom, pynetdicom, structlog, aiosqlite, systemd.journal"

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest -q "$@"
