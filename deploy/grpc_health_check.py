"""Exit 0 if a gRPC server reports SERVING for a health service, else 1: the compose healthcheck.

`python deploy/grpc_health_check.py [--target 127.0.0.1:50051] [--service omnibus.v1.Generation]`

Images need no extra binary (grpc_health_probe): grpcio-health-checking is already installed.
The default service is readiness; `--service ""` asks liveness (is the process answering at all).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READINESS = "omnibus.v1.Generation"


def check(target: str, service: str, timeout_s: float) -> tuple[bool, str]:
    """(serving, what the server said or why it could not be asked)."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    status = response.status
    return status == health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the gRPC server")
    parser.add_argument("--service", default=READINESS, help='health service name ("" for liveness)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    serving, said = check(args.target, args.service, args.timeout)
    print(f"{args.target} {args.service or '(liveness)'}: {said}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
