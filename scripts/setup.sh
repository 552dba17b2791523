#!/usr/bin/env bash
# Set-up shared by the README commands (scripts/test.sh, scripts/demo.sh): installs whatever is
# missing on a fresh Debian machine (apt packages: orthanc, dcmtk, dicom3tools for the validity
# checks, openssl for the TLS tests' certificates, postgresql for the review-DB tests' server, the
# linter shellcheck for scripts/install.sh, chromium for the web page's browser test, as root or
# through sudo; a virtual environment .venv with the package and its test extra).
# Idempotent: a second run installs nothing new.
# PYTHON selects the interpreter that creates .venv (default python3, >= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
command -v storescp >/dev/null 2>&1 || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists libsystemd 2>/dev/null || missing+=(libsystemd-dev)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # the DICOM TLS tests' certificates
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)  # lints scripts/install.sh
# The web status page's browser test drives Debian's chromium with Playwright (no download).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# The review-DB tests start their own PostgreSQL server (Debian keeps initdb off PATH).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
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
.venv/bin/python -c "import anonpipe, pydicom, pynetdicom, structlog, aiosqlite, psycopg, django, systemd.journal"
