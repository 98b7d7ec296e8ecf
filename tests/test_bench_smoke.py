"""`omnibus bench` end to end: a short run against a live server on the real default model."""

from __future__ import annotations

import argparse
import json

import pytest

from clients.bench.cli import add_bench_arguments, run_bench
from clients.bench.workloads import load_workload
from tests.server_harness import ServerThread

pytestmark = pytest.mark.model

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
STATS = ("mean", "median", "std", "p90", "p99")


@pytest.fixture(scope="module")
def server(model_dir):
    server = ServerThread(model_dir, num_kv_blocks=256).start()
    yield server
    server.stop()


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_short_run_against_a_live_server(server, tmp_path, capsys):
    result_path, workload_path = tmp_path / "result.json", tmp_path / "workload.json"
    args = bench_args("--target", server.target, "--num-requests", "6", "--input-len", "8:32", "--output-len", "4:8",
                      "--request-rate", "20", "--max-concurrency", "4", "--seed", "5", "--no-progress",
                      "--result-json", str(result_path), "--save-workload", str(workload_path))
    assert run_bench(args) == 0
    assert "Successful requests" in capsys.readouterr().out

    result = json.loads(result_path.read_text())
    metrics = result["metrics"]
    assert (metrics["completed"], metrics["failed"]) == (6, 0)
    requested = sum(r.max_tokens for r in load_workload(workload_path))
    assert metrics["total_output_tokens"] == requested
    for name in ("request_throughput", "output_throughput", "total_token_throughput", "duration_s"):
        assert metrics[name] > 0
    for name in METRICS:
        assert set(metrics[name]) == set(STATS)
        assert metrics[name]["mean"] > 0
    assert len(result["requests"]) == 6
    assert result["config"]["request_rate"] == 20.0 and result["config"]["seed"] == 5
    assert result["machine"]["server"]["vocab_size"] > 1000
    assert "revision" in result["git"]
    _check_plots(result_path, tmp_path / "plots")


def _check_plots(result_path, out):
    pytest.importorskip("matplotlib")
    from clients.bench import plots

    assert plots.main([str(result_path), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"throughput_vs_rate.png", "latency_cdf.png"}


def test_replaying_a_saved_workload(server, tmp_path):
    workload_path, result_path = tmp_path / "w.json", tmp_path / "r.json"
    workload_path.write_text(json.dumps([{"prompt_token_ids": [1500 + i for i in range(12)], "max_tokens": 3}] * 2))
    args = bench_args("--target", server.target, "--workload-file", str(workload_path), "--num-warmups", "0",
                      "--no-progress", "--result-json", str(result_path))
    assert run_bench(args) == 0
    metrics = json.loads(result_path.read_text())["metrics"]
    assert (metrics["completed"], metrics["total_output_tokens"]) == (2, 6)
