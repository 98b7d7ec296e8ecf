"""WorkerGroup against fake workers (plain DEALER sockets): a restarted scheduler gets its
separately started worker back without restarting it."""

from __future__ import annotations

import asyncio
import os

import zmq
import zmq.asyncio

from benchmarks.null_worker import null_hello
from scheduler_svc import protocol
from scheduler_svc.worker_group import WorkerGroup


class FakeWorker:
    """A worker's two DEALERs (main and heartbeat), connected to `endpoint`."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str) -> None:
        self.main = context.socket(zmq.DEALER)
        self.beat = context.socket(zmq.DEALER)
        for socket, identity in ((self.main, b"worker-0"), (self.beat, b"worker-0-hb")):
            socket.setsockopt(zmq.IDENTITY, identity)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoint)
        self.hello = null_hello(64, 16, 1024)

    async def heartbeat_until(self, done: asyncio.Event) -> None:
        beat = protocol.encode(protocol.Heartbeat(rank=0, pid=os.getpid()))
        while not done.is_set():
            await self.beat.send(beat)
            await asyncio.sleep(0.05)

    async def receive(self, timeout_s: float = 10.0):
        frame = await asyncio.wait_for(self.main.recv_multipart(), timeout_s)
        return protocol.decode_for_worker(frame[-1])


async def test_a_restarted_scheduler_asks_its_heartbeating_worker_to_register_again():
    first = WorkerGroup("tcp://127.0.0.1:0", heartbeat_timeout_s=5.0)
    endpoint = first.endpoint
    context = zmq.asyncio.Context()
    worker = FakeWorker(context, endpoint)
    stop_beating = asyncio.Event()
    try:
        await first.start()
        await worker.main.send(protocol.encode(worker.hello))
        beating = asyncio.create_task(worker.heartbeat_until(stop_beating))
        await first.wait_registered(10.0)
        first.close()  # a crash: no Shutdown reaches the worker

        second = WorkerGroup(endpoint, heartbeat_timeout_s=5.0)
        await second.start()
        message = await worker.receive()
        assert isinstance(message, protocol.Reregister)
        await worker.main.send(protocol.encode(worker.hello))
        assert await second.wait_registered(10.0) == [worker.hello]
        # A second hello from the same process (a Reregister that crossed its first hello) is
        # harmless: the group stays alive.
        await worker.main.send(protocol.encode(worker.hello))
        await asyncio.sleep(0.3)
        assert second.dead_reason is None
        stop_beating.set()
        await beating
        second.close()
    finally:
        stop_beating.set()
        context.destroy(linger=0)
