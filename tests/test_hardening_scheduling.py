"""Issue 13, engine side: static batching without deadlock (3), a worker group that survives junk
frames (4) and hears a worker's error about an undecodable plan (5), and requests swapped out in a
failed step failed with it (7). Fake workers only: NullRunner (benchmarks/null_worker.py) answers."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import zmq
import zmq.asyncio

from benchmarks.null_worker import NULL_TOKEN_ID, NullRunner, null_hello
from scheduler_svc import protocol
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine, EngineError
from scheduler_svc.proto_convert import ParsedRequest
from scheduler_svc.request import Request, SamplingParams
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.tokenizer import ModelTokenizer
from scheduler_svc.worker_group import WorkerGroup, WorkerStepError
from tests.hardening_support import write_tiny_model_dir


def make_request(req_id: str, num_prompt_tokens: int, max_tokens: int, priority: int = 0) -> Request:
    return Request(req_id, list(range(num_prompt_tokens)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   priority=priority)


def run_step(scheduler: Scheduler, worker: NullRunner) -> dict[str, int]:
    """One step; the tokens each request computed in it."""
    plan = scheduler.schedule()
    if plan.num_scheduled_tokens:
        scheduler.update_from_output(plan, worker.execute(plan))
    return {r.req_id: r.num_new_tokens for r in plan.new_requests + plan.cached_requests}


# 3: a later, higher-priority arrival must not block the static batch's remaining member.

def test_static_batch_member_behind_a_higher_priority_newcomer_still_runs():
    config = SchedulerConfig(num_kv_blocks=16, max_model_len=64, block_size=4, max_num_seqs=2,
                             max_num_batched_tokens=8, scheduling="static")
    scheduler, worker = Scheduler(config), NullRunner()
    scheduler.add_request(make_request("a", 8, max_tokens=1))  # takes the whole first budget
    scheduler.add_request(make_request("b", 4, max_tokens=2))
    steps = [run_step(scheduler, worker)]
    scheduler.add_request(make_request("d", 4, max_tokens=1, priority=-1))  # queue: [d, b]; batch {b}
    for _ in range(6):
        steps.append(run_step(scheduler, worker))
    assert steps == [{"a": 8}, {"b": 4}, {"b": 1}, {"d": 4}, {}, {}, {}]
    assert not scheduler.has_unfinished_requests()


class FakeWorker:
    """A worker's main DEALER, registered with the group at `endpoint`."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, identity: bytes = b"worker-0"):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    async def register(self) -> None:
        await self.socket.send(protocol.encode(null_hello(64, 16, 1024)))

    async def next_plan(self) -> protocol.StepPlan:
        frames = await asyncio.wait_for(self.socket.recv_multipart(), 10)
        return protocol.decode_for_worker(frames[-1])


@contextlib.asynccontextmanager
async def registered_group(heartbeat_timeout_s: float = 60.0):
    """A WorkerGroup with one fake worker registered (built in the test's own event loop)."""
    workers = WorkerGroup("tcp://127.0.0.1:0", heartbeat_timeout_s=heartbeat_timeout_s)
    context = zmq.asyncio.Context()
    try:
        await workers.start()
        worker = FakeWorker(context, workers.endpoint)
        await worker.register()
        await workers.wait_registered(10)
        yield workers, worker, context
    finally:
        workers.close()
        context.destroy(linger=0)


def one_plan(step_id: int) -> protocol.StepPlan:
    return protocol.StepPlan(step_id, [], [], [])


async def answer(worker: FakeWorker, reply) -> None:
    plan = await worker.next_plan()
    await worker.socket.send(protocol.encode(reply(plan)))


# 4: junk is logged, counted and dropped; the group keeps working.

async def test_malformed_frames_are_dropped_and_the_group_keeps_serving():
    async with registered_group() as (workers, worker, context):
        await check_junk_is_dropped(workers, worker, context)


