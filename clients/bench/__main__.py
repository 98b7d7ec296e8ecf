"""`python -m clients.bench`: the load generator without the `omnibus` CLI."""

import argparse
import sys

from clients.bench.cli import add_bench_arguments, run_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.bench", description="Omnibus load generator")
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
