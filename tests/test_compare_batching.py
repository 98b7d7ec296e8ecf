"""The side-by-side driver: medians over repeats, the throughput ratios, and the server command it starts."""

import argparse
import json

from benchmarks import compare_batching
from benchmarks.compare_batching import HEADLINE, medians, served, summarize


def write_run(path, throughput, ttft_median):
    metrics = {"output_throughput": throughput, "request_throughput": throughput / 100}
    for name in ("ttft_ms", "tpot_ms", "e2el_ms"):
        metrics[name] = {"median": ttft_median, "p99": ttft_median * 2}
    path.write_text(json.dumps({"metrics": metrics}))
    return path


def test_medians_and_ratios(tmp_path):
    continuous = [write_run(tmp_path / f"c{i}.json", t, 100 + i) for i, t in enumerate([40.0, 50.0, 45.0])]
    static = [write_run(tmp_path / f"s{i}.json", t, 300) for i, t in enumerate([30.0, 10.0, 20.0])]
    summary = {"continuous": medians(continuous), "static": medians(static)}
    assert summary["continuous"]["output tok/s"] == 45.0
    assert summary["continuous"]["TTFT median ms"] == 101
    assert summary["static"]["output tok/s"] == 20.0
    assert set(summary["static"]) == {column for column, _ in HEADLINE}
    table = summarize(summary)
    assert "continuous / static output throughput: 2.25x" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3  # header + one row per system


class FakeServer:
    def send_signal(self, signal):
        pass

    def wait(self, timeout):
        return 0


def served_command(monkeypatch, *args, **kwargs) -> list[str]:
    """The command line `served` would start (nothing is started)."""
    commands = []

    def popen(command):
        commands.append(command)
        return FakeServer()

    monkeypatch.setattr(compare_batching.subprocess, "Popen", popen)
    monkeypatch.setattr(compare_batching, "wait_serving", lambda target, timeout_s: None)
    namespace = argparse.Namespace(port=5, batch_size=8, num_kv_blocks=64, device="cpu", model=None)
    with served(namespace, *args, **kwargs) as target:
        assert target == "127.0.0.1:5"
    return commands[0]


def test_served_command_without_and_with_extra_flags(monkeypatch):
    plain = served_command(monkeypatch, "static")
    assert plain[plain.index("serve"):] == ["serve", "--port", "5", "--scheduling", "static", "--max-num-seqs", "8",
                                            "--num-kv-blocks", "64", "--metrics-port", "0", "--device", "cpu"]
    extra = served_command(monkeypatch, "continuous", ["--no-prefix-caching"], metrics_port=9000)
    assert extra[extra.index("--metrics-port") + 1] == "9000" and extra[-1] == "--no-prefix-caching"
