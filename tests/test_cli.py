"""The `omnibus` command as a user runs it: serve, generate, Ctrl-C; scheduler and worker apart."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]
OMNIBUS = [sys.executable, "-m", "clients.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoggedProcess:
    """A child process whose combined output is collected by a thread, so waits can read it."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in the output:\n{''.join(self.lines)[-3000:]}")

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def worker_pids(parent_pid: int) -> list[int]:
    children = Path(f"/proc/{parent_pid}/task/{parent_pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def generate(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*OMNIBUS, "generate", *args, "--target", f"127.0.0.1:{port}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_serve_generate_and_ctrl_c(model_dir):
    port = free_port()
    server = LoggedProcess([*OMNIBUS, "serve", "--port", str(port), "--model", str(model_dir),
                            "--device", "cpu", "--num-kv-blocks", "64", "--num-threads", "1"])
    try:
        server.wait_for("ready: serving", timeout_s=180)
        workers = worker_pids(server.process.pid)
        assert len(workers) == 1
        result = generate(port, "The capital of France is", "--max-tokens", "8", "--ignore-eos")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip(), "no text was streamed"
        assert "8 completion tokens" in result.stderr and "tokens/s" in result.stderr
        bad = generate(port, "Hello", "--top-p", "2")
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "sampling.top_p" in bad.stderr
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(30) == 0, server.output()[-3000:]
        time.sleep(0.5)
        assert not Path(f"/proc/{workers[0]}").exists() or "zombie" in Path(f"/proc/{workers[0]}/status").read_text().lower()
    finally:
        server.kill()


def test_scheduler_and_worker_run_apart(model_dir):
    port, worker_port = free_port(), free_port()
    scheduler = LoggedProcess([*OMNIBUS, "scheduler", "--port", str(port), "--model", str(model_dir),
                               "--worker-bind", f"tcp://127.0.0.1:{worker_port}"])
    worker = None
    try:
        scheduler.wait_for("waiting for 1 worker", timeout_s=60)
        worker = LoggedProcess([*OMNIBUS, "worker", "--scheduler", f"tcp://127.0.0.1:{worker_port}",
                                "--model", str(model_dir), "--device", "cpu", "--num-kv-blocks", "32"])
        scheduler.wait_for("ready: serving", timeout_s=180)
        result = generate(port, "One, two,", "--max-tokens", "4", "--ignore-eos")
        assert result.returncode == 0 and "4 completion tokens" in result.stderr, result.stderr
        scheduler.process.send_signal(signal.SIGTERM)
        assert scheduler.process.wait(30) == 0
        assert worker.process.wait(30) == 0, "the worker should exit on the scheduler's Shutdown"
    finally:
        scheduler.kill()
        if worker is not None:
            worker.kill()
