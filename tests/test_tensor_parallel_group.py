"""The scheduler's side of a tensor-parallel group, against fake ranks (plain DEALER sockets):
it serves only once every rank of the right group registered, sends each plan to all of them,
answers with rank 0's tokens, and loses the whole group to one rank's failed step or disagreement."""

from __future__ import annotations

import asyncio
import contextlib
import os

import msgspec
import pytest
import zmq
import zmq.asyncio

from benchmarks.null_worker import null_hello
from scheduler_svc import protocol
from scheduler_svc.worker_group import WorkerDiedError, WorkerGroup, WorkerRegistrationError

WORLD_SIZE = 2


class FakeRank:
    """One rank's main DEALER (identity `worker-<rank>`), registered with `num_kv_blocks`."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, rank: int, world_size: int = WORLD_SIZE,
                 num_kv_blocks: int = 64, identity: str | None = None) -> None:
        self.rank = rank
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, (identity or f"worker-{rank}").encode())
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.hello = msgspec.structs.replace(null_hello(num_kv_blocks, 16, 1024), rank=rank, world_size=world_size)

    async def register(self) -> None:
        await self.socket.send(protocol.encode(self.hello))

    async def receive_frame(self, timeout_s: float = 10.0) -> bytes:
        return (await asyncio.wait_for(self.socket.recv_multipart(), timeout_s))[-1]

    async def answer(self, plan: protocol.StepPlan, token_ids: list[int]) -> None:
        result = protocol.StepResult(step_id=plan.step_id, rank=self.rank, req_ids=["a"] * len(token_ids),
                                     token_ids=token_ids, execute_time_s=0.0)
        await self.socket.send(protocol.encode(result))

    async def fail(self, plan: protocol.StepPlan, message: str) -> None:
        await self.socket.send(protocol.encode(protocol.WorkerError(rank=self.rank, step_id=plan.step_id,
                                                                    message=message)))


@contextlib.asynccontextmanager
async def running_group():
    """A started two-rank group and a context for its fake ranks (on the test's own event loop)."""
    workers = WorkerGroup("tcp://127.0.0.1:0", world_size=WORLD_SIZE, heartbeat_timeout_s=60.0)
    await workers.start()
    context = zmq.asyncio.Context()
    try:
        yield workers, context
    finally:
        workers.close()
        context.destroy(linger=0)


async def registered_ranks(workers: WorkerGroup, context: zmq.asyncio.Context) -> list[FakeRank]:
    ranks = [FakeRank(context, workers.endpoint, rank, num_kv_blocks=64 + 8 * rank) for rank in range(WORLD_SIZE)]
    for rank in ranks:
        await rank.register()
    await workers.wait_registered(10.0)
    return ranks


def plan(step_id: int) -> protocol.StepPlan:
    return protocol.StepPlan(step_id=step_id, new_requests=[], cached_requests=[], finished_req_ids=[])


async def test_the_group_serves_only_once_every_rank_of_its_size_registered():
    async with running_group() as (workers, context):
        # A worker of a TP=1 deployment (another process: another connection) and one of TP=3.
        stranger = FakeRank(context, workers.endpoint, rank=0, world_size=1, identity="stranger")
        beyond = FakeRank(context, workers.endpoint, rank=2, world_size=WORLD_SIZE + 1)
        await stranger.register()
        await beyond.register()
        first = FakeRank(context, workers.endpoint, rank=0)
        await first.register()
        with pytest.raises(WorkerRegistrationError, match="1 of 2 workers registered"):
            await workers.wait_registered(0.5)
        assert workers.num_dropped_frames == 2 and not workers.is_registered
        second = FakeRank(context, workers.endpoint, rank=1, num_kv_blocks=48)
        await second.register()
        hellos = await workers.wait_registered(10.0)
        assert [h.rank for h in hellos] == [0, 1] and [h.num_kv_blocks for h in hellos] == [64, 48]


@pytest.mark.parametrize("field,value", [("dtype", "bfloat16"), ("kv_cache_dtype", "int8")])
async def test_ranks_that_disagree_on_the_model_are_refused(field, value):
    async with running_group() as (workers, context):
        ranks = [FakeRank(context, workers.endpoint, rank) for rank in range(WORLD_SIZE)]
        ranks[1].hello = msgspec.structs.replace(ranks[1].hello, **{field: value})
        for rank in ranks:
            await rank.register()
        with pytest.raises(WorkerRegistrationError, match=f"disagree on {field}"):
            await workers.wait_registered(10.0)


async def test_each_plan_goes_to_every_rank_and_rank_0_answers():
    async with running_group() as (workers, context):
        ranks = await registered_ranks(workers, context)
        step = asyncio.create_task(workers.execute(plan(7)))
        frames = [await rank.receive_frame() for rank in ranks]
        assert frames[0] == frames[1]  # one encoding, sent to each rank
        await ranks[0].answer(protocol.decode_for_worker(frames[0]), [5])
        await asyncio.sleep(0.1)
        assert not step.done(), "answered before every rank finished the step"
        await ranks[1].answer(protocol.decode_for_worker(frames[1]), [5])
        result = await asyncio.wait_for(step, 10.0)
        assert (result.rank, result.token_ids) == (0, [5])


@pytest.mark.parametrize("failing_rank", [0, 1])
async def test_one_rank_failing_a_step_loses_the_whole_group(failing_rank):
    async with running_group() as (workers, context):
        ranks = await registered_ranks(workers, context)
        step = asyncio.create_task(workers.execute(plan(3)))
        sent = [protocol.decode_for_worker(await rank.receive_frame()) for rank in ranks]
        await ranks[failing_rank].fail(sent[failing_rank], "RuntimeError: Connection closed by peer")
        with pytest.raises(WorkerDiedError, match=f"rank {failing_rank} failed step 3 of a tensor-parallel group"):
            await asyncio.wait_for(step, 10.0)
        assert not workers.is_registered and workers.num_deaths == 1
        with pytest.raises(WorkerDiedError):
            await workers.execute(plan(4))  # no plan reaches what is left of the group


async def test_ranks_reporting_different_tokens_lose_the_group():
    async with running_group() as (workers, context):
        ranks = await registered_ranks(workers, context)
        step = asyncio.create_task(workers.execute(plan(9)))
        sent = [protocol.decode_for_worker(await rank.receive_frame()) for rank in ranks]
        await ranks[0].answer(sent[0], [5, 6])
        await ranks[1].answer(sent[1], [5, 7])
        with pytest.raises(WorkerDiedError, match="ranks 0 and 1 disagree on the tokens of step 9"):
            await asyncio.wait_for(step, 10.0)
        assert workers.num_deaths == 1


async def test_a_returning_group_is_whole_again_after_every_rank_registers():
    async with running_group() as (workers, context):
        ranks = await registered_ranks(workers, context)
        step = asyncio.create_task(workers.execute(plan(1)))
        sent = protocol.decode_for_worker(await ranks[1].receive_frame())
        await ranks[1].fail(sent, "boom")
        with pytest.raises(WorkerDiedError):
            await step
        generation = workers.generation
        for rank in ranks:  # the old processes exit...
            rank.socket.close(linger=0)
        await asyncio.sleep(0.2)
        restarted = [FakeRank(context, workers.endpoint, rank) for rank in range(WORLD_SIZE)]
        for rank in restarted:  # ...and new ones register under the same identities
            rank.hello = msgspec.structs.replace(rank.hello, pid=os.getpid() + 1 + rank.rank)
            await rank.register()
        while not workers.is_registered:  # as the engine waits for a group to come back
            assert await workers.wait_change(10.0), "the restarted ranks never registered"
        assert workers.generation == generation + 1 and workers.dead_reason is None


async def test_a_rank_whose_heartbeat_overtakes_its_hello_is_not_asked_to_register():
    """A tensor-parallel rank asked to register exits (worker.py): a starting one must never be."""
    async with running_group() as (workers, context):
        ranks = [FakeRank(context, workers.endpoint, rank) for rank in range(WORLD_SIZE)]
        beat = context.socket(zmq.DEALER)
        beat.setsockopt(zmq.IDENTITY, b"worker-1-hb")
        beat.connect(workers.endpoint)
        for _ in range(3):  # its first beats arrive before its hello
            await beat.send(protocol.encode(protocol.Heartbeat(rank=1, pid=ranks[1].hello.pid)))
            await asyncio.sleep(0.1)
        for rank in ranks:
            await rank.register()
        await workers.wait_registered(10.0)
        with pytest.raises(TimeoutError):
            await ranks[1].receive_frame(timeout_s=1.5)
        beat.close(linger=0)
