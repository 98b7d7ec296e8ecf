"""Health transitions and graceful drain, against live processes on loopback.

SIGTERM: readiness turns NOT_SERVING, new requests get UNAVAILABLE, the stream in flight finishes
normally, and scheduler and worker exit 0. A drain that times out ends the rest with UNAVAILABLE;
an engine that stops making progress turns NOT_SERVING until it moves again.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnibus.v1 import generation_pb2_grpc as pb_grpc
from tests.server_harness import ServerThread, greedy_request
from tests.test_cli import OMNIBUS, LoggedProcess, free_port, worker_pids

pytestmark = pytest.mark.model

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = "omnibus.v1.Generation"


def health_status(channel: grpc.Channel, service: str = READINESS) -> int | None:
    """The service's status, or None while the server does not answer."""
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
    except grpc.RpcError:
        return None


def wait_for_status(channel: grpc.Channel, wanted: int, timeout_s: float) -> list[int | None]:
    """Poll until `wanted`; returns every status seen, answers that changed only."""
    seen: list[int | None] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = health_status(channel)
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == wanted:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"health never became {wanted}; saw {seen}")


def test_sigterm_drains_the_stream_in_flight_then_exits(model_dir):
    port = free_port()
    server = LoggedProcess([*OMNIBUS, "serve", "--port", str(port), "--model", str(model_dir), "--device", "cpu",
                            "--num-threads", "1",
                            "--num-kv-blocks", "64", "--metrics-port", "0", "--drain-timeout", "400"])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        seen = wait_for_status(channel, SERVING, timeout_s=180)
        answered = [status for status in seen if status is not None]
        assert answered[0] == NOT_SERVING, f"health should be NOT_SERVING until the worker registers: {seen}"
        assert health_status(channel, service="") == SERVING
        [worker] = worker_pids(server.process.pid)
        stub = pb_grpc.GenerationStub(channel)
        request = greedy_request([1, 504, 3458, 282], max_tokens=80)
        request.request_id = "drain-me"
        call = stub.Generate(request, timeout=300)
        first = next(call)
        server.process.send_signal(signal.SIGTERM)
        wait_for_status(channel, NOT_SERVING, timeout_s=10)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(greedy_request([1, 2, 3], max_tokens=2), timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(call)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 80
        assert rest[-1].usage.completion_tokens == 80 and rest[-1].request_id == "drain-me"
        assert server.process.wait(60) == 0, server.output()[-3000:]
        time.sleep(0.5)
        assert not Path(f"/proc/{worker}").exists() or "zombie" in Path(f"/proc/{worker}/status").read_text().lower()
        done = [line for line in server.lines if "request done" in line and "request_id=drain-me" in line]
        assert len(done) == 1 and "status=FINISHED_LENGTH" in done[0] and "output_tokens=80" in done[0], done
    finally:
        channel.close()
        server.kill()


@pytest.fixture
def server(model_dir):
    running = ServerThread(model_dir, num_kv_blocks=64, metrics_port=0, stall_timeout_s=1.0).start()
    yield running
    running.stop()


def test_drain_timeout_ends_the_rest_with_unavailable(server):
    stub = server.stub()
    call = stub.Generate(greedy_request([1, 2, 3, 4], max_tokens=900), timeout=300)
    next(call)
    draining = server.call_async(lambda app: app.drain(timeout_s=0.5))
    with pytest.raises(grpc.RpcError) as ended:
        list(call)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in ended.value.details()
    draining.result(60)
    assert server.processes[0].wait(30) == 0, "the worker should exit on the scheduler's Shutdown"


def test_stalled_engine_is_not_serving_until_it_moves_again(server):
    channel = server.channel()
    assert health_status(channel) == SERVING
    call = server.stub().Generate(greedy_request([1, 2, 3, 4], max_tokens=60), timeout=300)
    next(call)
    worker = server.processes[0]
    worker.send_signal(signal.SIGSTOP)
    try:
        wait_for_status(channel, NOT_SERVING, timeout_s=10)
    finally:
        worker.send_signal(signal.SIGCONT)
    wait_for_status(channel, SERVING, timeout_s=10)
    assert list(call)[-1].usage.completion_tokens == 60


def test_drain_delay_is_a_lame_duck_period_that_still_serves(model_dir):
    server = ServerThread(model_dir, num_kv_blocks=64, metrics_port=0, drain_delay_s=2.0).start()
    channel = server.channel()
    try:
        stub = server.stub()
        call = stub.Generate(greedy_request([1, 2, 3, 4], max_tokens=30), timeout=300)
        next(call)
        draining = server.call_async(lambda app: app.drain(timeout_s=120))
        wait_for_status(channel, NOT_SERVING, timeout_s=1.0)
        # Not ready, yet still serving: a balancer that has not noticed loses no request.
        late = list(stub.Generate(greedy_request([5, 6, 7], max_tokens=2), timeout=60))
        assert late[-1].usage.completion_tokens == 2
        time.sleep(2.0)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(greedy_request([5, 6, 7], max_tokens=2), timeout=60))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sum(len(r.token_ids) for r in call) == 29  # the stream in flight completes
        draining.result(60)
    finally:
        channel.close()
        server.stop()


def test_serve_exits_non_zero_when_its_worker_dies_past_its_restart_budget(model_dir):
    port = free_port()
    server = LoggedProcess([*OMNIBUS, "serve", "--port", str(port), "--model", str(model_dir), "--device", "cpu",
                            "--num-threads", "1", "--max-worker-restarts", "0",
                            "--num-kv-blocks", "64", "--metrics-port", "0"])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        wait_for_status(channel, SERVING, timeout_s=180)
        [worker] = worker_pids(server.process.pid)
        os.kill(worker, signal.SIGKILL)
        # A supervisor (compose's restart policy) can only restart what exits.
        assert server.process.wait(30) == 1, server.output()[-3000:]
        assert any("engine is dead" in line and "restarted 0 time(s)" in line for line in server.lines), \
            server.output()[-3000:]
    finally:
        channel.close()
        server.kill()
