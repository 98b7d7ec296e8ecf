"""A worker that dies mid-generation is restarted and its streams resume with the very tokens an
undisturbed run gives (greedy and seeded); past --max-worker-restarts the streams end with
UNAVAILABLE and health stays NOT_SERVING."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnibus.v1 import generation_pb2 as pb
from tests.server_harness import ServerThread, collect_tokens

pytestmark = pytest.mark.model

SERVICE = "omnibus.v1.Generation"
REQUESTS = [
    pb.GenerateRequest(prompt="Tell me a story.", sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True)),
    pb.GenerateRequest(prompt="The capital of France is",
                       sampling=pb.SamplingParams(max_tokens=24, temperature=0.9, seed=1234, ignore_eos=True)),
    pb.GenerateRequest(prompt="def fibonacci(n):", sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True)),
]


def health_status(health: health_pb2_grpc.HealthStub) -> int:
    return health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status


def wait_for_health(health, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while health_status(health) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        time.sleep(0.05)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def read_to_the_end(calls, streamed: list[list[int]], timeout_s: float) -> None:
    """Append the rest of each stream's tokens to its list, reading all of them at once."""
    readers = [threading.Thread(target=lambda c=call, s=out: s.extend(t for r in c for t in r.token_ids))
               for call, out in zip(calls, streamed)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout_s)


def test_a_killed_worker_is_restarted_and_streams_resume_then_past_the_budget_they_fail(model_dir):
    server = ServerThread(model_dir, num_kv_blocks=128, metrics_port=0, max_worker_restarts=1).start()
    try:
        stub = server.stub()
        health = health_pb2_grpc.HealthStub(server.channel())
        undisturbed = [collect_tokens(stub, request)[0] for request in REQUESTS]

        calls = [stub.Generate(request, timeout=120) for request in REQUESTS]
        streamed = [list(next(call).token_ids) for call in calls]  # all three are generating
        server.processes[0].send_signal(signal.SIGKILL)
        wait_for_health(health, health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=5)
        read_to_the_end(calls, streamed, timeout_s=120)
        assert streamed == undisturbed, "a resumed stream differs from the undisturbed run"
        assert health_status(health) == health_pb2.HealthCheckResponse.SERVING
        recovery = server.call(lambda app: app.engine.recoveries[-1])
        print(f"resume pause: {recovery.pause_s:.3f} s after the worker registered again")
        assert recovery.num_resumed == 3
        assert metric(server.app.metrics_port, "omnibus_worker_restarts_total") == 1
        assert metric(server.app.metrics_port, "omnibus_resumed_requests_total") == 3

        # The budget (one restart in 10 minutes) is spent: the next death ends the streams.
        call = stub.Generate(pb.GenerateRequest(prompt="Again.", sampling=pb.SamplingParams(
            max_tokens=1000, ignore_eos=True)), timeout=60)
        next(call)
        server.processes[0].send_signal(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            list(call)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "restarted 1 time(s) within 10 minutes" in error.value.details()
        assert time.monotonic() - started < 10, "the failure took too long to surface"
        assert server.app.dead.is_set()  # omnibus serve exits 1 on this
        assert health_status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(REQUESTS[0], timeout=10))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
