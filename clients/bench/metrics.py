"""Serving metrics from per-request timestamps, defined as vLLM's benchmark_serving defines them.

All times are seconds on one monotonic clock; reported latencies are milliseconds. As in vLLM's
`calculate_metrics`, only successful requests enter the latency statistics and throughput counts
their tokens, and a statistic over no values is 0 (vLLM's `np.mean(xs or 0)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What the runner saw of one request. chunk_times/chunk_tokens: one entry per streamed
    message that carried tokens (the time it arrived, how many tokens it carried)."""

    index: int
    prompt_len: int
    max_tokens: int
    send_time: float
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    end_time: float | None = None
    output_tokens: int = 0
    error: str | None = None  # the gRPC status code name (and details) of a failed request
    cached_prompt_tokens: int = 0  # prompt tokens the server's prefix cache held (its final usage)

    @property
    def success(self) -> bool:
        return self.error is None and self.end_time is not None and bool(self.chunk_times)


@dataclass(slots=True)
class Distribution:
    """Summary of one latency metric in milliseconds."""

    mean: float
    median: float
    std: float
    p90: float
    p99: float


@dataclass(slots=True)
class BenchmarkMetrics:
    """The benchmark's result, field for field the quantities vLLM's benchmark_serving reports."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2el_ms: Distribution


def ttft(record: RequestRecord) -> float:
    """Time to first token: arrival of the first chunk with tokens minus the send time."""
    return record.chunk_times[0] - record.send_time


def latency(record: RequestRecord) -> float:
    """End-to-end latency: the end of the stream minus the send time."""
    return record.end_time - record.send_time


def tpot(record: RequestRecord) -> float | None:
    """Time per output token after the first: (latency - TTFT) / (output tokens - 1).

    None for a request with at most one output token, which vLLM leaves out of TPOT.
    """
    if record.output_tokens <= 1:
        return None
    return (latency(record) - ttft(record)) / (record.output_tokens - 1)


def itls(record: RequestRecord) -> list[float]:
    """Inter-token latencies: the gaps between consecutive chunks (a chunk of k tokens is one gap,
    as in vLLM, which times stream chunks rather than tokens)."""
    return np.diff(record.chunk_times).tolist()


def benchmark_duration(records: list[RequestRecord]) -> float:
    """Wall time of the benchmark: the first send to the last completion (of any request)."""
    if not records:
        return 0.0
    ends = [r.end_time if r.end_time is not None else r.send_time for r in records]
    return max(ends) - min(r.send_time for r in records)


def summarize(values_s: list[float]) -> Distribution:
    """Mean, median, std and percentiles (numpy's default linear interpolation) in milliseconds."""
    values_ms = np.asarray(values_s or [0.0]) * 1000.0
    p90, p99 = (float(np.percentile(values_ms, p)) for p in PERCENTILES)
    return Distribution(float(np.mean(values_ms)), float(np.median(values_ms)), float(np.std(values_ms)), p90, p99)


def compute_metrics(records: list[RequestRecord], duration_s: float | None = None) -> BenchmarkMetrics:
    """All metrics of a run; duration_s defaults to `benchmark_duration(records)`."""
    done = [r for r in records if r.success]
    duration_s = benchmark_duration(records) if duration_s is None else duration_s
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    tpots = [t for t in map(tpot, done) if t is not None]
    per_second = 1.0 / duration_s if duration_s > 0 else 0.0
    return BenchmarkMetrics(
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration_s,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(done) * per_second,
        output_throughput=total_output * per_second,
        total_token_throughput=(total_input + total_output) * per_second,
        ttft_ms=summarize([ttft(r) for r in done]),
        tpot_ms=summarize(tpots),
        itl_ms=summarize([gap for r in done for gap in itls(r)]),
        e2el_ms=summarize([latency(r) for r in done]),
    )
