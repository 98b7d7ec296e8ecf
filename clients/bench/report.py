"""The printed table and the result JSON (configuration, revision, machine, metrics, records)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from clients.bench.metrics import BenchmarkMetrics, Distribution, RequestRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
WIDTH = 56
LATENCY_ROWS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2el_ms"))


def format_table(metrics: BenchmarkMetrics, title: str = "Omnibus Benchmark Result") -> str:
    """A fixed-width table in the spirit of vLLM's benchmark_serving printout."""
    rows = [
        ("Successful requests", f"{metrics.completed}"),
        ("Failed requests", f"{metrics.failed}"),
        ("Benchmark duration (s)", f"{metrics.duration_s:.2f}"),
        ("Total input tokens", f"{metrics.total_input_tokens}"),
        ("Total generated tokens", f"{metrics.total_output_tokens}"),
        ("Request throughput (req/s)", f"{metrics.request_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{metrics.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{metrics.total_token_throughput:.2f}"),
    ]
    lines = [f" {title} ".center(WIDTH, "=")]
    lines += [f"{name + ':':<40}{value:>{WIDTH - 40}}" for name, value in rows]
    lines.append(" Latency (ms) ".center(WIDTH, "-"))
    lines.append(f"{'':<16}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for name, attr in LATENCY_ROWS:
        d: Distribution = getattr(metrics, attr)
        lines.append(f"{name:<16}{d.mean:>10.2f}{d.median:>10.2f}{d.p90:>10.2f}{d.p99:>10.2f}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def build_result(config: dict, model_info, metrics: BenchmarkMetrics, records: list[RequestRecord]) -> dict:
    """Everything needed to compare or re-plot a run later. model_info: the server's ModelInfo."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": json_safe(config),
        "git": git_revision(),
        "machine": machine_info(model_info),
        "metrics": asdict(metrics),
        "requests": [asdict(record) for record in records],
    }


def write_result(path: str | Path, result: dict) -> None:
    """Strict JSON (no NaN or Infinity), so tools other than Python's json module can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")


def read_records(result: dict) -> list[RequestRecord]:
    """The per-request records of a result loaded from JSON."""
    return [RequestRecord(**record) for record in result["requests"]]


def git_revision() -> dict:
    """HEAD of the checkout this code runs from, and whether it has uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            run = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return run.stdout.strip() if run.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def machine_info(model_info) -> dict:
    """The client machine, and the server as its GetModelInfo describes itself (device included)."""
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "server": MessageToDict(model_info, preserving_proto_field_name=True) if model_info is not None else None,
    }


def json_safe(value):
    """`value` as strict JSON can hold it: non-finite floats (argparse holds --request-rate inf)
    become strings, callables in a dict (a subcommand's handler) are dropped, other objects become
    their str()."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
