"""Sampling cost: the worker's sampler (and logprobs) per step, with penalties/logprobs on vs off.

Times `Sampler.sample` plus `gather_logprobs` on random logits of the default model's vocabulary
(49,152), as `ModelRunner` runs them after the forward pass, for each batch size and each set of
options below. Every row has a history of `--prompt-len` prompt and `--output-len` generated
tokens (penalties read it). Medians (and the fastest call: the steadier figure on a shared
machine) over `--repeats` timed calls after a warm-up.

    python -m benchmarks.sampling_cost --batches 1 8 32 --result-json sampling_cost.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone

import torch

from clients.bench.report import git_revision, write_result
from scheduler_svc.protocol import SamplingOptions
from worker_svc.logits_processing import RowHistory
from worker_svc.logprobs import gather_logprobs
from worker_svc.sampler import Sampler

VOCAB = 49_152  # SmolLM2's
PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)
# name -> the options of every row in the batch
CONFIGS: dict[str, SamplingOptions] = {
    "greedy": SamplingOptions(),
    "greedy + logprobs 5": SamplingOptions(logprobs=5),
    "greedy + penalties": SamplingOptions(**PENALTIES),
    "greedy + penalties + logprobs 5": SamplingOptions(logprobs=5, **PENALTIES),
    "random (T 0.8, top-p 0.95)": SamplingOptions(temperature=0.8, top_p=0.95, seed=1),
    "random + min-p 0.05": SamplingOptions(temperature=0.8, top_p=0.95, min_p=0.05, seed=1),
    "random + penalties + logprobs 5": SamplingOptions(temperature=0.8, top_p=0.95, logprobs=5, seed=1, **PENALTIES),
    "random + logit_bias (8 ids)": SamplingOptions(temperature=0.8, top_p=0.95, seed=1,
                                                   logit_bias=tuple((t * 97, 2.0) for t in range(8))),
}


def time_config(sampler: Sampler, options: SamplingOptions, batch: int, histories: list[RowHistory],
                repeats: int, warmup: int) -> tuple[float, float]:
    """(median, fastest) milliseconds of one step's sampling for `batch` rows of `options`."""
    logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(batch)) * 4
    rows = [options] * batch
    positions = [len(h.token_ids) for h in histories[:batch]]
    times = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        tokens = sampler.sample(logits, rows, positions, histories[:batch])
        gather_logprobs(logits, rows, tokens)
        tokens.tolist()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3, min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--result-json")
    args = parser.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    rng = torch.Generator().manual_seed(0)
    histories = [RowHistory(torch.randint(0, VOCAB, (args.prompt_len + args.output_len,), generator=rng).tolist(),
                            args.prompt_len) for _ in range(max(args.batches))]
    sampler = Sampler("cpu", seed=0)
    results = []
    print(f"{'config':34} " + " ".join(f"{'batch ' + str(b) + ' ms (min)':>20}" for b in args.batches))
    for name, options in CONFIGS.items():
        row = {"config": name, "median_ms": {}, "min_ms": {}}
        for batch in args.batches:
            median, fastest = time_config(sampler, options, batch, histories, args.repeats, args.warmup)
            row["median_ms"][str(batch)], row["min_ms"][str(batch)] = median, fastest
        results.append(row)
        print(f"{name:34} " + " ".join(f"{row['median_ms'][str(b)]:12.2f} ({row['min_ms'][str(b)]:5.2f})"
                                       for b in args.batches))
    if args.result_json:
        write_result(args.result_json, {
            "benchmark": "sampling_cost", "date": datetime.now(timezone.utc).isoformat(), "git": git_revision(),
            "torch_threads": torch.get_num_threads(), "vocab": VOCAB, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "repeats": args.repeats, "results": results,
        })


if __name__ == "__main__":
    main()
