"""Scheduling policies side by side: chunked prefill, prefix caching and priorities.

Each scenario serves one `omnibus serve` per variant (the variants differ only in the flags of the
policy under test), replays one seeded workload `--repeats` times against it, and reports medians
over the repeats and the ratios between variants. Every repeat sends the same requests under a new
`cache_salt`, so no repeat finds an earlier one's blocks in the prefix cache.

chunked-prefill: `--decode-streams` requests are decoding when one long prompt arrives. Measured:
the inter-token latency (ITL) of the requests already decoding, over their gaps that overlap the
window from the long prompt's send to its first token, and that prompt's TTFT. What "on vs off"
means: chunking only splits a prompt larger than what is left of the step's token budget, and
without it the budget must hold the longest prompt (`--max-num-batched-tokens` >= max_model_len).
With that same budget a chunked scheduler also runs the long prompt in one step, so the two
behave alike (the `on-same-budget` control). What chunking buys is a small budget that still serves
any prompt: `off` is `--no-chunked-prefill` with budget = `--max-model-len`, `on` is chunked with
budget `--chunk-budget`.

prefix-cache: requests share a `--system-prompt-len` system prompt, then a short distinct
question; prefix caching on vs `--no-prefix-caching`. Hit rate from the requests' usage
(`cached_prompt_tokens` / prompt tokens), cross-checked with the server's Prometheus counters.

priority: more requests than `--priority-max-num-seqs` can run, alternately priority 0 and 1;
TTFT per priority class at each `--aging-s` value (`inf`: strict priorities).

    python -m benchmarks.scheduling_policies --out bench_results/policies
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.compare_batching import served, span
from clients.bench.arrivals import arrival_offsets
from clients.bench.metrics import compute_metrics, summarize, ttft
from clients.bench.report import build_result, git_revision, json_safe, machine_info, write_result
from clients.bench.runner import RunOptions, RunResult, fetch_model_info, run_workload
from clients.bench.workloads import BenchRequest, random_workload, shared_prefix_workload

SCENARIOS = ("chunked-prefill", "prefix-cache", "priority")
# Server counters read before and after every run (their difference is the run's share).
PROMETHEUS_COUNTERS = {
    "hit tokens": "omnibus_prefix_cache_hit_tokens_total",
    "queried tokens": "omnibus_prefix_cache_queried_tokens_total",
    "prompt tokens": "omnibus_prompt_tokens_total",
    "generation tokens": "omnibus_generation_tokens_total",
    "preemptions": "omnibus_preemptions_total",
}
COLUMNS = {
    "chunked-prefill": ["long TTFT ms", "ITL p50 ms", "ITL p99 ms", "ITL max ms", "ITL p50 outside ms",
                        "window gaps", "covered"],
    "prefix-cache": ["output tok/s", "TTFT median ms", "TTFT p99 ms", "hit rate", "hit rate (Prometheus)",
                     "failed"],
    "priority": ["p0 TTFT median ms", "p0 TTFT p90 ms", "p1 TTFT median ms", "p1 TTFT p90 ms",
                 "output tok/s", "failed"],
}

Workload = tuple[list[BenchRequest], list[float]]  # requests and their send offsets (s)
Summary = dict[str, float]


@dataclass(slots=True)
class Variant:
    """One server configuration of a scenario."""

    name: str
    max_num_seqs: int
    flags: list[str]  # `omnibus serve` flags beyond those `served()` sets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=50093)
    parser.add_argument("--metrics-port", type=int, default=50094, help="the servers' Prometheus port")
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=16, help="chunked-prefill and prefix-cache")
    parser.add_argument("--model", default=None, help="as omnibus serve --model (default: the default model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench_results/policies"))
    chunked = parser.add_argument_group("chunked-prefill")
    chunked.add_argument("--max-model-len", type=int, default=2048, help="also the token budget without chunking")
    chunked.add_argument("--chunk-budget", type=int, default=256, help="--max-num-batched-tokens of the chunked run")
    chunked.add_argument("--decode-streams", type=int, default=4)
    chunked.add_argument("--decode-prompt-len", type=int, default=32)
    chunked.add_argument("--decode-len", type=int, default=96, help="output tokens of each decoding stream")
    chunked.add_argument("--long-prompt-len", type=int, default=1500)
    chunked.add_argument("--long-output-len", type=int, default=8)
    chunked.add_argument("--arrival-s", type=float, default=2.0, help="when the long prompt is sent")
    chunked.add_argument("--window-margin-s", type=float, default=0.0, help="widen the ITL window by this, both sides")
    chunked.add_argument("--no-control", action="store_true", help="skip the on-same-budget control run")
    prefix = parser.add_argument_group("prefix-cache")
    prefix.add_argument("--prefix-requests", type=int, default=16)
    prefix.add_argument("--system-prompt-len", type=int, default=400)
    prefix.add_argument("--question-len", type=span, default=(16, 32), metavar="MIN:MAX")
    prefix.add_argument("--prefix-output-len", type=int, default=16)
    prefix.add_argument("--prefix-rate", type=float, default=float("inf"), help="requests/s; inf: all at once")
    priority = parser.add_argument_group("priority")
    priority.add_argument("--priority-requests", type=int, default=24)
    priority.add_argument("--priority-max-num-seqs", type=int, default=2)
    priority.add_argument("--priority-prompt-len", type=int, default=32)
    priority.add_argument("--priority-output-len", type=int, default=16)
    priority.add_argument("--priority-rate", type=float, default=float("inf"), help="requests/s; inf: all at once")
    priority.add_argument("--aging-s", type=float, nargs="+", default=[10.0],
                          help="--priority-aging-s of each variant (inf: strict priorities)")
    args = parser.parse_args(argv)
    if args.long_prompt_len + args.long_output_len > args.max_model_len:
        parser.error("--long-prompt-len + --long-output-len must fit --max-model-len")
    if not args.max_num_seqs <= args.chunk_budget < args.long_prompt_len:
        parser.error("need --max-num-seqs <= --chunk-budget < --long-prompt-len, or nothing is chunked")
    return args


def chunked_prefill_variants(args: argparse.Namespace) -> list[Variant]:
    def flags(budget: int) -> list[str]:
        return ["--max-model-len", str(args.max_model_len), "--max-num-batched-tokens", str(budget)]

    variants = [Variant("off", args.max_num_seqs, ["--no-chunked-prefill", *flags(args.max_model_len)]),
                Variant("on", args.max_num_seqs, flags(args.chunk_budget))]
    if not args.no_control:
        variants.append(Variant("on-same-budget", args.max_num_seqs, flags(args.max_model_len)))
    return variants


def prefix_cache_variants(args: argparse.Namespace) -> list[Variant]:
    return [Variant("on", args.max_num_seqs, []), Variant("off", args.max_num_seqs, ["--no-prefix-caching"])]


def priority_variants(args: argparse.Namespace) -> list[Variant]:
    return [Variant(f"aging-{aging:g}", args.priority_max_num_seqs, ["--priority-aging-s", f"{aging:g}"])
            for aging in args.aging_s]


def chunked_prefill_workload(args: argparse.Namespace, vocab_size: int, salt: str) -> Workload:
    """The decoding streams, sent at 0, then the long prompt (last), sent at `--arrival-s`."""
    decoders = random_workload(args.decode_streams, (args.decode_prompt_len,) * 2, (args.decode_len,) * 2,
                               vocab_size, args.seed)
    long = random_workload(1, (args.long_prompt_len,) * 2, (args.long_output_len,) * 2, vocab_size, args.seed + 1)
    requests = _salted(decoders + long, salt)
    return requests, [0.0] * len(decoders) + [args.arrival_s]


def prefix_cache_workload(args: argparse.Namespace, vocab_size: int, salt: str) -> Workload:
    """One shared system prompt, then a distinct question per request."""
    output_len = (args.prefix_output_len,) * 2
    requests = shared_prefix_workload(args.prefix_requests, args.system_prompt_len, args.question_len, output_len,
                                      args.seed, vocab_size)
    return _salted(requests, salt), arrival_offsets(len(requests), args.prefix_rate, 1.0, args.seed)


def priority_workload(args: argparse.Namespace, vocab_size: int, salt: str) -> Workload:
    """Equal requests, alternately priority 0 (high) and 1 (low)."""
    requests = random_workload(args.priority_requests, (args.priority_prompt_len,) * 2,
                               (args.priority_output_len,) * 2, vocab_size, args.seed)
    for index, request in enumerate(requests):
        request.priority = index % 2
    return _salted(requests, salt), arrival_offsets(len(requests), args.priority_rate, 1.0, args.seed)


def _salted(requests: list[BenchRequest], salt: str) -> list[BenchRequest]:
    for request in requests:
        request.cache_salt = salt
    return requests


def split_itls(chunk_times: list[float], start: float, end: float) -> tuple[list[float], list[float]]:
    """The gaps between consecutive chunk times: those overlapping [start, end], and the rest."""
    inside, outside = [], []
    for t0, t1 in zip(chunk_times, chunk_times[1:]):
        (inside if t1 > start and t0 < end else outside).append(t1 - t0)
    return inside, outside


def chunked_prefill_summary(result: RunResult, margin_s: float = 0.0) -> Summary:
    """ITL of the streams that were decoding when the long prompt (the last record) was sent, over
    their gaps overlapping [its send, its first token] widened by `margin_s`; its TTFT.

    `covered`: the fraction of the other streams that had a token before the send and another one
    after the first token, i.e. that saw the whole window (below 1: make them decode longer).
    """
    *others, long = result.records
    if not long.success:
        raise RuntimeError(f"the long prompt failed: {long.error}")
    first_token = long.chunk_times[0]
    running = [r for r in others if r.chunk_times and r.chunk_times[0] < long.send_time]
    inside, outside = [], []
    for record in running:
        gaps = split_itls(record.chunk_times, long.send_time - margin_s, first_token + margin_s)
        inside += gaps[0]
        outside += gaps[1]
    window = summarize(inside)
    return {
        "long TTFT ms": ttft(long) * 1000,
        "ITL p50 ms": window.median,
        "ITL p99 ms": window.p99,
        "ITL max ms": max(inside, default=0.0) * 1000,
        "ITL p50 outside ms": summarize(outside).median,
        "window gaps": len(inside),
        "covered": sum(r.chunk_times[-1] > first_token for r in running) / max(len(others), 1),
        "failed": sum(not r.success for r in result.records),
    }


def prefix_cache_summary(result: RunResult, server: dict[str, float]) -> Summary:
    """Throughput, TTFT, and the prefix-cache hit rate seen by the clients and by the server."""
    metrics = compute_metrics(result.records, result.duration_s)
    done = [r for r in result.records if r.success]
    prompt_tokens = sum(r.prompt_len for r in done)
    hit_tokens = sum(r.cached_prompt_tokens for r in done)
    return {
        "output tok/s": metrics.output_throughput,
        "TTFT median ms": metrics.ttft_ms.median,
        "TTFT p99 ms": metrics.ttft_ms.p99,
        "hit rate": ratio(hit_tokens, prompt_tokens) or 0.0,
        "hit rate (Prometheus)": ratio(server["hit tokens"], server["queried tokens"]) or 0.0,
        "hit tokens": hit_tokens,
        "hit tokens (Prometheus)": server["hit tokens"],
        "prompt tokens": prompt_tokens,
        "queried tokens (Prometheus)": server["queried tokens"],
        "failed": metrics.failed,
    }


def priority_summary(requests: list[BenchRequest], result: RunResult) -> Summary:
    """TTFT median and p90 per priority class ("p0 ...", "p1 ..."), and the output throughput."""
    ttfts: dict[int, list[float]] = {request.priority: [] for request in requests}
    for request, record in zip(requests, result.records, strict=True):
        if record.success:
            ttfts[request.priority].append(ttft(record))
    summary: Summary = {}
    for priority in sorted(ttfts):
        distribution = summarize(ttfts[priority])
        summary[f"p{priority} TTFT median ms"] = distribution.median
        summary[f"p{priority} TTFT p90 ms"] = distribution.p90
    metrics = compute_metrics(result.records, result.duration_s)
    return summary | {"output tok/s": metrics.output_throughput, "failed": metrics.failed}


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def median_summary(runs: list[Summary]) -> Summary:
    """Each figure's median over the repeats."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def scenario_ratios(scenario: str, medians: dict[str, Summary]) -> dict[str, float | None]:
    """The comparisons each scenario is run for, from the variants' medians."""
    if scenario == "chunked-prefill":
        off, on = medians["off"], medians["on"]
        return {"p99 ITL off/on": ratio(off["ITL p99 ms"], on["ITL p99 ms"]),
                "max ITL off/on": ratio(off["ITL max ms"], on["ITL max ms"]),
                "long TTFT on/off": ratio(on["long TTFT ms"], off["long TTFT ms"])}
    if scenario == "prefix-cache":
        on, off = medians["on"], medians["off"]
        return {"output tok/s on/off": ratio(on["output tok/s"], off["output tok/s"]),
                "TTFT median off/on": ratio(off["TTFT median ms"], on["TTFT median ms"]),
                "TTFT p99 off/on": ratio(off["TTFT p99 ms"], on["TTFT p99 ms"])}
    ratios = {}
    for name, summary in medians.items():
        for stat in ("median", "p90"):
            ratios[f"{name}: TTFT {stat} low/high"] = ratio(summary.get(f"p1 TTFT {stat} ms", 0.0),
                                                             summary.get(f"p0 TTFT {stat} ms", 0.0))
    return ratios


