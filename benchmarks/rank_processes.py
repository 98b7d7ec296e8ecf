"""Spawned torch.distributed ranks for benchmarks and tests: a free rendezvous port, and a wait
that never hangs on a broken group."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_or_kill(procs: list, timeout_s: float) -> None:
    """Wait for every rank (multiprocessing.Process); as soon as one fails (the others would block
    in a collective) or the time is up, kill the rest."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
