"""The served decode step against the same step in-process: what serving adds between steps.

For each batch size B: `omnibus serve --max-num-seqs B` gets B requests at once (random prompts of
`--prompt-len` tokens, `--output-len` tokens each, `ignore_eos`, greedy), so after their prefill
they decode in lockstep; the served step is the median inter-token gap of all streams (what a
client sees per token). Right after each served round, while the server idles, the same model
(same backends, loaded in this process) runs a decode step of B sequences at the midpoint context
(prompt + half the output): forward, logits, greedy sampling, as `benchmarks/cpu_step.py` times
it. Each round's ratio pairs two measurements a few seconds apart, so the VM's drift over minutes
(up to 1.5x here) cancels; the summary is the median over rounds.

    python -m benchmarks.served_step --batches 16 32 --result-json bench_results/served_step.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.compare_batching import served
from benchmarks.cpu_step import build, step_ms
from clients.bench.metrics import itls
from clients.bench.report import git_revision
from clients.bench.runner import RunOptions, run_workload
from clients.bench.workloads import random_workload
from worker_svc.model_store import prepare_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=50093)
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--serve-flags", nargs=argparse.REMAINDER, default=[],
                        help="extra `omnibus serve` flags (last on the line)")
    parser.add_argument("--result-json", type=Path, default=None)
    return parser.parse_args(argv)


def paired_rounds(args: argparse.Namespace, model, argmax, batch: int) -> list[tuple[float, float]]:
    """(served, in-process) step ms of each round: the median inter-token gap of B streams decoding
    in lockstep, then this process's step of the same shape while the server idles."""
    server_args = argparse.Namespace(port=args.port, batch_size=batch, num_kv_blocks=args.num_kv_blocks,
                                     device="cpu", model=None)
    requests = random_workload(batch, (args.prompt_len, args.prompt_len), (args.output_len, args.output_len),
                               vocab_size=49152, seed=batch)
    context = args.prompt_len + args.output_len // 2
    rounds = []
    with served(server_args, "continuous", args.serve_flags) as target:
        for _ in range(args.repeats):
            result = asyncio.run(run_workload(requests, [0.0] * batch, RunOptions(target=target, progress=False)))
            gaps = [gap for record in result.records for gap in itls(record)]
            rounds.append((statistics.median(gaps) * 1e3, step_ms(model, batch, context, repeats=5, argmax=argmax)))
    return rounds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, _, argmax = build(prepare_model(), "auto", "auto")
    rows = []
    for batch in args.batches:
        rounds = paired_rounds(args, model, argmax, batch)
        ratios = [served / in_process for served, in_process in rounds]
        rows.append({"batch": batch, "context": args.prompt_len + args.output_len // 2,
                     "served_step_ms": statistics.median(s for s, _ in rounds),
                     "in_process_step_ms": statistics.median(i for _, i in rounds),
                     "served_over_in_process": statistics.median(ratios),
                     "rounds_ms": rounds, "round_ratios": ratios})
    lines = ["| batch | context | served step ms (median ITL) | in-process step ms | served / in-process "
             "(median of rounds) | per round |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['context']} | {r['served_step_ms']:.1f} | {r['in_process_step_ms']:.1f} "
              f"| {r['served_over_in_process']:.2f}x | {' '.join(f'{x:.2f}' for x in r['round_ratios'])} |"
              for r in rows]
    print("\n".join(lines))
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps({
            "benchmark": "served_step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "git": git_revision(), "threads": torch.get_num_threads(),
            "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
