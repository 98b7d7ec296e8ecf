"""TLS and mTLS on the public port, with throwaway certificates: TLS clients get in, others do not."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import OmnibusClient, Sampling, tls_credentials
from scheduler_svc.tls import TlsConfig
from tests.server_harness import ServerThread
from tests.test_cli import OMNIBUS, ROOT

pytestmark = pytest.mark.model


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer_name: str, issuer_key, key, *, ca: bool, usage=None, san=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all from that CA."""
    directory = tmp_path_factory.mktemp("certs")
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _issue("omnibus test CA", "omnibus test CA", ca_key, ca_key, ca=True)
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server = _issue("127.0.0.1", "omnibus test CA", ca_key, server_key, ca=False,
                    usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    client = _issue("omnibus test client", "omnibus test CA", ca_key, client_key, ca=False,
                    usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    paths = {}
    paths["ca"], _ = _write(directory, "ca", ca, ca_key)
    paths["server_cert"], paths["server_key"] = _write(directory, "server", server, server_key)
    paths["client_cert"], paths["client_key"] = _write(directory, "client", client, client_key)
    return paths


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
