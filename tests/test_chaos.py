"""Chaos and poison against the real scheduler (gRPC, engine, worker group, restarts) and a
worker process killed for real.

The worker is tests/context_worker.py: no model, a next token that depends on the whole context,
and a start in well under a second, so one test can kill it three times mid-run. Whether resumed
streams carry exactly the tokens of an undisturbed run is thus checked token by token; that the
real model resumes alike, greedy and seeded, is tests/test_worker_death.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from omnibus.v1 import generation_pb2 as pb
from tests.context_worker import CRASH_EXIT_CODE
from tests.hardening_support import write_tiny_model_dir
from tests.scripted_workers import VOCAB, reference_output
from tests.server_harness import ServerThread

CHAOS_SEED = 16
NUM_REQUESTS = 48
NUM_KILLS = 3
POISON = 2  # below the tokens the context worker samples (3 and up), so only a prompt has it


class ContextServerThread(ServerThread):
    """A real scheduler (gRPC, engine, worker group, restarts) in front of the context worker."""

    def __init__(self, model_dir: Path, num_kv_blocks: int = 1024, max_model_len: int = 4096,
                 step_delay_s: float = 0.002, worker_flags: list[str] | None = None, **options):
        super().__init__(model_dir, num_kv_blocks, heartbeat_timeout_s=3600.0, **options)  # no heartbeats
        self.max_model_len = max_model_len
        self.step_delay_s = step_delay_s
        self.worker_flags = worker_flags or []
        self.spawned: list[subprocess.Popen] = []  # every worker process, the dead ones too

    def _spawn(self, endpoint: str) -> list[subprocess.Popen]:
        command = [sys.executable, "-m", "tests.context_worker", "--scheduler", endpoint,
                   "--num-kv-blocks", str(self.num_kv_blocks), "--max-model-len", str(self.max_model_len),
                   "--step-delay-s", str(self.step_delay_s), "--parent-pid", str(os.getpid()), *self.worker_flags]
        self.processes = [subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1])]
        self.spawned += self.processes
        return self.processes


@dataclass(slots=True)
class Client:
    prompt: list[int]
    max_tokens: int
    cancel_after: int | None  # tokens after which the client cancels; None: it reads to the end
    tokens: list[int] = field(default_factory=list)
    error: grpc.RpcError | None = None
    cancelled: bool = False

    def run(self, stub) -> None:
        request = pb.GenerateRequest(prompt_token_ids=self.prompt,
                                     sampling=pb.SamplingParams(max_tokens=self.max_tokens, ignore_eos=True))
        call = stub.Generate(request, timeout=120)
        try:
            for response in call:
                self.tokens += response.token_ids
                if self.cancel_after is not None and len(self.tokens) >= self.cancel_after:
                    self.cancelled = True
                    call.cancel()
                    return
        except grpc.RpcError as error:
            if not self.cancelled:
                self.error = error


def metric(server: ContextServerThread, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def make_clients(rng: random.Random) -> list[Client]:
    clients = []
    for _ in range(NUM_REQUESTS):
        prompt = [rng.randrange(3, 3 + VOCAB) for _ in range(rng.randint(3, 60))]
        max_tokens = rng.randint(60, 200)
        cancel_after = rng.randint(1, max_tokens - 1) if rng.random() < 0.2 else None
        clients.append(Client(prompt, max_tokens, cancel_after))
    return clients


def run_clients(server: ContextServerThread, clients: list[Client]) -> list[threading.Thread]:
    stub = server.stub()
    threads = [threading.Thread(target=client.run, args=(stub,), daemon=True) for client in clients]
    for thread in threads:
        thread.start()
    return threads


def test_chaos_three_worker_kills_and_cancels_lose_no_token(tmp_path):
    rng = random.Random(CHAOS_SEED)
    server = ContextServerThread(write_tiny_model_dir(tmp_path), step_delay_s=0.01, metrics_port=0).start()
    try:
        # An undisturbed run through the same server agrees with the reference function.
        calm = make_clients(random.Random(CHAOS_SEED))
        for thread in run_clients(server, [c for c in calm if c.cancel_after is None][:8]):
            thread.join(120)
        assert all(c.tokens == reference_output(c.prompt, c.max_tokens) for c in calm if c.tokens)

        clients = make_clients(rng)
        started = time.monotonic()
        threads = run_clients(server, clients)
        kill_times = []
        for kill in range(NUM_KILLS):
            # A random moment once the worker killed last is back and every request it had has
            # sampled again: a kill while a suspect is on probation would rightly quarantine it
            # (the poison rule, tested below).
            back = lambda app, generation=kill + 1: (  # noqa: E731
                app.workers.generation == generation and app.workers.is_registered and app.engine.num_suspects == 0)
            wait_until(lambda: server.call(back), 30, "the worker is back and every suspect has sampled")
            time.sleep(rng.uniform(0.05, 0.4))
            assert server.call(lambda app: app.engine.num_active_requests) > 0, "the kill would hit an idle server"
            server.processes[0].send_signal(signal.SIGKILL)
            kill_times.append(time.monotonic() - started)
        for thread in threads:
            thread.join(120)
        elapsed = time.monotonic() - started
        wait_until(lambda: server.call(lambda app: app.engine.num_active_requests == 0), 10, "every request ended")
        pool = server.call(lambda app: (app.engine.scheduler.block_manager.num_free_blocks,
                                        app.engine.scheduler.block_manager.num_blocks,
                                        app.engine.scheduler.has_unfinished_requests()))
        recoveries = server.call(lambda app: list(app.engine.recoveries))
        restarts = metric(server, "omnibus_worker_restarts_total")
        quarantined = metric(server, "omnibus_quarantined_requests_total")
    finally:
        server.stop()

    errors = [(i, c.error.code(), c.error.details()) for i, c in enumerate(clients) if c.error is not None]
    assert not errors, f"streams saw errors: {errors}"
    finished = [c for c in clients if not c.cancelled]
    for i, client in enumerate(clients):
        expected = reference_output(client.prompt, client.max_tokens)
        if client.cancelled:
            assert client.tokens == expected[: len(client.tokens)], f"cancelled client {i} saw wrong tokens"
        else:
            assert client.tokens == expected, f"client {i} differs from the undisturbed run"
    assert pool == (pool[1], pool[1], False), "the KV pool did not end full"
    assert restarts == NUM_KILLS and quarantined == 0
    assert len(recoveries) == NUM_KILLS and all(r.num_resumed > 0 for r in recoveries)
    # Every worker that died was one this test killed.
    assert [p.returncode for p in server.spawned[:-1]] == [-signal.SIGKILL] * NUM_KILLS
    pauses = [f"{r.pause_s * 1000:.0f}" for r in recoveries]
    outages = [f"{(r.registered_at - r.lost_at):.2f}" for r in recoveries]
    print(f"\nchaos seed {CHAOS_SEED}: {NUM_REQUESTS} requests ({len(finished)} completed, "
          f"{NUM_REQUESTS - len(finished)} cancelled), {sum(len(c.tokens) for c in clients)} tokens "
          f"in {elapsed:.1f} s; "
          f"kills at {', '.join(f'{t:.2f}' for t in kill_times)} s; resumed {[r.num_resumed for r in recoveries]}; "
          f"loss to re-registration {outages} s; re-registration to first token {pauses} ms")


@pytest.mark.parametrize("fault", ["--crash-on-token", "--fail-on-token"])
def test_a_poison_request_fails_alone_with_internal_and_the_rest_complete(tmp_path, fault):
    server = ContextServerThread(write_tiny_model_dir(tmp_path), step_delay_s=0.004, metrics_port=0,
                                 worker_flags=[fault, str(POISON)]).start()
    try:
        rng = random.Random(7)
        clients = [Client([rng.randrange(3, 3 + VOCAB) for _ in range(12)], 40, None) for _ in range(6)]
        threads = run_clients(server, clients)
        wait_until(lambda: all(c.tokens for c in clients), 30, "every client has tokens")
        poison = Client([5, 6, POISON, 7], 40, None)
        poison.run(server.stub())
        for thread in threads:
            thread.join(120)
        quarantined = metric(server, "omnibus_quarantined_requests_total")
        exits = [p.returncode for p in server.spawned[:-1]]
    finally:
        server.stop()
    assert poison.error is not None and poison.error.code() == grpc.StatusCode.INTERNAL
    assert "two consecutive failed steps" in poison.error.details()
    assert all(c.error is None and c.tokens == reference_output(c.prompt, 40) for c in clients)
    assert quarantined == 1
    # Two failures, then none: a crashing worker was restarted twice and no more.
    assert exits == ([CRASH_EXIT_CODE] * 2 if fault == "--crash-on-token" else [])
