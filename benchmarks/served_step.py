"""The served decode step against the same step in-process: what serving adds between steps.

For each batch size B: `omnibus serve --max-num-seqs B` gets B requests at once (random prompts of
`--prompt-len` tokens, `--output-len` tokens each, `ignore_eos`, greedy), so after their prefill
they decode in lockstep; the served step is the median inter-token gap of all streams (what a
client sees per token). The server is then stopped and the same model (same backends) runs a
decode step of B sequences at the midpoint context (prompt + half the output) in this process:
forward, logits, greedy sampling, as `benchmarks/cpu_step.py` times it.

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


def served_step_ms(args: argparse.Namespace, batch: int) -> list[float]:
    """Median inter-token gap (ms) of each repeat: B streams decoding in lockstep."""
    server_args = argparse.Namespace(port=args.port, batch_size=batch, num_kv_blocks=args.num_kv_blocks,
                                     device="cpu", model=None)
    requests = random_workload(batch, (args.prompt_len, args.prompt_len), (args.output_len, args.output_len),
                               vocab_size=49152, seed=batch)
    medians = []
    with served(server_args, "continuous", args.serve_flags) as target:
        for _ in range(args.repeats):
            result = asyncio.run(run_workload(requests, [0.0] * batch, RunOptions(target=target, progress=False)))
            gaps = [gap for record in result.records for gap in itls(record)]
            medians.append(statistics.median(gaps) * 1e3)
    return medians


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = prepare_model()
    rows = []
    served_ms = {batch: served_step_ms(args, batch) for batch in args.batches}  # model not loaded here yet
    model, _ = build(model_dir, "auto", "onednn")
    for batch in args.batches:
        context = args.prompt_len + args.output_len // 2
        in_process = step_ms(model, batch, context, repeats=5)
        served = statistics.median(served_ms[batch])
        rows.append({"batch": batch, "context": context, "served_step_ms": served, "served_runs_ms": served_ms[batch],
                     "in_process_step_ms": in_process, "served_over_in_process": served / in_process})
    lines = ["| batch | context | served step ms (median ITL) | in-process step ms | served / in-process |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['context']} | {r['served_step_ms']:.1f} | {r['in_process_step_ms']:.1f} "
              f"| {r['served_over_in_process']:.2f}x |" for r in rows]
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