async def check_junk_is_dropped(workers: WorkerGroup, worker: FakeWorker, context: zmq.asyncio.Context) -> None:
    stranger = FakeWorker(context, workers.endpoint, identity=b"stranger")
    await stranger.socket.send_multipart([b"junk", b"more"])  # two frames where one is expected
    await stranger.socket.send(b"\xc1 not msgpack")
    # A result for the registered rank, from someone else: it must not resolve our step.
    pending = asyncio.ensure_future(workers.execute(one_plan(0)))
    await worker.next_plan()
    await stranger.socket.send(protocol.encode(protocol.StepResult(0, 0, [], [], 0.0)))
    await asyncio.sleep(0.3)
    assert not pending.done()
    await worker.socket.send(protocol.encode(protocol.StepResult(0, 0, [], [], 0.0)))
    result = await asyncio.wait_for(pending, 5)
    assert result.step_id == 0
    assert workers.num_dropped_frames == 3 and workers.dead_reason is None
    replied = asyncio.ensure_future(answer(worker, lambda plan: protocol.StepResult(plan.step_id, 0, [], [], 0.0)))
    assert (await asyncio.wait_for(workers.execute(one_plan(1)), 5)).step_id == 1
    await replied


# 5: a worker's error about a plan it could not decode (step id -1) fails the pending step.

async def test_an_error_for_an_undecodable_plan_fails_the_pending_step():
    async with registered_group() as (workers, worker, _):
        replied = asyncio.ensure_future(answer(
            worker, lambda plan: protocol.WorkerError(rank=0, step_id=-1, message="DecodeError: bad plan")))
        with pytest.raises(WorkerStepError, match="bad plan"):
            await asyncio.wait_for(workers.execute(one_plan(0)), 5)
        await replied
        assert workers.dead_reason is None


# 7: a request swapped out by a plan that fails is recomputed, never resumed from a copy that may
# not exist.

class FailingSwapWorkers:
    """The engine's WorkerGroup: NullRunner answers, except that a plan that swaps fails."""

    num_deaths, is_registered, lost_since, dead_reason = 0, True, None, None  # it never dies

    def __init__(self) -> None:
        self.runner = NullRunner()
        self.plans: list[protocol.StepPlan] = []

    async def execute(self, plan: protocol.StepPlan) -> protocol.StepResult:
        self.plans.append(plan)
        await asyncio.sleep(0)
        if plan.swap_out:
            raise WorkerStepError("worker 0: injected failure while swapping")
        return self.runner.execute(plan)


async def outcome(stream) -> str | list[int]:
    """The stream's token ids, or the kind of error it ended with."""
    token_ids = []
    try:
        async for event in stream.events():
            token_ids += event.token_ids
    except EngineError as error:
        return error.kind.name
    return token_ids


async def test_a_request_swapped_out_in_a_failed_step_is_recomputed_not_swapped_in(tmp_path):
    # Three requests of 7 tokens fill the 6 blocks; the step that needs a third block for the
    # first two swaps the last one out, and fails.
    config = SchedulerConfig(num_kv_blocks=6, max_model_len=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                             watermark=0.0, preemption_mode="swap", num_swap_blocks=4)
    scheduler, workers = Scheduler(config), FailingSwapWorkers()
    engine = Engine(scheduler, workers, ModelTokenizer(write_tiny_model_dir(tmp_path)))
    engine.start()
    try:
        streams = [engine.add_request(ParsedRequest(name, [100 + i] * 7, SamplingParams(max_tokens=8, ignore_eos=True)))
                   for i, name in enumerate("abc")]
        outcomes = await asyncio.wait_for(asyncio.gather(*(outcome(s) for s in streams)), 10)
    finally:
        await engine.stop()
    failed_plans = [plan for plan in workers.plans if plan.swap_out]
    assert scheduler.records[failed_plans[0].step_id].swapped_out_req_ids == [streams[2].req_id]
    # Each failed step's batch and victims are recomputed (one failure each: nobody is quarantined).
    assert outcomes == [[NULL_TOKEN_ID] * 8] * 3
    assert not any(plan.swap_in for plan in workers.plans), "resumed from a swap copy never written"
    assert not scheduler.has_unfinished_requests()
    assert scheduler.swap_pool.num_free_blocks == 4 and scheduler.num_swapped == 0
