#!/usr/bin/env bash
# The GPU proof in one command, run on a lent GPU machine from the repository root:
#   1. kernels      every kernel configuration compiled through CuPy, then the kernel tests
#                   (tests/test_cuda_kernels.py and friends); the first failure printed whole
#   2. equivalence  `omnibus serve --device cuda`: greedy outputs vs transformers on the GPU with
#                   our CUDA attention, then the torch reference in bf16 and fp32 (locates a failure)
#   3. bench        the kernel benchmark's short sweep, largest points first: us, GB/s, % of the
#                   copy bandwidth measured in the same run, ratio to SDPA
#   4. serving      if time is left: Llama-3-8B shapes, random bf16 weights, a ShareGPT-like
#                   workload all at once and at one rate, continuous vs --scheduling static vs
#                   transformers generate (padded static batches, same weights)
# Every step is time-boxed within --budget seconds (default 480); the steps run in this order and
# a step's unused time goes to the next. Results go to $OUT (8 files at most come back from a
# device call): summary.json, one log per step, attention.json and results.tar.gz (everything else).
#
#   bash scripts/gpu_proof.sh [--budget S] [--steps kernels,equivalence,bench,serving] [--rehearse]
#
# Carried (device/README.md): wheels of the packages the GPU image lacks in .whl/wheels, and the
# default model's GGUF in two halves, .whl/model-a and .whl/model-b (94 MiB: one call carries at
# most 64 MiB with the tree, so two consecutive calls carry one half each; a warm machine keeps
# the first, see kernels/README.md). Without both halves the equivalence step serves a small
# random-weights stand-in instead, and says so. --rehearse runs on a CPU machine whatever can run
# there (the CPU kernel tests; equivalence and serving on tiny random models with --device cpu and
# torch attention; the benchmark's plan), to check the script, its arguments and its JSON.
set -uo pipefail
exec < /dev/null  # nothing here reads input; a child that tried would stop a background job
cd "$(dirname "$0")/.."
REPO=$PWD

BUDGET=480
STEPS=kernels,equivalence,bench,serving
REHEARSE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --rehearse) REHEARSE=1; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "gpu_proof: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_proof: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
for step in ${STEPS//,/ }; do
  case "$step" in kernels|equivalence|bench|serving) ;; *) echo "gpu_proof: unknown step '$step'" >&2; exit 2 ;; esac
done

PY=${PYTHON:-python3}
START=$(date +%s)
WORK=${GPU_PROOF_WORK:-/tmp/omnibus-proof}
OUT=${OUT:-/tmp/omnibus-proof-out}
STAGING=${GPU_PROOF_STAGING:-/var/tmp/omnibus-model}  # outlives a call on a warm machine
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
rm -f "$OUT"/[0-4]-*.log "$OUT/summary.json" "$OUT/attention.json" "$OUT/results.tar.gz"  # this script's own files
export OMNIBUS_CACHE_DIR=${OMNIBUS_CACHE_DIR:-/var/tmp/omnibus-cache}
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
wants() { [[ ",$STEPS," == *",$1,"* ]]; }

# record STEP STATUS RC SECONDS NOTE: one JSON line per step for the summary.
FAILED=0
record() {
  case "$2" in passed|skipped) ;; *) FAILED=1 ;; esac
  printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "${5//\"/\'}" >> "$WORK/steps.jsonl"
  echo "== $1: $2 (rc $3, $4 s) $5"
}

# run_step NAME MAX_SECONDS LOG COMMAND...: the command under `timeout`, within what is left.
run_step() {
  local name=$1 cap=$2 log=$3; shift 3
  local box; box=$(left)
  [ "$box" -gt "$cap" ] && box=$cap
  if [ "$box" -lt 20 ]; then record "$name" skipped 0 0 "budget spent"; return 1; fi
  echo "== $name: up to ${box}s" | tee -a "$log"
  local began; began=$(date +%s)
  timeout --kill-after=15 "$box" "$@" >> "$log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - began ))
  local status=passed
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timed-out; elif [ $rc -ne 0 ]; then status=failed; fi
  record "$name" "$status" "$rc" "$secs" "log: $(basename "$log")"
  return $rc
}

