"""Issue 16, item 3: the worker link authenticated and encrypted with ZeroMQ CURVE.

`omnibus keygen` writes the key layout of scheduler_svc/worker_link_security.py with private
modes; a keyed scheduler gives a peer without keys, or with keys it does not hold, neither a
registration nor a plan, while a worker with its keys registers and serves (raw DEALERs against a
WorkerGroup, then the real worker process behind a real server); and a worker link that other
machines could reach is refused without keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from benchmarks.null_worker import null_hello
from clients.cli import main as omnibus
from scheduler_svc import protocol
from scheduler_svc.worker_group import WorkerGroup, WorkerRegistrationError
from scheduler_svc.worker_link_security import (
    WorkerKeys,
    WorkerLinkError,
    generate_keys,
    is_local_endpoint,
    load_scheduler_keys,
    load_worker_keys,
    private_worker_endpoint,
    secure_worker_socket,
)
from tests.server_harness import ServerThread, collect_tokens, greedy_request

ROOT = Path(__file__).resolve().parents[1]
STRANGER_WAIT_S = 1.5  # long enough for a CURVE handshake on loopback, many times over


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("link") / "keys"
    generate_keys(directory)
    return directory


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory) -> Path:
    """A second, unrelated key set: what a stranger who ran keygen himself holds."""
    directory = tmp_path_factory.mktemp("other") / "keys"
    generate_keys(directory)
    return directory


# keygen: the layout and its modes.

def test_keygen_writes_the_documented_layout_with_private_modes(tmp_path, capsys):
    directory = tmp_path / "keys"
    assert omnibus(["keygen", str(directory), "--workers", "2"]) == 0
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    assert files == ["scheduler.key", "scheduler.key_secret", "workers/worker-0.key", "workers/worker-0.key_secret",
                     "workers/worker-1.key", "workers/worker-1.key_secret"]
    assert mode(directory) == mode(directory / "workers") == 0o700
    for secret in directory.rglob("*.key_secret"):
        assert mode(secret) == 0o600, secret
    assert "wrote" in capsys.readouterr().out
    scheduler = load_scheduler_keys(directory)
    worker = load_worker_keys(directory, 1)
    assert worker.scheduler_public_key == scheduler.public_key
    assert scheduler.allowed_workers == {worker.public_key, load_worker_keys(directory, 0).public_key}


def test_keygen_keeps_existing_pairs_and_adds_missing_ones(tmp_path):
    directory = tmp_path / "keys"
    generate_keys(directory)
    secret = (directory / "scheduler.key_secret").read_text()
    result = generate_keys(directory, num_workers=2)
    assert (directory / "scheduler.key_secret").read_text() == secret
    assert [p.name for p in result.written] == ["worker-1.key", "worker-1.key_secret"]
    assert len(result.kept) == 4


def test_keygen_refuses_a_directory_others_can_open(tmp_path):
    tmp_path.chmod(0o755)
    with pytest.raises(WorkerLinkError, match="accessible by other users"):
        generate_keys(tmp_path)
    assert not list(tmp_path.iterdir())


def test_an_unprotected_or_missing_secret_is_refused(tmp_path):
    directory = tmp_path / "keys"
    generate_keys(directory)
    (directory / "workers" / "worker-0.key_secret").chmod(0o644)
    with pytest.raises(WorkerLinkError, match="chmod 600"):
        load_worker_keys(directory, 0)
    with pytest.raises(WorkerLinkError, match="worker-3.key_secret does not exist"):
        load_worker_keys(directory, 3)
    (directory / "workers" / "worker-0.key").unlink()
    with pytest.raises(WorkerLinkError, match="no worker public keys"):
        load_scheduler_keys(directory)


# The bind rule: without keys, only where no other machine can connect.

@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5557", True), ("tcp://127.0.0.2:0", True), ("tcp://[::1]:5557", True),
    ("tcp://localhost:5557", True), ("ipc:///tmp/x/worker.sock", True), ("inproc://link", True),
    ("tcp://0.0.0.0:5557", False), ("tcp://*:5557", False), ("tcp://10.1.2.3:5557", False),
    ("tcp://eth0:5557", False), ("tcp://[::]:5557", False), ("ws://127.0.0.1:5557", False),
])
def test_which_endpoints_are_local(endpoint, local):
    assert is_local_endpoint(endpoint) is local


def test_a_non_loopback_bind_without_keys_is_refused_unless_insecure(caplog):
    with pytest.raises(WorkerLinkError, match="refusing to bind the worker link to tcp://0.0.0.0:0 without keys"):
        WorkerGroup("tcp://0.0.0.0:0")
    with caplog.at_level(logging.WARNING):
        group = WorkerGroup("tcp://0.0.0.0:0", insecure=True)
    group.close()
    assert "INSECURE WORKER LINK" in caplog.text


def test_the_scheduler_command_refuses_before_preparing_any_model():
    result = subprocess.run([sys.executable, "-m", "clients.cli", "scheduler", "--model", "/nonexistent",
                             "--worker-bind", "tcp://0.0.0.0:0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "refusing to bind the worker link" in result.stderr and "omnibus keygen" in result.stderr


def test_a_worker_with_a_missing_key_fails_before_loading_a_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "worker_svc", "--scheduler", "tcp://127.0.0.1:1",
                             "--model", "/nonexistent", "--worker-keys", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "worker-0.key_secret does not exist" in result.stderr and "Traceback" not in result.stderr


# A WorkerGroup, keyed or not, against raw DEALERs.

class Peer:
    """A DEALER speaking the worker protocol, with or without CURVE keys."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, keys: WorkerKeys | None):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, b"worker-0")
        self.socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            secure_worker_socket(self.socket, keys)
        self.socket.connect(endpoint)

    async def register(self) -> None:
        await self.socket.send(protocol.encode(null_hello(64, 16, 1024)))

    async def received_anything(self, wait_s: float) -> bool:
        return await self.socket.poll(int(wait_s * 1000)) != 0


