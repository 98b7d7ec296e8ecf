"""benchmarks/tensor_parallel_step.py end to end on a tiny random-weights model: gloo ranks at world
sizes 1 and 2, and 3, which the model's heads do not divide (reported, not run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=128,
            intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64,  # a head_dim the CPU attention kernels are tested at
            max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
BATCH = 1
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("tp_bench")
    model_dir = tmp / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY))
    out = tmp / "step.json"
    command = [sys.executable, "-m", "benchmarks.tensor_parallel_step", "--model", str(model_dir),
               "--load-format", "random", "--world-sizes", "1", "2", "3", "--batches", str(BATCH),
               "--repeats", "2", "--context", "40", "--micro-repeats", "10", "--result-json", str(out)]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| TP | threads/rank |" in run.stdout
    return json.loads(out.read_text())


def rows_by_world_size(result: dict) -> dict[int, dict]:
    rows = result["rows"]
    assert [(r["world_size"], r["batch"]) for r in rows] == [(1, BATCH), (2, BATCH), (3, BATCH)]
    return {r["world_size"]: r for r in rows}


def test_one_rank_does_no_all_reduce(result):
    single = rows_by_world_size(result)[1]
    fastest, slowest = single["step_ms_range"]
    assert 0 < fastest <= single["step_ms"] <= slowest
    assert single["all_reduces_per_step"] == 0 and single["all_reduce_bytes_per_step"] == 0
    assert single["all_reduce_ms"] == 0
    assert single["speedup_vs_tp1"] == 1.0


def test_two_ranks_reduce_twice_per_layer(result):
    rows = rows_by_world_size(result)
    pair = rows[2]
    layers, hidden = TINY["num_hidden_layers"], TINY["hidden_size"]
    assert pair["skipped"] is None
    assert pair["all_reduces_per_step"] == 2 * layers
    assert pair["all_reduce_bytes_per_step"] == 2 * layers * BATCH * hidden * 4  # float32 [batch, hidden]
    assert 0 < pair["all_reduce_ms"] < pair["step_ms"]
    assert pair["all_reduce_share"] == pytest.approx(pair["all_reduce_ms"] / pair["step_ms"])
    assert pair["in_step_all_reduce_us"] == pytest.approx(pair["all_reduce_ms"] * 1e3 / (2 * layers))
    assert pair["standalone_all_reduce_us"] > 0
    assert pair["speedup_vs_tp1"] == pytest.approx(rows[1]["step_ms"] / pair["step_ms"])


def test_a_world_size_the_heads_do_not_divide_is_reported_not_run(result):
    triple = rows_by_world_size(result)[3]
    assert "num_key_value_heads=2" in triple["skipped"]
    assert triple["step_ms"] is None and triple["step_ms_range"] is None and triple["speedup_vs_tp1"] is None
    assert triple["standalone_all_reduce_us"] > 0  # the collective alone still runs


def test_threads_are_split_over_the_ranks_and_the_run_is_described(result):
    cores = len(os.sched_getaffinity(0))
    assert result["machine"]["cores"] == cores
    assert {r["world_size"]: r["threads_per_rank"] for r in result["rows"]} == {
        n: max(1, cores // n) for n in (1, 2, 3)}
    assert result["config"]["load_format"] == "random" and result["config"]["context"] == 40
    assert set(result["git"]) == {"revision", "dirty"} and result["date"]
