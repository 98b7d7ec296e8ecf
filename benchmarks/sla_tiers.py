"""SLA tiers side by side: preemptive priorities, fair share between tenants, lifetime admission.

The real `Scheduler` is stepped against a simulated worker on a simulated clock: a step takes
`--step-base-ms` plus `--step-token-ms` per scheduled token (the defaults are the CPU worker's
figures in docs/benchmarks.md: about 80 ms per decode step of a few streams, about 1.8 ms per
prefill token), and each request stops (a stop token id) after an output length drawn for it in
advance. What differs between variants is only the scheduler's decisions, so a run is exact and
repeatable (same seed, same figures) and takes seconds, where serving the model on the shared
2-core machine would take an hour and measure its load; the real-model behaviour is pinned by
tests/test_sla_e2e.py.

priority: a low class (priority 1) saturates `--max-num-seqs` with long generations from t=0;
a high class (priority 0) arrives at `--high-rate` req/s. TTFT of the high class with preemptive
priorities (`--scheduling-policy priority`), with the same priority order but no preemption
(the queue order alone, as vLLM's priority policy behaves when slots, not blocks, are full), and
with `fcfs`.

fair-share: tenant "flood" queues `--flood-requests` at t=0, tenant "other" sends one every
`--other-interval-s`, all of one priority. TTFT per tenant under `priority` (fair share) and
`fcfs` (arrival order, i.e. without fair share).

admission: memory overcommit. Poisson arrivals whose `max_tokens` together far exceed the KV
pool, most stopping early (a long-tailed output length, `--short-fraction` of them below a
quarter of `max_tokens`). `--admission lifetime` vs `immediate`, with recompute preemption:
preemptions, output throughput, TTFT p50/p99, and the tokens computed twice.

    nice -n 19 python -m benchmarks.sla_tiers --out bench_results/sla_tiers
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from clients.bench.metrics import summarize
from clients.bench.report import git_revision, json_safe, machine_info
from scheduler_svc import protocol
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.request import Request, SamplingParams
from scheduler_svc.scheduler import Scheduler

SCENARIOS = ("priority", "fair-share", "admission")
STOP_TOKEN_ID = 0  # what a request samples last; other tokens are >= 1
VOCAB_SIZE = 32_000


@dataclass(slots=True)
class SimRequest:
    """A request of the workload: when it arrives, its shape, and how long it will really be."""

    req_id: str
    arrival_s: float
    prompt_len: int
    max_tokens: int
    output_len: int  # <= max_tokens: it samples the stop token as its output_len-th token
    priority: int = 0
    tenant: str = ""


@dataclass(slots=True)
class Outcome:
    ttft_s: float | None = None
    finish_s: float | None = None
    num_output_tokens: int = 0


@dataclass(slots=True)
class RunReport:
    outcomes: dict[str, Outcome]
    duration_s: float
    num_steps: int
    num_computed_tokens: int  # every scheduled token, recomputed ones included
    preemptions: dict[str, int]
    scheduler_wall_s: float  # real time spent in schedule() and update_from_output()


@dataclass(slots=True)
class StepCost:
    base_s: float
    per_token_s: float

    def seconds(self, num_tokens: int) -> float:
        return self.base_s + self.per_token_s * num_tokens


@dataclass(slots=True)
class SimulatedWorker:
    """Keeps each request's known length and computed tokens (a request samples when they meet)
    and samples the stop token at the request's drawn output length."""

    prompt_lens: dict[str, int]
    output_lens: dict[str, int]
    num_tokens: dict[str, int] = field(default_factory=dict)
    num_computed: dict[str, int] = field(default_factory=dict)

    def execute(self, plan: protocol.StepPlan) -> protocol.StepResult:
        for req_id in plan.finished_req_ids:
            self.num_tokens.pop(req_id, None)
            self.num_computed.pop(req_id, None)
        scheduled = [(r.req_id, r.num_new_tokens) for r in plan.new_requests + plan.cached_requests]
        for new in plan.new_requests:
            self.num_tokens[new.req_id], self.num_computed[new.req_id] = len(new.token_ids), new.num_computed_tokens
        req_ids, token_ids = [], []
        for req_id, num_new_tokens in scheduled:
            self.num_computed[req_id] += num_new_tokens
            if self.num_computed[req_id] == self.num_tokens[req_id]:
                self.num_tokens[req_id] += 1
                num_output = self.num_tokens[req_id] - self.prompt_lens[req_id]
                req_ids.append(req_id)
                token_ids.append(STOP_TOKEN_ID if num_output >= self.output_lens[req_id] else 1 + num_output)
        return protocol.StepResult(plan.step_id, 0, req_ids, token_ids, 0.0)


class NonPreemptiveScheduler(Scheduler):
    """The priority policy's queue order without its preemption: a newcomer that outranks the
    running requests waits for one of them to finish (the baseline "without preemptive
    priorities")."""

    def _preempt_for_priority(self, step) -> None:
        return None


