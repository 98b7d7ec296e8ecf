"""Continuous vs static batching vs Hugging Face `generate`, side by side on one workload.

One seeded variable-length workload is saved once and replayed against `omnibus serve
--scheduling continuous`, then `--scheduling static` (same flags otherwise, so the policy is the
only difference), then through `benchmarks/hf_baseline.py` with padded batches of the same size.
Each runs `--repeats` times; the summary quotes medians and the ratios between them.

    python -m benchmarks.compare_batching --out bench_results/compare
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.bench.report import git_revision, machine_info
from clients.bench.workloads import random_workload, save_workload, sharegpt_like_workload

# (column, path into a result's "metrics"): the figures the summary quotes.
HEADLINE = [
    ("output tok/s", ("output_throughput",)),
    ("req/s", ("request_throughput",)),
    ("TTFT median ms", ("ttft_ms", "median")),
    ("TTFT p99 ms", ("ttft_ms", "p99")),
    ("TPOT median ms", ("tpot_ms", "median")),
    ("TPOT p99 ms", ("tpot_ms", "p99")),
    ("E2E median ms", ("e2el_ms", "median")),
    ("E2E p99 ms", ("e2el_ms", "p99")),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--input-len", default="16:256")
    parser.add_argument("--output-len", default="16:192")
    parser.add_argument("--workload", choices=["random", "sharegpt"], default="random",
                        help="random: uniform lengths over --input-len/--output-len; sharegpt: long-tailed "
                             "(log-normal) lengths capped at their upper bounds")
    parser.add_argument("--systems", nargs="+", default=["continuous", "static", "transformers"],
                        choices=["continuous", "static", "transformers"])
    parser.add_argument("--batch-size", type=int, default=16, help="max-num-seqs of both policies and the HF batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=50091)
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--model", default=None, help="as omnibus serve --model (default: the default model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench_results/compare"))
    return parser.parse_args(argv)


def span(text: str) -> tuple[int, int]:
    low, high = text.split(":")
    return int(low), int(high)


def wait_serving(target: str, timeout_s: float) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service="omnibus.v1.Generation"), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{target} did not become SERVING in {timeout_s:.0f} s")


@contextmanager
def served(args: argparse.Namespace, scheduling: str, extra_flags: Sequence[str] = (),
           metrics_port: int = 0) -> Iterator[str]:
    """`omnibus serve` with one scheduling policy, SERVING, for the duration; yields its target.

    `extra_flags` go to `omnibus serve` as they are; `metrics_port` serves Prometheus metrics (0: off).
    """
    command = [sys.executable, "-m", "clients.cli", "--log-level", "warning", "serve", "--port", str(args.port),
               "--scheduling", scheduling, "--max-num-seqs", str(args.batch_size),
               "--num-kv-blocks", str(args.num_kv_blocks), "--metrics-port", str(metrics_port)]
    command += ["--device", getattr(args, "device", "cpu")]
    if getattr(args, "model", None):
        command += ["--model", args.model]
    command += list(extra_flags)
    server = subprocess.Popen(command)
    try:
        target = f"127.0.0.1:{args.port}"
        wait_serving(target, 300)
        yield target
    finally:
        server.send_signal(signal.SIGINT)  # the same clean stop as Ctrl-C
        server.wait(120)


def save_seeded_workload(args: argparse.Namespace) -> Path:
    """The run's random workload, written once so every system replays the same requests."""
    workload = args.out / "workload.json"
    if args.workload == "sharegpt":
        requests = sharegpt_like_workload(args.num_requests, args.seed, max_input=span(args.input_len)[1],
                                          max_output=span(args.output_len)[1], vocab_size=49152)
    else:
        requests = random_workload(args.num_requests, span(args.input_len), span(args.output_len),
                                   vocab_size=49152, seed=args.seed)
    save_workload(workload, requests)
    return workload


def run_engine(args: argparse.Namespace, scheduling: str, workload: Path,
               extra_flags: Sequence[str] = ()) -> list[Path]:
    """Serve with one policy and replay the workload `repeats` times against it."""
    results = []
    with served(args, scheduling, extra_flags) as target:
        for repeat in range(args.repeats):
            result = args.out / f"{scheduling}-{repeat}.json"
            subprocess.run([sys.executable, "-m", "clients.bench", "--target", target,
                            "--workload-file", str(workload), "--label", scheduling, "--no-progress",
                            "--result-json", str(result)], check=True)
            results.append(result)
    return results


def run_hf(args: argparse.Namespace, workload: Path) -> list[Path]:
    results = []
    for repeat in range(args.hf_repeats or args.repeats):
        result = args.out / f"transformers-{repeat}.json"
        command = [sys.executable, "-m", "benchmarks.hf_baseline", "--workload-file", str(workload),
                   "--batch-size", str(args.batch_size), "--device", args.device, "--result-json", str(result)]
        if args.model:
            command += ["--model", args.model]
        subprocess.run(command, check=True)
        results.append(result)
    return results


def medians(paths: list[Path]) -> dict[str, float]:
    """Each headline figure's median over the repeated runs."""
    runs = [json.loads(path.read_text())["metrics"] for path in paths]
    return {column: statistics.median(_lookup(run, keys) for run in runs) for column, keys in HEADLINE}


def _lookup(metrics: dict, keys: tuple[str, ...]) -> float:
    for key in keys:
        metrics = metrics[key]
    return metrics


def summarize(summary: dict[str, dict[str, float]]) -> str:
    """A markdown table of the medians, then the throughput ratios."""
    columns = [column for column, _ in HEADLINE]
    lines = ["| system | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.1f}" for c in columns) + " |")
    lines.append("")
    if "continuous" not in summary:
        return "\n".join(lines)
    base = summary["continuous"]["output tok/s"]
    for other in ("static", "transformers"):
        if other in summary:
            lines.append(f"continuous / {other} output throughput: {base / summary[other]['output tok/s']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workload = save_seeded_workload(args)
    runners = {"continuous": lambda: run_engine(args, "continuous", workload),
               "static": lambda: run_engine(args, "static", workload),
               "transformers": lambda: run_hf(args, workload)}
    runs = {name: runners[name]() for name in args.systems}
    summary = {name: medians(paths) for name, paths in runs.items()}
    table = summarize(summary)
    print(table)
    report = {"config": vars(args) | {"out": str(args.out)}, "git": git_revision(), "machine": machine_info(None),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "medians": summary,
              "runs": {name: [str(p) for p in paths] for name, paths in runs.items()}}
    (args.out / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "summary.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
