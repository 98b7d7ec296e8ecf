"""The benchmark scripts run end to end at tiny sizes and report what they promise (no timings
are asserted: the numbers only have to exist and be positive)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.null_worker import NULL_TOKEN_ID, NullRunner
from scheduler_svc.protocol import CachedRequest, NewRequest, SamplingOptions, StepPlan

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD_KEYS = {
    "num_seqs", "steps_per_s", "scheduler_cpu_us", "schedule_cpu_us", "update_cpu_us",
    "execute_cpu_us", "execute_wall_us", "step_wall_us", "plan_bytes", "plan_encode_us",
    "plan_decode_us", "result_encode_us", "result_decode_us",
}


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *args]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_null_worker_samples_only_when_a_request_reaches_its_last_token():
    runner = NullRunner()
    options = SamplingOptions()
    plan = StepPlan(0, [NewRequest("a", [1, 2, 3, 4, 5], [0, 1], 0, 3, options),
                        NewRequest("b", [1, 2], [2], 0, 2, options)], [], [])
    result = runner.execute(plan)
    assert (result.step_id, result.req_ids, result.token_ids) == (0, ["b"], [NULL_TOKEN_ID])
    plan = StepPlan(1, [], [CachedRequest("a", [], 3, 2), CachedRequest("b", [], 2, 1)], [])
    assert runner.execute(plan).req_ids == ["a", "b"]
    runner.execute(StepPlan(2, [], [CachedRequest("a", [], 5, 1)], ["b"]))
    assert set(runner.requests) == {"a"}


def check_overhead_report(path: Path, sizes: list[int], detokenize: bool) -> dict:
    report = json.loads(path.read_text())
    assert {"git", "machine", "date", "config"} <= report.keys()
    assert report["empty_plan_rtt_us"] > 0
    assert [row["num_seqs"] for row in report["sizes"]] == sizes
    for row in report["sizes"]:
        assert OVERHEAD_KEYS <= row.keys()
        assert all(row[key] > 0 for key in OVERHEAD_KEYS), row
        assert (row["detokenize_cpu_us"] is not None) == detokenize
    return report


def test_scheduler_overhead_at_a_tiny_size(tmp_path):
    out = tmp_path / "overhead.json"
    run = run_module("benchmarks.scheduler_overhead", "--sizes", "16", "--steps", "20",
                     "--warmup", "2", "--repeats", "2", "--rtt-iters", "20",
                     "--result-json", str(out))
    assert "steps/s" in run.stdout and "empty-plan round trip" in run.stdout
    check_overhead_report(out, [16], detokenize=False)


@pytest.mark.model
def test_scheduler_overhead_with_detokenization(tmp_path, model_dir):
    out = tmp_path / "overhead.json"
    run_module("benchmarks.scheduler_overhead", "--sizes", "4", "16", "--steps", "10",
               "--warmup", "1", "--repeats", "1", "--rtt-iters", "10",
               "--tokenizer-dir", str(model_dir), "--result-json", str(out))
    check_overhead_report(out, [4, 16], detokenize=True)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random two-layer Llama checkpoint (no tokenizer: the baseline needs none)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_hf_baseline_gives_every_request_its_max_tokens(tmp_path, tiny_llama_dir):
    workload = [
        {"prompt_token_ids": [3, 4, 5, 6], "max_tokens": 5},
        {"prompt_token_ids": [7, 8], "max_tokens": 9, "arrival_time": 0.0},
        {"prompt_token_ids": [9, 10, 11, 12, 13, 14], "max_tokens": 3},
    ]
    workload_file, out = tmp_path / "workload.json", tmp_path / "hf.json"
    workload_file.write_text(json.dumps(workload))
    run = run_module("benchmarks.hf_baseline", "--workload-file", str(workload_file),
                     "--batch-size", "2", "--model", str(tiny_llama_dir), "--device", "cpu",
                     "--num-threads", "1", "--result-json", str(out))
    assert "HF transformers" in run.stdout
    report = json.loads(out.read_text())
    assert {"git", "machine", "date", "config", "padding"} <= report.keys()
    assert [len(tokens) for tokens in report["outputs"]] == [5, 9, 3]
    records = report["requests"]
    assert [r["output_tokens"] for r in records] == [5, 9, 3]
    assert [len(r["chunk_times"]) for r in records] == [5, 9, 3]
    assert records[0]["end_time"] == records[1]["end_time"] < records[2]["end_time"]
    metrics = report["metrics"]
    assert (metrics["completed"], metrics["failed"], metrics["total_output_tokens"]) == (3, 0, 17)
    assert report["padding"] == {"generated_tokens": 2 * 9 + 3, "requested_tokens": 17,
                                 "wasted_fraction": 1 - 17 / 21}
    for key in ("duration_s", "output_throughput", "request_throughput"):
        assert metrics[key] > 0
    for key in ("ttft_ms", "tpot_ms", "e2el_ms"):
        assert 0 < metrics[key]["median"] <= metrics[key]["p99"]


def test_hf_baseline_padded_batch_matches_each_request_alone(tiny_llama_dir, one_torch_thread):
    """Left padding and the attention mask leave a greedy output as if the request ran alone."""
    from benchmarks.hf_baseline import generate_batch, load_hf_model
    from clients.bench.workloads import BenchRequest

    device = torch.device("cpu")
    model = load_hf_model(tiny_llama_dir, device, torch.float32, None)
    batch = [BenchRequest([3, 4, 5, 6], 5), BenchRequest([7, 8], 9),
             BenchRequest([9, 10, 11, 12, 13, 14], 3)]
    together = generate_batch(model, batch, device).outputs
    alone = [generate_batch(model, [request], device).outputs[0] for request in batch]
    assert together == alone
    assert [len(tokens) for tokens in together] == [5, 9, 3]