def to_request(sim: SimRequest, rng: random.Random) -> Request:
    prompt = [rng.randrange(1, VOCAB_SIZE) for _ in range(sim.prompt_len)]
    params = SamplingParams(max_tokens=sim.max_tokens, stop_token_ids=frozenset({STOP_TOKEN_ID}))
    return Request(sim.req_id, prompt, params, arrival_time=sim.arrival_s, priority=sim.priority, tenant=sim.tenant)


def simulate(config: SchedulerConfig, workload: list[SimRequest], cost: StepCost,
             scheduler_type: type[Scheduler] = Scheduler, seed: int = 0) -> RunReport:
    """Step `scheduler_type(config)` through `workload` on the simulated clock."""
    scheduler, rng = scheduler_type(config), random.Random(seed)
    worker = SimulatedWorker({r.req_id: r.prompt_len for r in workload}, {r.req_id: r.output_len for r in workload})
    pending = sorted(workload, key=lambda r: r.arrival_s, reverse=True)
    outcomes = {r.req_id: Outcome() for r in workload}
    arrivals = {r.req_id: r.arrival_s for r in workload}
    clock, num_steps, num_computed, wall = 0.0, 0, 0, 0.0
    while pending or scheduler.has_unfinished_requests():
        while pending and pending[-1].arrival_s <= clock:
            scheduler.add_request(to_request(pending.pop(), rng))
        if not scheduler.has_unfinished_requests():
            clock = pending[-1].arrival_s
            continue
        started = time.perf_counter()
        plan = scheduler.schedule()
        wall += time.perf_counter() - started
        num_tokens = sum(r.num_new_tokens for r in plan.new_requests + plan.cached_requests)
        if not num_tokens:
            raise RuntimeError(f"step {num_steps}: unfinished requests but nothing runs")
        clock += cost.seconds(num_tokens)
        num_steps, num_computed = num_steps + 1, num_computed + num_tokens
        result = worker.execute(plan)
        started = time.perf_counter()
        updates = scheduler.update_from_output(plan, result)
        wall += time.perf_counter() - started
        for update in updates:
            outcome = outcomes[update.req_id]
            if outcome.ttft_s is None:
                outcome.ttft_s = clock - arrivals[update.req_id]
            outcome.num_output_tokens += len(update.new_token_ids)
            if update.status.is_finished:
                outcome.finish_s = clock
    return RunReport(outcomes, clock, num_steps, num_computed, dict(scheduler.num_preemptions_by_cause), wall)


def ttft_summary(report: RunReport, req_ids: list[str]) -> dict[str, float]:
    distribution = summarize([report.outcomes[i].ttft_s for i in req_ids])
    return {"TTFT p50 ms": distribution.median, "TTFT p99 ms": distribution.p99}


def run_summary(report: RunReport, workload: list[SimRequest]) -> dict[str, float]:
    num_output = sum(o.num_output_tokens for o in report.outcomes.values())
    useful = sum(r.prompt_len + o.num_output_tokens - 1 for r, o in
                 ((r, report.outcomes[r.req_id]) for r in workload))
    return {
        "output tok/s": num_output / report.duration_s,
        "duration s": report.duration_s,
        "preemptions": sum(report.preemptions.values()),
        "priority preemptions": report.preemptions["priority"],
        "recomputed tokens": report.num_computed_tokens - useful,
        "scheduler ms/step": 1000 * report.scheduler_wall_s / report.num_steps,
    }


def base_config(args: argparse.Namespace, **overrides) -> SchedulerConfig:
    values = dict(num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len, block_size=16,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_queued_requests=100_000, preemption_mode="recompute")
    return SchedulerConfig(**(values | overrides))


def priority_workload(args: argparse.Namespace) -> list[SimRequest]:
    rng = random.Random(args.seed)
    low = [SimRequest(f"low-{i}", 0.0, 64, 256, 256, priority=1) for i in range(args.low_requests)]
    high, clock = [], 1.0
    while clock < args.duration_s:
        high.append(SimRequest(f"high-{len(high)}", clock, 32, 16, 16, priority=0))
        clock += rng.expovariate(args.high_rate)
    return low + high


def priority_scenario(args: argparse.Namespace) -> dict:
    workload = priority_workload(args)
    high_ids = [r.req_id for r in workload if r.priority == 0]
    low_ids = [r.req_id for r in workload if r.priority == 1]
    variants = {"preemptive": (Scheduler, "priority"), "queue order only": (NonPreemptiveScheduler, "priority"),
                "fcfs": (Scheduler, "fcfs")}
    results = {}
    for name, (scheduler_type, policy) in variants.items():
        config = base_config(args, scheduling_policy=policy, max_num_seqs=args.priority_max_num_seqs,
                             priority_aging_s=args.aging_s)
        report = simulate(config, workload, step_cost(args), scheduler_type, args.seed)
        results[name] = ({f"high {k}": v for k, v in ttft_summary(report, high_ids).items()}
                         | {f"low {k}": v for k, v in ttft_summary(report, low_ids).items()}
                         | run_summary(report, workload))
    return results


