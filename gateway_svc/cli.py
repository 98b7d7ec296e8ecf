"""Flags of `omnibus gateway` and `python -m gateway_svc`, and running the app under uvicorn."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway_svc.config import DEFAULT_MAX_BODY_BYTES, GatewayConfig


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="localhost:50051", help="the Omnibus gRPC server")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--tls", action="store_true", help="reach the gRPC server over TLS (system CAs)")
    parser.add_argument("--tls-ca", default=None, help="PEM CA bundle to verify the gRPC server with (turns TLS on)")
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate, for a server that requires one")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="seconds one generation may take (HTTP 504 past it; default: no limit)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM/SIGINT, seconds to let requests in flight finish")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body; larger ones get 413 (default: %(default)s)")
    parser.add_argument("--max-concurrent-requests", type=int, default=1024,
                        help="generations in flight at once; more get 429 with Retry-After (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    def path(value: str | None) -> Path | None:
        return None if value is None else Path(value)

    try:
        return GatewayConfig(
            target=args.target, host=args.host, port=args.port, tls=args.tls, tls_ca=path(args.tls_ca),
            tls_cert=path(args.tls_cert), tls_key=path(args.tls_key), request_timeout_s=args.request_timeout,
            graceful_shutdown_s=args.drain_timeout, max_body_bytes=args.max_body_bytes,
            max_concurrent_requests=args.max_concurrent_requests,
        )
    except ValueError as error:
        raise SystemExit(f"omnibus gateway: {error}") from None


def run_gateway(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn then stops accepting and drains)."""
    config = config_from_args(args)
    import uvicorn  # here, so that `omnibus` commands other than gateway start without it

    from gateway_svc.app import create_app

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=getattr(args, "log_level", "info"),
                timeout_graceful_shutdown=config.graceful_shutdown_s)
    return 0