@contextlib.asynccontextmanager
async def group_and_context(keys_dir: Path | None, endpoint: str = "tcp://127.0.0.1:0"):
    workers = WorkerGroup(endpoint, heartbeat_timeout_s=60.0,
                          keys=None if keys_dir is None else load_scheduler_keys(keys_dir))
    context = zmq.asyncio.Context()
    try:
        await workers.start()
        yield workers, context
    finally:
        workers.close()
        context.destroy(linger=0)


def unknown_worker_key(keys: Path, other_keys: Path) -> WorkerKeys:
    """A worker pair this scheduler does not hold, aimed at this scheduler's public key."""
    other = load_worker_keys(other_keys, 0)
    return WorkerKeys(other.public_key, other.secret_key, load_worker_keys(keys, 0).scheduler_public_key)


def wrong_scheduler_key(keys: Path, other_keys: Path) -> WorkerKeys:
    """Our own worker pair, but a scheduler public key that is not this scheduler's."""
    real = load_worker_keys(keys, 0)
    return WorkerKeys(real.public_key, real.secret_key, load_worker_keys(other_keys, 0).scheduler_public_key)


async def test_the_private_endpoint_of_serve_is_an_ipc_socket_only_its_user_can_open():
    with private_worker_endpoint() as endpoint:
        directory = Path(endpoint.removeprefix("ipc://")).parent
        assert endpoint.startswith("ipc://") and mode(directory) == 0o700
        async with group_and_context(None, endpoint) as (workers, context):
            peer = Peer(context, workers.endpoint, None)
            await peer.register()
            await workers.wait_registered(10)
    assert not directory.exists()


async def test_a_plain_peer_registers_on_an_unkeyed_link():
    """The control: without keys the same stranger does register (so the keyed tests can fail)."""
    async with group_and_context(None) as (workers, context):
        peer = Peer(context, workers.endpoint, None)  # kept: a collected socket closes unsent
        await peer.register()
        await workers.wait_registered(STRANGER_WAIT_S * 4)


@pytest.mark.parametrize("stranger", ["no keys", "unknown worker key", "wrong scheduler key"])
async def test_strangers_cannot_register_or_see_a_plan_and_the_keyed_worker_serves(keys, other_keys, stranger):
    stranger_keys = {"no keys": None, "unknown worker key": unknown_worker_key(keys, other_keys),
                     "wrong scheduler key": wrong_scheduler_key(keys, other_keys)}[stranger]
    async with group_and_context(keys) as (workers, context):
        intruder = Peer(context, workers.endpoint, stranger_keys)
        await intruder.register()
        with pytest.raises(WorkerRegistrationError, match="0 of 1 workers registered"):
            await workers.wait_registered(STRANGER_WAIT_S)
        assert workers.num_dropped_frames == 0  # nothing of it was even delivered
        worker = Peer(context, workers.endpoint, load_worker_keys(keys, 0))
        await worker.register()
        [hello] = await workers.wait_registered(10)
        assert hello.pid == null_hello(64, 16, 1024).pid
        step = asyncio.ensure_future(workers.execute(protocol.StepPlan(7, [], [], [])))
        plan = protocol.decode_for_worker((await asyncio.wait_for(worker.socket.recv_multipart(), 10))[-1])
        await worker.socket.send(protocol.encode(protocol.StepResult(plan.step_id, 0, [], [], 0.0)))
        assert (await asyncio.wait_for(step, 10)).step_id == 7
        assert not await intruder.received_anything(0.2)
        assert workers.dead_reason is None
        # Only a CURVE client aimed at our key reaches the key check; the others fail the handshake.
        assert (workers.curve.num_refused_handshakes >= 1) is (stranger == "unknown worker key")


# The real worker process behind a real server, keyed end to end.

@pytest.mark.model
def test_the_real_worker_serves_over_a_keyed_link(model_dir, keys):
    """Both of the worker's sockets are keyed: its plans' and its heartbeats' (with a short
    heartbeat timeout, blocked heartbeats would end the group within the pause below)."""
    server = ServerThread(model_dir, num_kv_blocks=32, worker_keys=keys, heartbeat_timeout_s=2.0,
                          worker_args=["--worker-keys", str(keys), "--heartbeat-interval", "0.2"]).start()
    try:
        assert server.app.workers.curve is not None
        tokens, _, last = collect_tokens(server.stub(), greedy_request([1, 2, 3, 4], max_tokens=4))
        assert len(tokens) == 4 and last.usage.completion_tokens == 4
        time.sleep(3.0)
        assert server.call(lambda app: app.workers.dead_reason) is None
        assert collect_tokens(server.stub(), greedy_request([1, 2, 3, 4], max_tokens=4))[0] == tokens
    finally:
        server.stop()
