"""Throughput and latency vs request rate, continuous vs static batching, on one workload.

Each policy is served once; the same seeded workload is replayed at every rate (gamma arrivals,
Poisson by default). The result JSONs feed `python -m clients.bench.plots`.

    python -m benchmarks.rate_sweep --rates 0.25 0.5 1 inf --out bench_results/sweep
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from benchmarks.compare_batching import save_seeded_workload, served


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0, float("inf")])
    parser.add_argument("--policies", nargs="+", default=["continuous", "static"])
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", default="16:128")
    parser.add_argument("--output-len", default="16:64")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=50092)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("bench_results/sweep"))
    return parser.parse_args(argv)


def sweep(args: argparse.Namespace, scheduling: str, workload: Path) -> list[Path]:
    """Serve one policy and replay the workload once at every rate."""
    results = []
    with served(args, scheduling) as target:
        for rate in args.rates:
            result = args.out / f"{scheduling}-rate{rate:g}.json"
            subprocess.run([sys.executable, "-m", "clients.bench", "--target", target,
                            "--workload-file", str(workload), "--request-rate", f"{rate:g}", "--seed", str(args.seed),
                            "--label", scheduling, "--no-progress", "--result-json", str(result)], check=True)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workload = save_seeded_workload(args)
    for scheduling in args.policies:
        sweep(args, scheduling, workload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
