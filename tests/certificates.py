"""Throwaway certificates for TLS tests: a CA, a server certificate for 127.0.0.1/localhost and a
client certificate, all signed by that CA (the `certs` fixture in conftest.py)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


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


def write_certificates(directory: Path) -> dict[str, Path]:
    """Issue the CA, server and client certificates into `directory`; returns their paths."""
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
