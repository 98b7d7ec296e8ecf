"""`omnibus bench` flags and entry point; `python -m clients.bench` runs it without the `omnibus` CLI."""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from clients.bench.arrivals import arrival_offsets
from clients.bench.metrics import compute_metrics
from clients.bench.report import build_result, format_table, write_result
from clients.bench.runner import RunOptions, fetch_model_info, run_workload
from clients.bench.workloads import (
    BenchRequest,
    load_workload,
    random_workload,
    save_workload,
    shared_prefix_workload,
    sharegpt_like_workload,
)

# Per workload, the --input-len / --output-len used when the flag is not given. For sharegpt they
# are the clipping bounds (vLLM's ShareGPT filter: at least 4 tokens, prompts at most 1024); for
# shared-prefix, --input-len is the suffix after the shared prefix.
DEFAULT_LENGTHS = {
    "random": ((64, 256), (32, 128)),
    "sharegpt": ((4, 1024), (4, 1024)),
    "shared-prefix": ((16, 64), (32, 128)),
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the load generator's flags to parser (the `omnibus bench` subcommand or our own)."""
    parser.add_argument("--target", default="localhost:50051", help="server address")
    parser.add_argument("--workload", default="random", choices=sorted(DEFAULT_LENGTHS), help="request length distribution")
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--input-len", type=length_range, default=None, metavar="MIN:MAX",
                        help="prompt tokens (sharegpt: clipping bounds; shared-prefix: the suffix)")
    parser.add_argument("--output-len", type=length_range, default=None, metavar="MIN:MAX",
                        help="tokens to generate, exactly (ignore_eos); sharegpt: clipping bounds")
    parser.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens every prompt starts with")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf sends all at once")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps; 1.0 = Poisson")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--seed", type=int, default=0, help="seeds the workload and the arrival times")
    parser.add_argument("--num-warmups", type=int, default=1, help="untimed short requests sent first")
    parser.add_argument("--request-timeout", type=float, default=None, help="seconds before a request counts as failed")
    parser.add_argument("--save-workload", default=None, metavar="PATH", help="write the workload as JSON")
    parser.add_argument("--workload-file", default=None, metavar="PATH", help="replay a workload saved with --save-workload")
    parser.add_argument("--label", default="omnibus", help="names this run in plots (e.g. a scheduling policy)")
    parser.add_argument("--result-json", default=None, metavar="PATH", help="write the result JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe, print the table, write the JSON. 0 when at least one
    request completed (failures under overload are results, reported in the table), else 1."""
    try:
        return asyncio.run(_bench(args))
    except grpc.aio.AioRpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def length_range(text: str) -> tuple[int, int]:
    """Parse "MIN:MAX" (or "N" for N:N) into an inclusive range of positive lengths."""
    low, _, high = text.partition(":")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return bounds


def build_workload(args: argparse.Namespace, vocab_size: int, max_model_len: int) -> tuple[list[BenchRequest], dict]:
    """The requests the flags ask for, and a description of them for the result JSON."""
    if args.workload_file:
        requests = load_workload(args.workload_file)
        return requests, _describe(requests, name="file", path=args.workload_file)
    default_input, default_output = DEFAULT_LENGTHS[args.workload]
    input_len, output_len = args.input_len or default_input, args.output_len or default_output
    n, seed = args.num_requests, args.seed
    if args.workload == "random":
        requests = random_workload(n, input_len, output_len, vocab_size, seed)
    elif args.workload == "sharegpt":
        max_input = min(input_len[1], max_model_len - output_len[1])
        if max_input < input_len[0]:
            raise ValueError(f"--output-len max {output_len[1]} leaves no room for prompts in {max_model_len} tokens")
        requests = sharegpt_like_workload(n, seed, max_input, output_len[1], vocab_size, min_len=input_len[0])
    else:
        requests = shared_prefix_workload(n, args.prefix_len, input_len, output_len, seed, vocab_size)
    prefix_len = args.prefix_len if args.workload == "shared-prefix" else None
    return requests, _describe(requests, name=args.workload, input_len=input_len, output_len=output_len,
                               prefix_len=prefix_len, seed=seed)


async def _bench(args: argparse.Namespace) -> int:
    info = await fetch_model_info(args.target)
    requests, workload = build_workload(args, info.vocab_size, info.max_model_len)
    if args.save_workload:
        save_workload(args.save_workload, requests)
    offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness, args.seed)
    print(f"{len(requests)} {workload['name']} requests to {args.target} ({info.model_id} on {info.device}); "
          f"rate {args.request_rate}/s, burstiness {args.burstiness}, max concurrency {args.max_concurrency}",
          file=sys.stderr)
    options = RunOptions(args.target, args.max_concurrency, args.num_warmups, args.request_timeout, not args.no_progress)
    result = await run_workload(requests, offsets, options)
    metrics = compute_metrics(result.records, result.duration_s)
    print(format_table(metrics))
    _print_errors(result.records)
    if args.result_json:
        config = {**vars(args), "workload_params": workload}
        write_result(args.result_json, build_result(config, info, metrics, result.records))
    return 0 if metrics.completed else 1


def _describe(requests: list[BenchRequest], **params) -> dict:
    n = max(len(requests), 1)
    return {**params, "num_requests": len(requests),
            "mean_input_len": sum(len(r.prompt_token_ids) for r in requests) / n,
            "mean_output_len": sum(r.max_tokens for r in requests) / n}


def _print_errors(records) -> None:
    counts: dict[str, int] = {}
    for record in records:
        if record.error is not None:
            counts[record.error] = counts.get(record.error, 0) + 1
    for error, count in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"{count} failed: {error}", file=sys.stderr)
