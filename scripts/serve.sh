#!/usr/bin/env bash
# Sets everything up, then serves the default model on 127.0.0.1:50051 (CPU when there is no GPU).
# Extra arguments go to `omnibus serve`, e.g. ./scripts/serve.sh --port 50052 --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec "${OMNIBUS_VENV:-.venv}/bin/omnibus" serve "$@"
