"""benchmarks/scheduling_policies.py: its workloads, ITL window, summaries and ratios on synthetic
data, the load generator's priority and cache_salt, and (model) one tiny run end to end."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from benchmarks.scheduling_policies import (
    COLUMNS,
    chunked_prefill_summary,
    chunked_prefill_variants,
    chunked_prefill_workload,
    format_scenario,
    median_summary,
    parse_args,
    prefix_cache_summary,
    prefix_cache_variants,
    prefix_cache_workload,
    priority_summary,
    priority_variants,
    priority_workload,
    read_counters,
    scenario_ratios,
    split_itls,
)
from clients.bench import runner
from clients.bench.metrics import RequestRecord
from clients.bench.runner import RunResult
from clients.bench.workloads import BenchRequest
from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.block_manager import PrefixCacheStats
from scheduler_svc.metrics import ServingMetrics

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 49152


def record(index, send, chunk_times, prompt_len=10, cached=0, error=None):
    return RequestRecord(index, prompt_len, len(chunk_times), send, chunk_times=list(chunk_times),
                         chunk_tokens=[1] * len(chunk_times), end_time=chunk_times[-1] if chunk_times else None,
                         output_tokens=len(chunk_times), error=error, cached_prompt_tokens=cached)


def test_chunked_prefill_workload_sends_the_long_prompt_last_and_later():
    args = parse_args(["--decode-streams", "3", "--decode-prompt-len", "20", "--decode-len", "50",
                       "--long-prompt-len", "700", "--long-output-len", "5", "--arrival-s", "1.5"])
    requests, offsets = chunked_prefill_workload(args, VOCAB, "repeat-0")
    assert [len(r.prompt_token_ids) for r in requests] == [20, 20, 20, 700]
    assert [r.max_tokens for r in requests] == [50, 50, 50, 5]
    assert offsets == [0.0, 0.0, 0.0, 1.5]
    assert {r.cache_salt for r in requests} == {"repeat-0"}
    assert requests[0].prompt_token_ids[:16] != requests[3].prompt_token_ids[:16]  # no accidental prefix hit
    again, _ = chunked_prefill_workload(args, VOCAB, "repeat-1")
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in requests]  # same requests, new salt


def test_prefix_cache_workload_shares_the_system_prompt():
    args = parse_args(["--prefix-requests", "5", "--system-prompt-len", "48", "--question-len", "3:6",
                       "--prefix-output-len", "4"])
    requests, offsets = prefix_cache_workload(args, VOCAB, "s")
    assert len(requests) == 5 and offsets == [0.0] * 5
    assert all(r.prompt_token_ids[:48] == requests[0].prompt_token_ids[:48] for r in requests)
    assert all(51 <= len(r.prompt_token_ids) <= 54 and r.max_tokens == 4 and r.cache_salt == "s" for r in requests)
    spread = parse_args(["--prefix-requests", "5", "--prefix-rate", "2"])
    assert prefix_cache_workload(spread, VOCAB, "s")[1][-1] > 0


def test_priority_workload_alternates_high_and_low():
    args = parse_args(["--priority-requests", "6", "--priority-prompt-len", "8", "--priority-output-len", "3"])
    requests, offsets = priority_workload(args, VOCAB, "s")
    assert [r.priority for r in requests] == [0, 1, 0, 1, 0, 1]
    assert offsets == [0.0] * 6 and {len(r.prompt_token_ids) for r in requests} == {8}


def test_variants_differ_only_in_the_policy_under_test():
    args = parse_args(["--max-model-len", "1024", "--chunk-budget", "128", "--long-prompt-len", "900",
                       "--aging-s", "10", "inf"])
    off, on, control = chunked_prefill_variants(args)
    assert off.flags == ["--no-chunked-prefill", "--max-model-len", "1024", "--max-num-batched-tokens", "1024"]
    assert on.flags == ["--max-model-len", "1024", "--max-num-batched-tokens", "128"]
    assert control.flags == ["--max-model-len", "1024", "--max-num-batched-tokens", "1024"]
    assert [v.name for v in chunked_prefill_variants(parse_args(["--no-control"]))] == ["off", "on"]
    assert [v.flags for v in prefix_cache_variants(args)] == [[], ["--no-prefix-caching"]]
    aging = priority_variants(args)
    assert [(v.name, v.max_num_seqs, v.flags) for v in aging] == [
        ("aging-10", 2, ["--priority-aging-s", "10"]), ("aging-inf", 2, ["--priority-aging-s", "inf"])]


@pytest.mark.parametrize("argv", [
    ["--long-prompt-len", "2000", "--max-model-len", "2048", "--long-output-len", "49"],  # does not fit
    ["--chunk-budget", "1500", "--long-prompt-len", "1500"],  # nothing to chunk
    ["--chunk-budget", "8", "--max-num-seqs", "16"],  # the server would refuse the budget
])
def test_sizes_that_cannot_compare_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_split_itls_takes_every_gap_overlapping_the_window():
    inside, outside = split_itls([0.0, 0.1, 0.2, 1.2, 1.3], 0.15, 1.2)
    assert inside == pytest.approx([0.1, 1.0])  # (0.1, 0.2] is running at 0.15; (0.2, 1.2] ends at 1.2
    assert outside == pytest.approx([0.1, 0.1])


def test_chunked_prefill_summary_measures_streams_running_at_the_arrival():
    decoding = record(0, 0.0, [0.1, 0.2, 0.3, 1.3, 1.4, 1.5])  # a 1 s stall while the long prompt prefills
    also = record(1, 0.0, [0.1, 0.2, 0.3, 1.3, 1.4])
    late = record(2, 0.0, [0.5, 1.3, 1.4])  # started after the long prompt was sent: not measured
    long = record(3, 0.25, [1.3, 1.4], prompt_len=900)
    summary = chunked_prefill_summary(RunResult([decoding, also, late, long], 1.5))
    assert summary["long TTFT ms"] == pytest.approx(1050)
    # Window [0.25, 1.3]: per measured stream (0.2, 0.3] and (0.3, 1.3]; (1.3, 1.4] starts at its end.
    assert summary["window gaps"] == 4
    assert summary["ITL max ms"] == pytest.approx(1000)
    assert summary["ITL p50 ms"] == pytest.approx(550)
    assert summary["ITL p99 ms"] == pytest.approx(1000, rel=0.01)
    assert summary["ITL p50 outside ms"] == pytest.approx(100)
    assert summary["covered"] == pytest.approx(2 / 3)  # `late` did not see the arrival
    assert summary["failed"] == 0
    widened = chunked_prefill_summary(RunResult([decoding, also, late, long], 1.5), margin_s=0.08)
    assert widened["window gaps"] == 8  # [0.17, 1.38] also overlaps (0.1, 0.2] and (1.3, 1.4]


def test_chunked_prefill_summary_needs_the_long_prompt():
    long = record(1, 0.25, [], error="UNAVAILABLE: gone")
    with pytest.raises(RuntimeError, match="UNAVAILABLE"):
        chunked_prefill_summary(RunResult([record(0, 0.0, [0.1, 0.2]), long], 1.0))


def test_prefix_cache_summary_counts_hits_from_usage_and_from_the_server():
    records = [record(0, 0.0, [0.5, 0.6], prompt_len=420, cached=0),
               record(1, 0.0, [0.2, 0.3], prompt_len=410, cached=400),
               record(2, 0.0, [0.2, 0.4], prompt_len=430, cached=400)]
    server = {"hit tokens": 800.0, "queried tokens": 1260.0}
    summary = prefix_cache_summary(RunResult(records, 0.6), server)
    assert summary["hit rate"] == pytest.approx(800 / 1260)
    assert summary["hit rate (Prometheus)"] == pytest.approx(800 / 1260)
    assert (summary["hit tokens"], summary["prompt tokens"], summary["failed"]) == (800, 1260, 0)
    assert summary["output tok/s"] == pytest.approx(6 / 0.6)
    assert summary["TTFT median ms"] == pytest.approx(200)


def test_priority_summary_splits_ttft_by_class():
    requests = [BenchRequest([1], 1, priority=i % 2) for i in range(4)]
    records = [record(0, 0.0, [1.0]), record(1, 0.0, [3.0]), record(2, 0.0, [2.0]), record(3, 0.0, [4.0])]
    summary = priority_summary(requests, RunResult(records, 4.0))
    assert summary["p0 TTFT median ms"] == pytest.approx(1500)
    assert summary["p1 TTFT median ms"] == pytest.approx(3500)
    assert summary["p1 TTFT p90 ms"] == pytest.approx(3900)
    assert set(COLUMNS["priority"]) <= set(summary)


def test_medians_ratios_and_table():
    runs = [{"ITL p99 ms": 900.0, "ITL max ms": 1000.0, "long TTFT ms": 2000.0},
            {"ITL p99 ms": 700.0, "ITL max ms": 800.0, "long TTFT ms": 3000.0},
            {"ITL p99 ms": 800.0, "ITL max ms": 850.0, "long TTFT ms": 2500.0}]
    off = median_summary(runs)
    assert off == {"ITL p99 ms": 800.0, "ITL max ms": 850.0, "long TTFT ms": 2500.0}
    on = {"ITL p99 ms": 200.0, "ITL max ms": 250.0, "long TTFT ms": 3000.0}
    ratios = scenario_ratios("chunked-prefill", {"off": off, "on": on})
    assert ratios == pytest.approx({"p99 ITL off/on": 4.0, "max ITL off/on": 3.4, "long TTFT on/off": 1.2})
    table = format_scenario("chunked-prefill", {"off": off, "on": on}, ratios)
    assert "| off | 2,500.0 | - | 800.0 |" in table and "p99 ITL off/on: 4.00x" in table

    prefix = scenario_ratios("prefix-cache", {
        "on": {"output tok/s": 30.0, "TTFT median ms": 100.0, "TTFT p99 ms": 200.0},
        "off": {"output tok/s": 20.0, "TTFT median ms": 300.0, "TTFT p99 ms": 0.0}})
    assert prefix == {"output tok/s on/off": 1.5, "TTFT median off/on": 3.0, "TTFT p99 off/on": 0.0}
    priority = scenario_ratios("priority", {"aging-10": {"p0 TTFT median ms": 100.0, "p1 TTFT median ms": 400.0,
                                                         "p0 TTFT p90 ms": 0.0, "p1 TTFT p90 ms": 500.0}})
    assert priority == {"aging-10: TTFT median low/high": 4.0, "aging-10: TTFT p90 low/high": None}
    assert "aging-10: TTFT p90 low/high: n/a" in format_scenario("priority", {}, priority)


def test_read_counters_reads_the_servers_own_exposition():
    metrics = ServingMetrics()
    metrics.observe_prefix_cache(PrefixCacheStats(num_queried_tokens=1260, num_hit_tokens=800))
    metrics.observe_tokens(7, None, None)
    counters = read_counters(generate_latest(metrics.registry).decode())
    assert counters == {"hit tokens": 800.0, "queried tokens": 1260.0, "prompt tokens": 0.0,
                        "generation tokens": 7.0, "preemptions": 0.0}


class FakeClient:
    """Records the GenerateRequest and answers with two tokens and a final usage."""

    def __init__(self):
        self.sent = []

    async def _stream(self):
        yield pb.GenerateResponse(token_ids=[5])
        yield pb.GenerateResponse(token_ids=[6], finish_reason=pb.FINISH_REASON_LENGTH,
                                  usage=pb.Usage(prompt_tokens=40, completion_tokens=2, cached_prompt_tokens=32))

    def generate(self, message, timeout=None):
        self.sent.append(message)
        return self._stream()


async def test_the_load_generator_sends_priority_and_salt_and_records_cached_tokens():
    client = FakeClient()
    request = BenchRequest(list(range(1000, 1040)), 2, priority=3, cache_salt="tenant-a")
    sent = await runner._send(client, 7, request, None)
    assert (client.sent[0].priority, client.sent[0].cache_salt, client.sent[0].request_id) == (3, "tenant-a", "bench-7")
    assert (sent.output_tokens, sent.cached_prompt_tokens, sent.success) == (2, 32, True)
    plain = await runner._send(client, 8, BenchRequest([1000], 2), None)
    assert (client.sent[1].priority, client.sent[1].cache_salt, plain.cached_prompt_tokens) == (0, "", 32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.model
def test_all_scenarios_end_to_end_at_tiny_sizes(tmp_path, model_dir):
    out = tmp_path / "policies"
    command = [sys.executable, "-m", "benchmarks.scheduling_policies", "--repeats", "1", "--out", str(out),
               "--port", str(free_port()), "--metrics-port", str(free_port()), "--num-kv-blocks", "64",
               "--max-num-seqs", "4", "--max-model-len", "256", "--chunk-budget", "32", "--no-control",
               "--decode-streams", "2", "--decode-prompt-len", "8", "--decode-len", "24", "--long-prompt-len", "160",
               "--long-output-len", "2", "--arrival-s", "0.5",
               "--prefix-requests", "4", "--system-prompt-len", "32", "--question-len", "4:8",
               "--prefix-output-len", "2", "--priority-requests", "4", "--priority-prompt-len", "8",
               "--priority-output-len", "2"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "### chunked-prefill" in run.stdout and "p99 ITL off/on" in run.stdout
    report = json.loads((out / "summary.json").read_text())
    assert {"config", "git", "machine", "date", "scenarios"} <= report.keys()
    scenarios = report["scenarios"]
    assert set(scenarios) == {"chunked-prefill", "prefix-cache", "priority"}
    assert set(scenarios["chunked-prefill"]["variants"]) == {"off", "on"}
    assert scenarios["chunked-prefill"]["variants"]["on"]["medians"]["long TTFT ms"] > 0
    prefix = {name: v["medians"] for name, v in scenarios["prefix-cache"]["variants"].items()}
    # 3 of 4 requests find the 32-token system prompt (2 blocks) cached; the first computes it.
    assert prefix["on"]["hit tokens"] == prefix["on"]["hit tokens (Prometheus)"] == 3 * 32
    assert prefix["on"]["queried tokens (Prometheus)"] == prefix["on"]["prompt tokens"]
    assert prefix["off"]["hit tokens"] == 0
    priority = scenarios["priority"]["variants"]["aging-10"]["medians"]
    assert priority["failed"] == 0 and priority["p1 TTFT median ms"] > 0
    assert len(list(out.glob("*-0.json"))) == 5  # one result JSON per variant (2 + 2 + 1) and repeat
