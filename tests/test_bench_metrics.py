"""Benchmark metrics from synthetic timestamps, checked against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clients.bench.metrics import RequestRecord, compute_metrics, itls, summarize, tpot, ttft
from clients.bench.report import build_result, format_table, read_records, write_result


def record(index, send, chunks, end, prompt_len=10, error=None):
    """chunks: [(arrival time, tokens in the chunk), ...]."""
    return RequestRecord(
        index=index, prompt_len=prompt_len, max_tokens=sum(n for _, n in chunks), send_time=send,
        chunk_times=[t for t, _ in chunks], chunk_tokens=[n for _, n in chunks], end_time=end,
        output_tokens=sum(n for _, n in chunks), error=error,
    )


def test_per_request_definitions():
    # Sent at 1.0, first token at 1.5, then three more one at a time, 0.1 s apart; stream ends at 1.85.
    r = record(0, 1.0, [(1.5, 1), (1.6, 1), (1.7, 1), (1.8, 1)], 1.85)
    assert ttft(r) == pytest.approx(0.5)
    assert itls(r) == pytest.approx([0.1, 0.1, 0.1])
    assert tpot(r) == pytest.approx((0.85 - 0.5) / 3)


def test_multi_token_chunks_are_one_itl_gap_but_count_every_token_in_tpot():
    r = record(0, 0.0, [(0.2, 1), (0.5, 3)], 0.5)
    assert itls(r) == pytest.approx([0.3])
    assert tpot(r) == pytest.approx(0.3 / 3)


def test_aggregate_metrics():
    records = [
        record(0, 0.0, [(0.1, 1), (0.2, 1), (0.3, 1)], 0.3, prompt_len=5),
        record(1, 0.5, [(0.8, 1), (1.0, 1)], 1.0, prompt_len=7),
        record(2, 1.0, [(1.2, 1)], 2.0, prompt_len=9),  # one token: no TPOT
    ]
    m = compute_metrics(records)
    assert (m.completed, m.failed) == (3, 0)
    assert m.duration_s == pytest.approx(2.0)  # first send (0.0) to last completion (2.0)
    assert (m.total_input_tokens, m.total_output_tokens) == (21, 6)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.0)
    assert m.total_token_throughput == pytest.approx(13.5)
    ttfts = np.array([0.1, 0.3, 0.2]) * 1000
    assert m.ttft_ms.mean == pytest.approx(200)
    assert m.ttft_ms.median == pytest.approx(200)
    assert m.ttft_ms.p90 == pytest.approx(np.percentile(ttfts, 90))  # 280 by linear interpolation
    assert m.ttft_ms.p90 == pytest.approx(280)
    assert m.ttft_ms.p99 == pytest.approx(298)
    tpots = [(0.3 - 0.1) / 2 * 1000, (0.5 - 0.3) / 1 * 1000]
    assert m.tpot_ms.mean == pytest.approx(np.mean(tpots))
    assert m.itl_ms.mean == pytest.approx(np.mean([100, 100, 200]))
    assert m.e2el_ms.median == pytest.approx(500)
    assert m.e2el_ms.p99 == pytest.approx(np.percentile([300, 500, 1000], 99))


def test_failed_requests_are_counted_and_excluded():
    records = [
        record(0, 0.0, [(0.1, 1), (0.2, 1)], 0.2),
        RequestRecord(1, prompt_len=50, max_tokens=8, send_time=0.0, end_time=None, error="RESOURCE_EXHAUSTED: queue full"),
        RequestRecord(2, prompt_len=50, max_tokens=8, send_time=0.1, chunk_times=[0.3], chunk_tokens=[1],
                      output_tokens=1, error="UNAVAILABLE: worker died"),  # failed mid-stream
    ]
    m = compute_metrics(records)
    assert (m.completed, m.failed) == (1, 2)
    assert (m.total_input_tokens, m.total_output_tokens) == (10, 2)
    assert m.ttft_ms.mean == pytest.approx(100)


def test_one_token_outputs_are_excluded_from_tpot():
    m = compute_metrics([record(0, 0.0, [(0.4, 1)], 0.4), record(1, 0.0, [(0.1, 1), (0.3, 1)], 0.3)])
    assert m.tpot_ms.mean == pytest.approx(200)
    assert m.tpot_ms.p99 == pytest.approx(200)


def test_zero_completed_gives_zeros_like_vllm():
    m = compute_metrics([RequestRecord(0, 10, 4, send_time=0.0, error="UNAVAILABLE: down")])
    assert (m.completed, m.failed) == (0, 1)
    assert m.request_throughput == m.output_throughput == 0
    assert m.ttft_ms.mean == m.tpot_ms.p99 == m.itl_ms.median == m.e2el_ms.mean == 0
    assert compute_metrics([]).completed == 0


def test_summarize_uses_numpy_percentiles_in_ms():
    values = list(np.linspace(0.001, 0.1, 100))
    d = summarize(values)
    assert d.median == pytest.approx(np.median(values) * 1000)
    assert d.p99 == pytest.approx(np.percentile(values, 99) * 1000)


def test_result_json_round_trips_and_is_strict(tmp_path):
    records = [record(0, 0.0, [(0.1, 1), (0.2, 2)], 0.25)]
    m = compute_metrics(records)
    config = {"request_rate": float("inf"), "run": print, "input_len": (8, 32)}
    path = tmp_path / "r.json"
    write_result(path, build_result(config, None, m, records))
    result = json.loads(path.read_text())
    assert result["config"] == {"request_rate": "inf", "input_len": [8, 32]}
    assert set(result) >= {"date", "config", "git", "machine", "metrics", "requests"}
    assert read_records(result) == records
    assert "Successful requests" in format_table(m)
