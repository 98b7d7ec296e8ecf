"""benchmarks/sla_tiers.py on small workloads: the simulation is exact (the same run twice gives
the same figures) and shows each mechanism doing what it is measured for."""

from __future__ import annotations

import json

from benchmarks import sla_tiers

SMALL = ["--low-requests", "8", "--duration-s", "10", "--flood-requests", "12", "--other-requests", "2",
         "--admission-requests", "60", "--admission-rates", "inf", "--quantiles", "0.5"]


def test_the_simulated_worker_stops_each_request_at_its_drawn_length():
    args = sla_tiers.parse_args(SMALL)
    workload = sla_tiers.admission_workload(args, float("inf"))
    report = sla_tiers.simulate(sla_tiers.base_config(args), workload, sla_tiers.step_cost(args))
    for request in workload:
        assert report.outcomes[request.req_id].num_output_tokens == request.output_len
    assert report.duration_s > report.num_steps * args.step_base_ms / 1000


def test_each_mechanism_shows_in_its_scenario(tmp_path):
    assert sla_tiers.main(SMALL + ["--out", str(tmp_path)]) == 0
    scenarios = json.loads((tmp_path / "summary.json").read_text())["scenarios"]
    priority = scenarios["priority"]
    assert priority["preemptive"]["high TTFT p99 ms"] < priority["queue order only"]["high TTFT p50 ms"]
    assert priority["preemptive"]["priority preemptions"] > 0 == priority["queue order only"]["preemptions"]
    fair = scenarios["fair-share"]
    assert fair["fair share"]["other TTFT p99 ms"] < fair["fcfs"]["other TTFT p50 ms"]
    admission = scenarios["admission"]
    assert admission["inf req/s, lifetime q=0.5"]["preemptions"] == 0 < admission["inf req/s, immediate"]["preemptions"]
    assert admission["inf req/s, immediate"]["recomputed tokens"] > 0
    again = sla_tiers.admission_scenario(sla_tiers.parse_args(SMALL))
    assert simulated(again) == simulated(admission)  # all but the scheduler's real time


def simulated(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {variant: {k: v for k, v in row.items() if k != "scheduler ms/step"} for variant, row in results.items()}
