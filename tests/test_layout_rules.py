"""Architecture rules a test can check: a CPU-only scheduler, fresh generated code, no pickle."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scheduler_imports_no_torch_or_transformers():
    code = (
        "import sys, scheduler_svc.app, scheduler_svc.engine, clients.cli, clients.client;"
        "bad = [m for m in ('torch', 'transformers', 'cupy') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"scheduler side imported {run.stdout.strip()} {run.stderr[-2000:]}"


def test_generated_proto_code_is_current(tmp_path):
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import generate
    finally:
        sys.path.remove(str(ROOT / "protos"))
    generate.generate(tmp_path)
    for name in ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"):
        fresh, committed = tmp_path / "omnibus/v1" / name, ROOT / "protos/omnibus/v1" / name
        assert filecmp.cmp(fresh, committed, shallow=False), f"{name} is stale: run python protos/generate.py"


def test_no_pickle_on_process_boundaries():
    for package in ("scheduler_svc", "worker_svc", "kernels", "clients"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for banned in ("send_pyobj", "recv_pyobj", "pickle.loads", "import pickle"):
                assert banned not in text, f"{path}: {banned}"
