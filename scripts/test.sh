#!/usr/bin/env bash
# Sets everything up, then runs the test suite. Extra arguments go to pytest, e.g. -m "not model".
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec "${OMNIBUS_VENV:-.venv}/bin/python" -m pytest "$@"
