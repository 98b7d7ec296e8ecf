"""python -m gateway_svc --target localhost:50051 --host 127.0.0.1 --port 8000"""

from __future__ import annotations

import argparse
import logging
import sys

from gateway_svc.cli import add_gateway_arguments, run_gateway


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway_svc",
                                     description="OpenAI-compatible HTTP gateway to an Omnibus gRPC server")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_gateway_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_gateway(args)


if __name__ == "__main__":
    sys.exit(main())
