#!/usr/bin/env bash
# The one-command demo (README "Demo"): sets up a fresh Debian machine like scripts/test.sh
# (scripts/setup.sh), then runs scripts/demo.py: two local Orthanc PACS, generated studies, a
# review database, the daemon through one full run, its results, and everything stopped again.
# Arguments go to scripts/demo.py: --keep (keep the demo folder), --studies N.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
