"""PNG plots from result JSONs: throughput against request rate, and latency CDFs.

    python -m clients.bench.plots results/*.json --out plots/
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from clients.bench.metrics import itls, latency, tpot, ttft
from clients.bench.report import read_records

CDF_METRICS = (("TTFT", lambda r: [ttft(r)]), ("TPOT", lambda r: [t] if (t := tpot(r)) is not None else []),
               ("E2E latency", lambda r: [latency(r)]), ("ITL", itls))


def load_results(paths: list[str | Path]) -> list[dict]:
    """Result JSONs, each with its file name kept under "path"."""
    return [{**json.loads(Path(p).read_text()), "path": str(p)} for p in paths]


def plot_throughput_vs_rate(results: list[dict], out: Path) -> Path:
    """Output token and request throughput against the offered request rate, one line per label.
    An infinite rate (all requests at once) is drawn right of the largest finite rate."""
    import matplotlib.pyplot as plt

    rates = sorted({_rate(r) for r in results})
    finite = [x for x in rates if math.isfinite(x)]
    inf_x = 2 * max(finite) if finite else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, runs in _by_label(results).items():
        runs = sorted(runs, key=_rate)
        xs = [_rate(r) if math.isfinite(_rate(r)) else inf_x for r in runs]
        axes[0].plot(xs, [r["metrics"]["output_throughput"] for r in runs], marker="o", label=label)
        axes[1].plot(xs, [r["metrics"]["request_throughput"] for r in runs], marker="o", label=label)
    ticks = finite + ([inf_x] if len(finite) < len(rates) else [])
    for ax, ylabel in zip(axes, ("output tokens/s", "requests/s")):
        ax.set_xticks(ticks, [f"{x:g}" for x in finite] + (["inf"] if len(ticks) > len(finite) else []))
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, out / "throughput_vs_rate.png")


def plot_latency_cdfs(results: list[dict], out: Path) -> Path:
    """Empirical CDFs of TTFT, TPOT, E2E latency and ITL (ms, log scale), one line per result file."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CDF_METRICS), figsize=(4.5 * len(CDF_METRICS), 4))
    for result in results:
        records = [r for r in read_records(result) if r.success]
        name = f"{_label(result)} @ {_rate(result):g}/s"
        for ax, (metric, values_of) in zip(axes, CDF_METRICS):
            values = np.sort([v * 1000 for r in records for v in values_of(r)])
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=name)
    for ax, (metric, _) in zip(axes, CDF_METRICS):
        ax.set_xscale("log")  # latencies under load span orders of magnitude
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("fraction of requests" if metric != "ITL" else "fraction of gaps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, out / "latency_cdf.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.bench.plots", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="result JSONs written by omnibus bench --result-json")
    parser.add_argument("--out", default=".", help="directory for the PNGs")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(args.results)
    for path in (plot_throughput_vs_rate(results, out), plot_latency_cdfs(results, out)):
        print(path)
    return 0


def _rate(result: dict) -> float:
    return float(result["config"].get("request_rate", "inf"))


def _label(result: dict) -> str:
    return result["config"].get("label") or Path(result["path"]).stem


def _by_label(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        groups[_label(result)].append(result)
    return groups


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
