"""A worker that dies mid-generation: streams end with UNAVAILABLE, health turns NOT_SERVING."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnibus.v1 import generation_pb2 as pb
from tests.server_harness import ServerThread

pytestmark = pytest.mark.model


def test_worker_death_fails_requests_and_health(model_dir):
    server = ServerThread(model_dir, num_kv_blocks=128).start()
    try:
        stub = server.stub()
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
        request = pb.GenerateRequest(prompt="Tell me a story.", sampling=pb.SamplingParams(max_tokens=1000, ignore_eos=True))
        calls = [stub.Generate(request, timeout=60) for _ in range(3)]
        for call in calls:
            next(call)  # all three are generating
        server.processes[0].send_signal(signal.SIGKILL)
        started = time.monotonic()
        for call in calls:
            with pytest.raises(grpc.RpcError) as error:
                list(call)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "worker" in error.value.details()
        assert time.monotonic() - started < 10, "the failure took too long to surface"
        status = health.Check(health_pb2.HealthCheckRequest(service="omnibus.v1.Generation")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(request, timeout=10))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
