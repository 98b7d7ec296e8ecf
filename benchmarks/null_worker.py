"""A worker that computes nothing: it answers every `StepPlan` at once, for scheduler benchmarks.

It speaks the real protocol (scheduler_svc/protocol.py) over a ZeroMQ DEALER, registers with a
`WorkerHello` announcing a KV pool as large as asked, and returns a token for every request that
samples in a step. The only state it keeps per request is what decides that: the request's known
token count and its `num_computed_tokens` (a request samples when the two meet). It sends no
heartbeats, so the scheduler side must use a long heartbeat timeout.

    python -m benchmarks.null_worker --scheduler tcp://127.0.0.1:5555 --num-kv-blocks 100000
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

import zmq

from scheduler_svc import protocol

NULL_TOKEN_ID = 1000  # any id below vocab_size; requests are expected to ignore eos


@dataclass(slots=True)
class _Progress:
    num_tokens: int
    num_computed_tokens: int


@dataclass(slots=True)
class NullRunner:
    """Turns a plan into a result without computing anything."""

    rank: int = 0
    requests: dict[str, _Progress] = field(default_factory=dict)

    def execute(self, plan: protocol.StepPlan) -> protocol.StepResult:
        """One token per request whose scheduled tokens reach its last known token."""
        for req_id in plan.finished_req_ids:
            self.requests.pop(req_id, None)
        scheduled = []
        for new in plan.new_requests:
            self.requests[new.req_id] = _Progress(len(new.token_ids), new.num_computed_tokens)
            scheduled.append((new.req_id, new.num_new_tokens))
        for cached in plan.cached_requests:
            scheduled.append((cached.req_id, cached.num_new_tokens))
        req_ids = []
        for req_id, num_new_tokens in scheduled:
            progress = self.requests[req_id]
            progress.num_computed_tokens += num_new_tokens
            if progress.num_computed_tokens == progress.num_tokens:
                progress.num_tokens += 1  # the sampled token
                req_ids.append(req_id)
        return protocol.StepResult(plan.step_id, self.rank, req_ids, [NULL_TOKEN_ID] * len(req_ids),
                                   0.0)


def null_hello(num_kv_blocks: int, block_size: int, max_model_len: int) -> protocol.WorkerHello:
    """The registration of a null worker with a pool of `num_kv_blocks` blocks."""
    return protocol.WorkerHello(
        protocol_version=protocol.PROTOCOL_VERSION, rank=0, world_size=1, pid=os.getpid(),
        num_kv_blocks=num_kv_blocks, block_size=block_size, model_fingerprint="null",
        max_model_len=max_model_len, vocab_size=32_000, device="null", dtype="none",
    )


def serve(address: str, hello: protocol.WorkerHello, step_delay_s: float = 0.0,
          parent_pid: int | None = None) -> int:
    """Register at `address`, then answer plans until `Shutdown`; returns the exit code.

    `step_delay_s` paces every answer (a stand-in for a model's step); with `parent_pid` the
    worker exits 1 once that process is gone.
    """
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, b"worker-0")
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    runner = NullRunner()
    try:
        socket.send(protocol.encode(hello))
        while True:
            if not socket.poll(1000):
                if parent_pid is not None and os.getppid() != parent_pid:
                    return 1
                continue
            message = protocol.decode_for_worker(socket.recv_multipart()[-1])
            if isinstance(message, protocol.Shutdown):
                return 0
            if step_delay_s:
                time.sleep(step_delay_s)
            socket.send(protocol.encode(runner.execute(message)))
    finally:
        socket.close(linger=0)
        context.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", required=True, help="the scheduler's ROUTER address")
    parser.add_argument("--num-kv-blocks", type=int, default=100_000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    return serve(args.scheduler, null_hello(args.num_kv_blocks, args.block_size, args.max_model_len))


if __name__ == "__main__":
    raise SystemExit(main())
