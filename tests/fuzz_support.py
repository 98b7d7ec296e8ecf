"""What the fuzz tests (tests/test_fuzz_*.py) share: their server's size and the check that fuzzing
left it as it found it (serving, nothing unfinished, every KV block free)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server_harness import ServerThread, collect_tokens, greedy_request

FUZZ_KV_BLOCKS = 64  # 1024 tokens: small, so that a prompt past the pool is cheap to draw
# What a request the server refuses may answer: the client's fault, a bound, or a full queue.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def start_fuzz_server(model_dir) -> ServerThread:
    return ServerThread(model_dir, num_kv_blocks=FUZZ_KV_BLOCKS).start()


def pool_state(server: ServerThread) -> tuple[int, int, int, int]:
    """(unfinished requests, free KV blocks, pool size, swapped-out requests), read on the server's loop."""

    def read(app):
        scheduler = app.engine.scheduler
        manager = scheduler.block_manager
        return len(scheduler.requests), manager.num_free_blocks, manager.num_blocks, scheduler.swap_pool.num_requests

    return server.call(read)


def assert_unharmed(server: ServerThread, timeout_s: float = 30) -> None:
    """The server is SERVING, holds no request and no KV block, and still generates."""
    deadline = time.monotonic() + timeout_s
    state = pool_state(server)
    while state[0] and time.monotonic() < deadline:  # a cancelled stream's request ends at the next step
        time.sleep(0.05)
        state = pool_state(server)
    unfinished, free, total, swapped = state
    assert (unfinished, swapped) == (0, 0), f"{unfinished} requests unfinished, {swapped} swapped out after fuzzing"
    assert free == total, f"{total - free} of {total} KV blocks leaked"
    with server.channel() as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    tokens, _, last = collect_tokens(server.stub(), greedy_request([1, 2, 3], max_tokens=2), timeout_s=60)
    assert len(tokens) == 2 and last.usage.completion_tokens == 2
