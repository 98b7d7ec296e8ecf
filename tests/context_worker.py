"""A worker process without a model, for chaos and poison tests of the real scheduler.

It speaks the real protocol over ZeroMQ like `benchmarks/null_worker.py`, but samples
`tests.scripted_workers.next_token`, a function of the whole context, so a resumed stream with a
token repeated, lost or misplaced differs from an undisturbed run; and it starts in well under a
second, so a test can kill it many times. Faults for the poison rule: `--crash-on-token T` exits
(as a segfaulting worker would) on a plan that sends a request containing token T, and
`--fail-on-token T` answers such a plan with a `WorkerError` instead.

    python -m tests.context_worker --scheduler tcp://127.0.0.1:5555

It imports no gRPC and no torch, so a restart costs little more than starting Python.
"""

from __future__ import annotations

import argparse
import os
import time

import zmq

from benchmarks.null_worker import null_hello
from scheduler_svc import protocol
from tests.scripted_workers import ContextRunner, plan_computes_token

CRASH_EXIT_CODE = 70


def serve(args: argparse.Namespace) -> int:
    crash_if = plan_computes_token(args.crash_on_token) if args.crash_on_token is not None else None
    fail_if = plan_computes_token(args.fail_on_token) if args.fail_on_token is not None else None
    hello = protocol.encode(null_hello(args.num_kv_blocks, 16, args.max_model_len))
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, b"worker-0")
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(args.scheduler)
    runner = ContextRunner()
    try:
        socket.send(hello)
        while True:
            if not socket.poll(1000):
                if args.parent_pid is not None and os.getppid() != args.parent_pid:
                    return 1
                continue
            message = protocol.decode_for_worker(socket.recv_multipart()[-1])
            if isinstance(message, protocol.Shutdown):
                return 0
            if isinstance(message, protocol.Reregister):
                runner = ContextRunner()
                socket.send(hello)
                continue
            time.sleep(args.step_delay_s)
            if crash_if is not None and crash_if(message):
                os._exit(CRASH_EXIT_CODE)
            if fail_if is not None and fail_if(message):
                for req_id in message.finished_req_ids:  # as the real worker does on a failed step
                    runner.requests.pop(req_id, None)
                reply = protocol.WorkerError(rank=0, step_id=message.step_id, message="injected fault")
            else:
                reply = runner.execute(message)
            socket.send(protocol.encode(reply))
    finally:
        socket.close(linger=0)
        context.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a model-free worker for chaos and poison tests")
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--step-delay-s", type=float, default=0.002)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--crash-on-token", type=int, default=None)
    parser.add_argument("--fail-on-token", type=int, default=None)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
