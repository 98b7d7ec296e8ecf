"""The side-by-side driver's summary: medians over repeats and the throughput ratios."""

import json

from benchmarks.compare_batching import HEADLINE, medians, summarize


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
