"""The gateway's configuration: where the Omnibus gRPC server is and where to serve HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


# As the server's default gRPC message limit: a JSON body is no smaller than its GenerateRequest.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class GatewayConfig:
    target: str = "localhost:50051"  # the Omnibus gRPC server
    host: str = "127.0.0.1"  # HTTP listen address
    port: int = 8000  # HTTP port (0: any free port)
    # TLS to the gRPC server: on with `tls` (system roots) or any of the PEM files below.
    tls: bool = False
    tls_ca: Path | None = None  # CA bundle that signed the server's certificate
    tls_cert: Path | None = None  # client certificate, for a server that requires one (mTLS)
    tls_key: Path | None = None
    request_timeout_s: float | None = None  # gRPC deadline of one generation (HTTP 504 past it)
    graceful_shutdown_s: float = 30.0  # on SIGTERM, how long requests in flight may finish
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies: 413
    max_concurrent_requests: int = 1024  # generations in flight at once; more: 429 with Retry-After

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {path}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        for name in ("max_body_bytes", "max_concurrent_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def use_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None