def format_scenario(scenario: str, medians: dict[str, Summary], ratios: dict[str, float | None]) -> str:
    """A markdown table of the variants' medians, then the ratios."""
    columns = COLUMNS[scenario]
    lines = [f"### {scenario}", "", "| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, summary in medians.items():
        lines.append(f"| {name} | " + " | ".join(_cell(summary.get(column)) for column in columns) + " |")
    lines.append("")
    lines += [f"{name}: " + ("n/a" if value is None else f"{value:.2f}x") for name, value in ratios.items()]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"


def read_counters(text: str) -> dict[str, float]:
    """PROMETHEUS_COUNTERS' values in a /metrics page (0 for any it lacks)."""
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return {key: samples.get(name, 0.0) for key, name in PROMETHEUS_COUNTERS.items()}


def scrape_counters(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return read_counters(response.read().decode())


def run_scenario(args: argparse.Namespace, scenario: str, variants: list[Variant],
                 make_workload: Callable[..., Workload],
                 summarize_run: Callable[[list[BenchRequest], RunResult, dict], Summary]) -> dict:
    """Serve each variant and replay the workload `--repeats` times; the scenario's report."""
    report: dict = {"variants": {}}
    for variant in variants:
        serve_args = argparse.Namespace(port=args.port, batch_size=variant.max_num_seqs,
                                        num_kv_blocks=args.num_kv_blocks, device=args.device, model=args.model)
        with served(serve_args, "continuous", variant.flags, metrics_port=args.metrics_port) as target:
            runs = asyncio.run(_repeats(args, scenario, variant, target, make_workload, summarize_run))
        report["variants"][variant.name] = {"max_num_seqs": variant.max_num_seqs, "flags": variant.flags,
                                            "medians": median_summary(runs), "runs": runs}
    medians = {name: variant["medians"] for name, variant in report["variants"].items()}
    report["ratios"] = scenario_ratios(scenario, medians)
    report["table"] = format_scenario(scenario, medians, report["ratios"])
    return report


async def _repeats(args: argparse.Namespace, scenario: str, variant: Variant, target: str,
                   make_workload: Callable[..., Workload], summarize_run: Callable[..., Summary]) -> list[Summary]:
    info = await fetch_model_info(target)
    # One untimed request per server; the runs then send none, so the counters are theirs alone.
    await run_workload([], [], RunOptions(target, progress=False))
    runs = []
    for repeat in range(args.repeats):
        requests, offsets = make_workload(args, info.vocab_size, f"repeat-{repeat}")
        before = scrape_counters(args.metrics_port)
        result = await run_workload(requests, offsets, RunOptions(target, num_warmups=0, progress=False))
        after = scrape_counters(args.metrics_port)
        server = {key: after[key] - before[key] for key in after}
        summary = summarize_run(requests, result, server)
        _warn(scenario, variant.name, repeat, summary, server)
        config = {"scenario": scenario, "variant": variant.name, "serve_flags": variant.flags,
                  "max_num_seqs": variant.max_num_seqs, "repeat": repeat, "args": vars(args)}
        run_json = build_result(config, info, compute_metrics(result.records, result.duration_s), result.records)
        write_result(args.out / f"{scenario}-{variant.name}-{repeat}.json",
                     run_json | {"summary": summary, "prometheus": server})
        runs.append(summary)
    return runs


def _warn(scenario: str, variant: str, repeat: int, summary: Summary, server: dict[str, float]) -> None:
    where = f"{scenario} {variant} repeat {repeat}"
    if summary.get("failed"):
        print(f"warning: {where}: {summary['failed']:.0f} requests failed", file=sys.stderr)
    if summary.get("covered", 1.0) < 1.0:
        print(f"warning: {where}: some streams did not decode through the whole window "
              f"(covered {summary['covered']:.2f}); raise --decode-len", file=sys.stderr)
    if "hit tokens" in summary and summary["hit tokens"] != server["hit tokens"]:
        print(f"warning: {where}: usage reports {summary['hit tokens']:.0f} cached prompt tokens, "
              f"Prometheus {server['hit tokens']:.0f}", file=sys.stderr)
    if server["preemptions"]:
        print(f"note: {where}: {server['preemptions']:.0f} preemptions", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    scenarios = {
        "chunked-prefill": (chunked_prefill_variants, chunked_prefill_workload,
                            lambda requests, result, server: chunked_prefill_summary(result, args.window_margin_s)),
        "prefix-cache": (prefix_cache_variants, prefix_cache_workload,
                         lambda requests, result, server: prefix_cache_summary(result, server)),
        "priority": (priority_variants, priority_workload,
                     lambda requests, result, server: priority_summary(requests, result)),
    }
    reports = {}
    for scenario in args.scenarios:
        variants, make_workload, summarize_run = scenarios[scenario]
        reports[scenario] = run_scenario(args, scenario, variants(args), make_workload, summarize_run)
    tables = "\n\n".join(report["table"] for report in reports.values())
    print(tables)
    summary = {"config": json_safe(vars(args)), "git": git_revision(), "machine": machine_info(None),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "scenarios": reports}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (args.out / "summary.md").write_text(tables + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
