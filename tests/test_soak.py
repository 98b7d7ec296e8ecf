"""benchmarks/soak.py at a small size: its checks (no failure but cancels and deadlines, a full KV
pool at the end, flat RSS) pass and its report holds what it promises. The 2,000-request soak is
the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_small_soak_passes_its_checks(tmp_path, model_dir):
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "benchmarks.soak", "--requests", "200", "--rss-samples", "5",
               "--model", str(model_dir), "--result-json", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    outcomes = result["outcomes"]
    assert outcomes["failed"] == [] and outcomes["completed"] > 0
    assert outcomes["completed"] + outcomes["cancelled"] + outcomes["deadline_exceeded"] == 200
    assert outcomes["cancelled"] > 0 and outcomes["deadline_exceeded"] > 0
    assert all(result["checks"].values()) and len(result["rss"]) == 5