finish() {
  "$PY" -m scripts.gpu_proof summary --work "$WORK" --out "$OUT/summary.json" || echo "gpu_proof: summary failed"
  [ -f "$WORK/attention.json" ] && cp "$WORK/attention.json" "$OUT/attention.json"
  tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude=./site --exclude='random-*' --exclude='stand-in' \
    --exclude='*.gguf*' . \
    2>/dev/null || echo "gpu_proof: packing results failed"
  echo "gpu_proof: $(elapsed)s of ${BUDGET}s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}
trap finish EXIT

# -- setup: carried wheels, environment, the default model -------------------------------------
if [ "$REHEARSE" -eq 1 ]; then
  # The wheels are cp312 for the GPU image: here, only check that the set is complete.
  "$PY" -m scripts.gpu_proof check-wheels | tee "$OUT/0-setup.log"
  export PYTHONPATH="$REPO:$REPO/protos"
elif [ -d .whl/wheels ] && ls .whl/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .whl/wheels/*.whl > "$OUT/0-setup.log" 2>&1 || { echo "gpu_proof: wheel install failed"; cat "$OUT/0-setup.log"; exit 1; }
  export PYTHONPATH="$WORK/site:$REPO:$REPO/protos"
else
  export PYTHONPATH="$REPO:$REPO/protos"
fi
"$PY" -m scripts.gpu_proof env --out "$WORK/env.json" || echo "gpu_proof: env report failed"
MODEL_ARGS=(--stand-in)
if [ "$REHEARSE" -eq 0 ]; then
  GGUF=$("$PY" -m scripts.gpu_proof assemble-model --parts-root .whl --staging "$STAGING" 2>/dev/null)
  if [ -n "$GGUF" ]; then MODEL_ARGS=(--model "$GGUF"); fi
fi
echo "gpu_proof: equivalence model: ${MODEL_ARGS[*]}"

DEVICE=cuda
if [ "$REHEARSE" -eq 1 ]; then DEVICE=cpu; fi

# -- 1. kernel tests ---------------------------------------------------------------------------
KERNEL_TESTS=(tests/test_cuda_kernels.py tests/test_launch_plan.py tests/test_nvcc_compile.py tests/test_kernel_emulation.py)
if wants kernels; then
  if [ "$REHEARSE" -eq 0 ]; then
    run_step precompile 120 "$OUT/1-kernels.log" "$PY" -m kernels.build_check --cupy --jobs "$(nproc)"
  fi
  run_step kernels 240 "$OUT/1-kernels.log" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    --junitxml="$WORK/kernels.xml" "${KERNEL_TESTS[@]}"
  "$PY" -m scripts.gpu_proof junit "$WORK/kernels.xml" | tee -a "$OUT/1-kernels.log" | head -c 6000
  echo
fi

# -- 2. served greedy equivalence vs transformers ----------------------------------------------
CUDA_EQUIVALENT=0
if wants equivalence; then
  VARIANTS=(cuda-bf16 torch-bf16 torch-fp32)
  EXTRA=()
  if [ "$REHEARSE" -eq 1 ]; then
    # A shared 2-core machine: fewer tokens, one torch thread, and patience with heartbeats.
    VARIANTS=(torch-fp32); MODEL_ARGS=(--stand-in --max-tokens 12)
    EXTRA=(--serve-args "--num-threads 1 --heartbeat-timeout 300")
  fi
  box=$(left); [ "$box" -gt 200 ] && box=200
  run_step equivalence 200 "$OUT/2-equivalence.log" "$PY" -m scripts.gpu_proof equivalence "${MODEL_ARGS[@]}" \
    --device "$DEVICE" --variants "${VARIANTS[@]}" --time-budget $(( box - 60 )) "${EXTRA[@]}" \
    --work "$WORK/equivalence" --out "$WORK/equivalence.json"
  "$PY" - "$WORK/equivalence.json" <<'EOF' 2>/dev/null && CUDA_EQUIVALENT=1
import json, sys
report = json.load(open(sys.argv[1]))
sys.exit(0 if report["variants"].get("cuda-bf16", {}).get("status") == "passed" else 1)
EOF
  tail -n 3 "$OUT/2-equivalence.log"
fi

# -- 3. kernel benchmark -------------------------------------------------------------------------
if wants bench; then
  if [ "$REHEARSE" -eq 1 ]; then
    run_step bench 60 "$OUT/3-bench.log" "$PY" -m kernels.bench --short --plan --out "$WORK/attention.json"
  else
    box=$(left); [ "$box" -gt 120 ] && box=120
    run_step bench 120 "$OUT/3-bench.log" "$PY" -m kernels.bench --short --runs 50 \
      --time-budget $(( box - 30 )) --out "$WORK/attention.json"
  fi
  tail -n 20 "$OUT/3-bench.log"
fi

# -- 4. 8B-shaped serving comparison (if time is left) ------------------------------------------
if wants serving; then
  if [ "$REHEARSE" -eq 1 ]; then
    SERVING=(--shape tiny --device cpu --dtype float32 --attention-backend torch --num-requests 6 --max-input 64
             --max-output 16 --batch-size 4 --rates inf 4 --num-kv-blocks 256
             --serve-args "--num-threads 1 --heartbeat-timeout 300")
  else
    BACKEND=torch; [ "$CUDA_EQUIVALENT" -eq 1 ] && BACKEND=cuda  # our kernels only once proven equivalent
    SERVING=(--attention-backend "$BACKEND")
  fi
  if [ "$(left)" -ge 200 ] || [ "$REHEARSE" -eq 1 ]; then
    run_step serving 100000 "$OUT/4-serving.log" "$PY" -m scripts.gpu_proof serving "${SERVING[@]}" \
      --work "$WORK" --out "$WORK/serving"
    tail -n 20 "$OUT/4-serving.log"
  else
    record serving skipped 0 0 "$(left)s left, 200s needed"
  fi
fi
exit $FAILED
