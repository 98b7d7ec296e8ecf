"""TLS and mTLS on the public port, with throwaway certificates: TLS clients get in, others do not."""

from __future__ import annotations

import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import OmnibusClient, Sampling, tls_credentials
from scheduler_svc.tls import TlsConfig
from tests.server_harness import ServerThread
from tests.test_cli import OMNIBUS, ROOT

pytestmark = pytest.mark.model


def is_serving(channel: grpc.Channel) -> bool:
    """True if a health check gets through; raises grpc.RpcError when the connection is refused."""
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def tls_server(model_dir, certs):
    tls = TlsConfig(certs["server_cert"], certs["server_key"])
    running = ServerThread(model_dir, num_kv_blocks=32, tls=tls, credentials=tls_credentials(certs["ca"])).start()
    yield running
    running.stop()


def test_tls_client_connects_and_plain_text_is_refused(tls_server, certs):
    assert is_serving(tls_server.channel())
    client = OmnibusClient(tls_server.target, credentials=tls_credentials(certs["ca"]))
    try:
        assert client.complete(prompt_token_ids=[1, 2, 3], sampling=Sampling(max_tokens=2, ignore_eos=True)).completion_tokens == 2
    finally:
        client.close()
    with grpc.insecure_channel(tls_server.target) as plain, pytest.raises(grpc.RpcError) as refused:
        is_serving(plain)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_generate_over_tls(tls_server, certs):
    command = [*OMNIBUS, "generate", "Hello", "--max-tokens", "3", "--ignore-eos", "--target", tls_server.target]
    secure = subprocess.run([*command, "--tls-ca", str(certs["ca"])], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert secure.returncode == 0 and "3 completion tokens" in secure.stderr, secure.stderr
    plain = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr


def test_mtls_requires_a_client_certificate(model_dir, certs):
    tls = TlsConfig(certs["server_cert"], certs["server_key"], client_ca=certs["ca"])
    with_cert = tls_credentials(certs["ca"], certs["client_cert"], certs["client_key"])
    server = ServerThread(model_dir, num_kv_blocks=32, tls=tls, credentials=with_cert).start()
    try:
        assert is_serving(server.channel())
        with grpc.secure_channel(server.target, tls_credentials(certs["ca"])) as no_cert:
            with pytest.raises(grpc.RpcError) as refused:
                is_serving(no_cert)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(server.target) as plain, pytest.raises(grpc.RpcError):
            is_serving(plain)
    finally:
        server.stop()
