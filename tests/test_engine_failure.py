"""A bug inside the engine loop ends every stream with UNAVAILABLE instead of hanging them."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnibus.v1 import generation_pb2 as pb
from tests.server_harness import ServerThread

pytestmark = pytest.mark.model


def test_internal_error_fails_streams_and_health(model_dir):
    server = ServerThread(model_dir, num_kv_blocks=64).start()
    try:
        stub = server.stub()
        call = stub.Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True)), timeout=60)
        next(call)

        def break_scheduler(app):
            def boom(plan, result):
                raise RuntimeError("injected scheduler bug")
            app.engine.scheduler.update_from_output = boom

        server.call(break_scheduler)
        with pytest.raises(grpc.RpcError) as error:
            list(call)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "injected scheduler bug" in error.value.details()
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
        status = health.Check(health_pb2.HealthCheckRequest(service="omnibus.v1.Generation"), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop()
