"""`python -m worker_svc` as a real subprocess against a ROUTER socket owned by the test.

Every wait is bounded, and the worker is killed on the way out whatever happens.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
import zmq
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from scheduler_svc import protocol
from scheduler_svc.protocol import CachedRequest, NewRequest, SamplingOptions, StepPlan
from worker_svc.model_store import model_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_ID = b"worker-0"
HEARTBEAT_ID = b"worker-0-hb"
GREEDY = SamplingOptions()
PROMPT_A = [5, 17, 99, 3, 42, 7, 250, 11, 64]
PROMPT_B = [200, 1, 33, 8, 19, 140, 77]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedModel]:
    """A random tiny Llama saved as a checkpoint directory `prepare_model` accepts."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(model_dir)
    # prepare_model validates that a checkpoint directory carries a tokenizer.
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    Tokenizer(WordLevel(vocab, unk_token="t0")).save(str(model_dir / "tokenizer.json"))
    return model_dir, model


def hf_greedy(model: transformers.PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


class Scheduler:
    """The test's side of the socket: a ROUTER that counts heartbeats while it waits."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.heartbeats = 0

    def send(self, message: protocol.StepPlan | protocol.Shutdown) -> None:
        self.router.send_multipart([WORKER_ID, protocol.encode(message)])

    def recv(self, proc: subprocess.Popen, timeout: float = 60.0):
        """The next non-heartbeat message from the worker; fails if it dies or stays silent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.router.poll(200):
                identity, frame = self.router.recv_multipart()
                message = protocol.decode_for_scheduler(frame)
                if isinstance(message, protocol.Heartbeat):
                    assert identity == HEARTBEAT_ID and message.pid == proc.pid
                    self.heartbeats += 1
                    continue
                assert identity == WORKER_ID
                return message
            assert proc.poll() is None, f"worker exited with {proc.returncode}"
        raise AssertionError(f"no message from the worker within {timeout}s")

    def count_heartbeats(self, proc: subprocess.Popen, seconds: float) -> int:
        """Listen for `seconds`, expecting nothing but heartbeats; returns how many came."""
        before = self.heartbeats
        with pytest.raises(AssertionError, match="no message"):
            self.recv(proc, timeout=seconds)
        return self.heartbeats - before

    def close(self) -> None:
        self.context.destroy(linger=0)


@pytest.fixture
def scheduler() -> Iterator[Scheduler]:
    sched = Scheduler()
    yield sched
    sched.close()


def start_worker(model_dir: Path, address: str, log_path: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "OMNIBUS_CACHE_DIR": str(log_path.parent / "cache")}
    cmd = [
        sys.executable, "-m", "worker_svc", "--scheduler", address, "--model", str(model_dir),
        "--device", "cpu", "--block-size", "4", "--num-kv-blocks", "40",
        "--heartbeat-interval", "0.1", "--num-threads", "1", *extra,
    ]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def worker(tiny_model, scheduler: Scheduler, tmp_path: Path) -> Iterator[subprocess.Popen]:
    log_path = tmp_path / "worker.log"
    proc = start_worker(tiny_model[0], scheduler.address, log_path)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.returncode not in (0, None):
            print(log_path.read_text())


def test_worker_serves_plans_survives_errors_and_shuts_down(tiny_model, scheduler, worker) -> None:
    model_dir, hf_model = tiny_model
    expected_a = hf_greedy(hf_model, PROMPT_A, 3)
    expected_b = hf_greedy(hf_model, PROMPT_B, 2)

    hello = scheduler.recv(worker)
    assert isinstance(hello, protocol.WorkerHello)
    assert (hello.protocol_version, hello.rank, hello.world_size, hello.pid) == (
        protocol.PROTOCOL_VERSION, 0, 1, worker.pid)
    assert (hello.num_kv_blocks, hello.block_size, hello.vocab_size) == (40, 4, 256)
    assert (hello.max_model_len, hello.device, hello.dtype) == (256, "cpu", "float32")
    assert hello.model_fingerprint == model_fingerprint(model_dir, "auto")

    # Step 0: A's whole prompt, B's first chunk (samples nothing).
    scheduler.send(StepPlan(0, [NewRequest("a", PROMPT_A, [12, 3, 30], 0, 9, GREEDY),
                                NewRequest("b", PROMPT_B, [7, 21], 0, 4, GREEDY)], [], []))
    result = scheduler.recv(worker)
    assert isinstance(result, protocol.StepResult)
    assert (result.step_id, result.rank, result.req_ids) == (0, 0, ["a"])
    assert result.token_ids == expected_a[:1] and result.execute_time_s > 0

    # Step 1: A decodes, B finishes its prompt.
    scheduler.send(StepPlan(1, [], [CachedRequest("a", [], 9, 1),
                                    CachedRequest("b", [], 4, 3)], []))
    result = scheduler.recv(worker)
    assert (result.step_id, result.req_ids) == (1, ["a", "b"])
    assert result.token_ids == [expected_a[1], expected_b[0]]

    # An unknown request is a scheduler bug: the worker reports it and keeps serving.
    scheduler.send(StepPlan(2, [], [CachedRequest("ghost", [], 0, 1)], []))
    error = scheduler.recv(worker)
    assert isinstance(error, protocol.WorkerError)
    assert error.step_id == 2 and "ghost" in error.message

    # So is a frame that is not a protocol message.
    scheduler.router.send_multipart([WORKER_ID, b"\x93not msgpack"])
    error = scheduler.recv(worker)
    assert isinstance(error, protocol.WorkerError) and error.step_id == -1

    scheduler.send(StepPlan(3, [], [CachedRequest("a", [], 10, 1),
                                    CachedRequest("b", [39], 7, 1)], []))
    result = scheduler.recv(worker)
    assert (result.step_id, result.req_ids) == (3, ["a", "b"])
    assert result.token_ids == [expected_a[2], expected_b[1]]

    # Heartbeats every 0.1 s keep arriving while the worker idles.
    assert scheduler.count_heartbeats(worker, 1.0) >= 5
    scheduler.send(StepPlan(4, [], [], ["a", "b"]))
    assert scheduler.recv(worker).req_ids == []

    scheduler.send(protocol.Shutdown(reason="test done"))
    assert worker.wait(timeout=15) == 0


def test_worker_exits_promptly_on_sigterm(scheduler, worker) -> None:
    assert isinstance(scheduler.recv(worker), protocol.WorkerHello)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0


def test_worker_registers_again_when_asked_and_forgets_its_requests(tiny_model, scheduler, worker) -> None:
    first = scheduler.recv(worker)
    scheduler.send(StepPlan(0, [NewRequest("a", PROMPT_A, [12, 3, 30], 0, 9, GREEDY)], [], []))
    assert scheduler.recv(worker).req_ids == ["a"]
    scheduler.send(protocol.Reregister(reason="scheduler restarted"))
    again = scheduler.recv(worker)
    assert isinstance(again, protocol.WorkerHello) and again == first
    # A new scheduler knows nothing of "a": neither does the worker any more.
    scheduler.send(StepPlan(0, [], [CachedRequest("a", [], 9, 1)], []))
    error = scheduler.recv(worker)
    assert isinstance(error, protocol.WorkerError) and "'a'" in error.message
    scheduler.send(StepPlan(1, [NewRequest("a", PROMPT_A, [5, 6, 7], 0, 9, GREEDY)], [], []))
    assert scheduler.recv(worker).token_ids == hf_greedy(tiny_model[1], PROMPT_A, 1)


class RankRouter:
    """The test's ROUTER for a two-rank tensor-parallel group: one plan to every rank, replies
    read per rank (heartbeats skipped)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.router = scheduler.router
        self.address = scheduler.address
        self.pending: dict[bytes, list] = {b"worker-0": [], b"worker-1": []}

    def send(self, rank: int, message) -> None:
        self.router.send_multipart([f"worker-{rank}".encode(), protocol.encode(message)])

    def recv(self, rank: int, procs: list[subprocess.Popen], timeout: float = 120.0):
        identity = f"worker-{rank}".encode()
        deadline = time.monotonic() + timeout
        while not self.pending[identity]:
            assert time.monotonic() < deadline, f"no message from rank {rank} within {timeout}s"
            if self.router.poll(200):
                sender, frame = self.router.recv_multipart()
                message = protocol.decode_for_scheduler(frame)
                if not isinstance(message, protocol.Heartbeat):
                    self.pending[sender].append(message)
            assert procs[rank].poll() is None or self.pending[identity], f"rank {rank} exited"
        return self.pending[identity].pop(0)


@pytest.fixture
def two_ranks(tiny_model, scheduler: Scheduler, tmp_path: Path) -> Iterator[tuple[RankRouter, list[subprocess.Popen]]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        rendezvous = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    procs = [start_worker(tiny_model[0], scheduler.address, tmp_path / f"rank{rank}.log",
                          ("--rank", str(rank), "--world-size", "2", "--dist-init-method", rendezvous))
             for rank in range(2)]
    try:
        yield RankRouter(scheduler), procs
    finally:
        for rank, proc in enumerate(procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            print(f"--- rank {rank} ---\n" + (tmp_path / f"rank{rank}.log").read_text()[-3000:])


def test_tensor_parallel_ranks_agree_on_tokens_and_a_failed_step_ends_both(tiny_model, two_ranks) -> None:
    router, procs = two_ranks
    hellos = [router.recv(rank, procs) for rank in range(2)]
    assert [(h.rank, h.world_size) for h in hellos] == [(0, 2), (1, 2)]
    # Each rank's pool holds its one KV head of the two: half the bytes per block of one worker.
    assert hellos[0].kv_bytes_per_block == hellos[1].kv_bytes_per_block == 2 * 2 * 4 * 1 * 16 * 4
    expected = hf_greedy(tiny_model[1], PROMPT_A, 3)
    plan = StepPlan(0, [NewRequest("a", PROMPT_A, [12, 3, 30], 0, 9, GREEDY)], [], [])
    for step in range(3):
        for rank in range(2):
            router.send(rank, plan)
        results = [router.recv(rank, procs) for rank in range(2)]
        assert [r.token_ids for r in results] == [[expected[step]]] * 2, f"step {step}"
        plan = StepPlan(step + 1, [], [CachedRequest("a", [], 9 + step, 1)], [])
    # A plan the ranks disagree with fails on each; a rank does not go on after a failed step.
    bad = StepPlan(9, [], [CachedRequest("unknown", [], 5, 1)], [])
    for rank in range(2):
        router.send(rank, bad)
    for rank in range(2):
        assert isinstance(router.recv(rank, procs), protocol.WorkerError)
        assert procs[rank].wait(30) == 1


def test_a_tensor_parallel_rank_asked_to_register_again_exits(two_ranks) -> None:
    router, procs = two_ranks
    for rank in range(2):
        router.recv(rank, procs)
    router.send(1, protocol.Reregister(reason="scheduler restarted"))
    assert procs[1].wait(30) == 1