def fair_share_workload(args: argparse.Namespace) -> list[SimRequest]:
    flood = [SimRequest(f"flood-{i}", 0.0, 32, 32, 32, tenant="flood") for i in range(args.flood_requests)]
    other = [SimRequest(f"other-{i}", 0.5 + i * args.other_interval_s, 32, 32, 32, tenant="other")
             for i in range(args.other_requests)]
    return flood + other


def fair_share_scenario(args: argparse.Namespace) -> dict:
    workload = fair_share_workload(args)
    results = {}
    for policy in ("priority", "fcfs"):
        config = base_config(args, scheduling_policy=policy, max_num_seqs=args.priority_max_num_seqs)
        report = simulate(config, workload, step_cost(args), seed=args.seed)
        results["fair share" if policy == "priority" else "fcfs"] = (
            {f"{tenant} {k}": v for tenant in ("other", "flood") for k, v in
             ttft_summary(report, [r.req_id for r in workload if r.tenant == tenant]).items()}
            | run_summary(report, workload))
    return results


def admission_workload(args: argparse.Namespace, rate: float) -> list[SimRequest]:
    """Poisson arrivals at `rate` (inf: all at t=0); output lengths long-tailed: most stop in the
    first quarter of max_tokens."""
    rng = random.Random(args.seed)
    workload, clock = [], 0.0
    for i in range(args.admission_requests):
        max_tokens = rng.choice((256, 512))
        fraction = rng.uniform(0.02, 0.25) if rng.random() < args.short_fraction else rng.uniform(0.25, 1.0)
        output_len = max(1, round(fraction * max_tokens))
        workload.append(SimRequest(f"r{i}", clock, rng.randint(32, 256), max_tokens, output_len))
        clock += rng.expovariate(rate) if rate != float("inf") else 0.0
    return workload


def admission_scenario(args: argparse.Namespace) -> dict:
    results = {}
    for rate in args.admission_rates:
        workload = admission_workload(args, rate)
        variants = [("immediate", {"admission": "immediate"})] + [
            (f"lifetime q={q:g}", {"admission": "lifetime", "admission_quantile": q}) for q in args.quantiles]
        for name, overrides in variants:
            report = simulate(base_config(args, **overrides), workload, step_cost(args), seed=args.seed)
            results[f"{rate:g} req/s, {name}"] = (ttft_summary(report, [r.req_id for r in workload])
                                                 | run_summary(report, workload))
    return results


def step_cost(args: argparse.Namespace) -> StepCost:
    return StepCost(args.step_base_ms / 1000, args.step_token_ms / 1000)


def format_table(name: str, results: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(results.values())))
    lines = [f"### {name}", "", "| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for variant, summary in results.items():
        lines.append(f"| {variant} | " + " | ".join(_cell(summary[c]) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: float) -> str:
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_results/sla_tiers"))
    parser.add_argument("--step-base-ms", type=float, default=80.0, help="simulated time of a step, fixed part")
    parser.add_argument("--step-token-ms", type=float, default=1.8, help="simulated time per scheduled token")
    parser.add_argument("--num-kv-blocks", type=int, default=256, help="of 16 tokens")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=32, help="admission scenario")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    tiers = parser.add_argument_group("priority and fair-share")
    tiers.add_argument("--priority-max-num-seqs", type=int, default=4)
    tiers.add_argument("--low-requests", type=int, default=40, help="priority 1, 256 tokens out, queued at t=0")
    tiers.add_argument("--high-rate", type=float, default=1.0, help="priority 0 arrivals per second")
    tiers.add_argument("--duration-s", type=float, default=60.0, help="high-priority arrivals stop after this")
    tiers.add_argument("--aging-s", type=float, default=float("inf"), help="--priority-aging-s")
    tiers.add_argument("--flood-requests", type=int, default=60)
    tiers.add_argument("--other-requests", type=int, default=10)
    tiers.add_argument("--other-interval-s", type=float, default=3.0)
    admission = parser.add_argument_group("admission")
    admission.add_argument("--admission-requests", type=int, default=400)
    admission.add_argument("--admission-rates", type=float, nargs="+", default=[0.6, 0.8, float("inf")],
                           help="arrivals per second (inf: all at t=0, which measures throughput)")
    admission.add_argument("--quantiles", type=float, nargs="+", default=[0.5, 0.7, 0.9],
                           help="the lifetime variants' admission_quantile")
    admission.add_argument("--short-fraction", type=float, default=0.7)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = {"priority": priority_scenario, "fair-share": fair_share_scenario, "admission": admission_scenario}
    results = {scenario: run[scenario](args) for scenario in args.scenarios}
    tables = "\n\n".join(format_table(name, r) for name, r in results.items())
    print(tables)
    summary = {"config": json_safe(vars(args)),
               "git": git_revision(), "machine": machine_info(None),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "scenarios": results}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (args.out / "summary.md").write_text(tables + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
