#!/usr/bin/env bash
# The project's test command (README "Testing"): installs whatever is missing on a fresh Debian
# machine (scripts/setup.sh: apt packages as root or through sudo, a virtual environment with the
# package and its test extra), then runs ruff, mypy and the whole test suite against real Orthanc
# and DCMTK.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k harness`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest -q "$@"
