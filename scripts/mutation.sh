#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut: each module is mutated, one change at a time,
# in a copy of the tree (build/mutation/MODULE/), and its fast unit tests run against every
# mutant; the ones no test notices ("survived") are printed. docs/testing.md has the last summary
# and what every survivor means.
#
#   scripts/mutation.sh                      # every core module (about 25 minutes on 2 cores)
#   scripts/mutation.sh sampler block_hash   # some of them
#   scripts/mutation.sh --diff scheduler     # also print each survivor's diff
#   MUTATION_JOBS=1 scripts/mutation.sh ...  # mutants run in parallel (default: one per core)
#
# Not part of CI: too slow for it. Needs ./scripts/setup.sh first; installs mutmut into the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/${OMNIBUS_VENV:-.venv}
MUTMUT_VERSION=3.8.1
JOBS=${MUTATION_JOBS:-$(nproc)}
ALL="block_hash block_manager request_queue fair_share length_forecast sampler logits_processing input_batch reference int8_kv cpu_block_linear scheduler detokenizer parallel_config worker_group"

source_of() {
    case $1 in
        block_hash | block_manager | request_queue | fair_share | length_forecast | scheduler | detokenizer | worker_group)
            echo "scheduler_svc/$1.py" ;;
        sampler | logits_processing | input_batch | parallel_config | cpu_block_linear) echo "worker_svc/$1.py" ;;
        reference | int8_kv) echo "kernels/$1.py" ;;
        *) echo "unknown module $1 (one of: $ALL)" >&2; return 1 ;;
    esac
}

tests_of() {  # the fast unit tests that cover a module (never the model-loading ones)
    case $1 in
        block_hash) echo tests/test_prefix_cache.py tests/test_block_manager.py ;;
        block_manager) echo tests/test_block_manager.py tests/test_prefix_cache.py tests/test_scheduler.py tests/test_swap.py ;;
        request_queue) echo tests/test_request_queue.py tests/test_priority.py tests/test_sla_scheduling.py tests/test_scheduler.py ;;
        fair_share) echo tests/test_sla_scheduling.py tests/test_sla_tenant_api.py ;;
        length_forecast) echo tests/test_sla_lifetime.py ;;
        scheduler) echo tests/test_scheduler.py tests/test_scheduler_static.py tests/test_prefix_cache.py tests/test_swap.py \
            tests/test_priority.py tests/test_sla_scheduling.py tests/test_sla_prefix_preemption.py tests/test_sla_random.py \
            tests/test_sla_lifetime.py tests/test_worker_resume.py ;;
        detokenizer) echo tests/test_detokenizer.py ;;
        sampler) echo tests/test_sampler.py tests/test_sampling_controls.py ;;
        logits_processing) echo tests/test_sampling_controls.py tests/test_sampler.py ;;
        input_batch) echo tests/test_input_batch.py ;;
        parallel_config) echo tests/test_parallel_config.py ;;
        worker_group) echo tests/test_worker_group.py tests/test_tensor_parallel_group.py tests/test_worker_resume.py ;;
        reference) echo tests/test_reference_kernels.py tests/test_reference_kernel_edges.py ;;
        int8_kv) echo tests/test_int8_kv_cache.py ;;
        cpu_block_linear) echo tests/test_cpu_block_linear.py ;;
    esac
}

toml_list() {  # toml_list a b c -> ["a", "b", "c"]
    local out="" item
    for item in "$@"; do out+="${out:+, }\"$item\""; done
    echo "[$out]"
}

run_module() {
    local module=$1 source stage start
    source=$(source_of "$module")
    stage=$ROOT/build/mutation/$module
    rm -rf "$stage"
    mkdir -p "$stage"
    # A copy, so mutants never touch the working tree and edits made meanwhile do not leak in.
    tar -C "$ROOT" --exclude=__pycache__ -cf - scheduler_svc worker_svc kernels protos tests benchmarks clients pyproject.toml \
        | tar -C "$stage" -xf -
    # shellcheck disable=SC2046
    cat >>"$stage/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["scheduler_svc", "worker_svc", "kernels"]
also_copy = ["protos", "benchmarks", "clients"]  # tests import the null worker and the CLI
only_mutate = ["$source"]
pytest_add_cli_args_test_selection = $(toml_list $(tests_of "$module"))
pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not model and not gpu"]
use_git_change_detection = false
EOF
    start=$(date +%s)
    # One torch thread: mutmut forks each mutant's run from a process that has imported torch, and a
    # child of a process whose OpenMP pool is running can deadlock in its first parallel op.
    (cd "$stage" && OMP_NUM_THREADS=1 nice -n 19 "$VENV/bin/mutmut" run --max-children "$JOBS" >run.log 2>&1) || {
        echo "$module: mutmut failed; see $stage/run.log" >&2
        tail -n 20 "$stage/run.log" >&2
        return 1
    }
    (cd "$stage" && "$VENV/bin/mutmut" export-cicd-stats >/dev/null && "$VENV/bin/mutmut" results >survivors.txt)
    "$VENV/bin/python" - "$module" "$source" "$(($(date +%s) - start))" "$stage/mutants/mutmut-cicd-stats.json" <<'EOF'
import json, sys
module, source, seconds, path = sys.argv[1:]
s = json.load(open(path))
others = {k: s[k] for k in ("no_tests", "timeout", "suspicious", "segfault", "skipped") if s[k]}
extra = "".join(f", {v} {k.replace('_', ' ')}" for k, v in others.items())
print(f"{module} ({source}): {s['total']} mutants, {s['killed']} killed, {s['survived']} survived{extra} in {seconds} s")
EOF
    while read -r name status; do
        echo "  ${status} ${name%:}"
        if [ "$SHOW_DIFF" = 1 ]; then
            (cd "$stage" && "$VENV/bin/mutmut" show "${name%:}" | tail -n +2 | sed 's/^/      /')
        fi
    done <"$stage/survivors.txt"
}

SHOW_DIFF=0
if [ "${1:-}" = "--diff" ]; then
    SHOW_DIFF=1
    shift
fi
modules=${*:-$ALL}
for module in $modules; do source_of "$module" >/dev/null; done
if ! "$VENV/bin/python" -c "import mutmut" 2>/dev/null; then
    nice -n 19 "$VENV/bin/python" -m pip install -q "mutmut==$MUTMUT_VERSION"
fi
for module in $modules; do
    run_module "$module"
done
