"""TLS for the public gRPC port: a server certificate, and optionally client certificates (mTLS)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(slots=True)
class TlsConfig:
    """PEM files. With `client_ca`, every client must present a certificate that CA signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls {name}: no such file {path}")


def server_credentials(config: TlsConfig) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port`; reads the files now, so a bad path fails at startup."""
    key, cert = Path(config.key).read_bytes(), Path(config.cert).read_bytes()
    client_ca = None if config.client_ca is None else Path(config.client_ca).read_bytes()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
