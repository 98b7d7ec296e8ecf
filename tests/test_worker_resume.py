"""Resume after a worker death, and the poison rule, on the engine against scripted workers; the
worker group forgetting a dead worker and taking a new one; the restart budget and flags.

The scripted worker's next token depends on the whole context (tests/scripted_workers.py), so a
resumed request that repeats, loses or misplaces a token continues differently from the reference.
The real-worker counterparts are tests/test_worker_death.py and tests/test_chaos.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import msgspec
import pytest
import zmq
import zmq.asyncio

from benchmarks.null_worker import null_hello
from clients import cli
from scheduler_svc import protocol
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine, EngineError, ErrorKind
from scheduler_svc.metrics import ServingMetrics
from scheduler_svc.proto_convert import ParsedRequest
from scheduler_svc.request import Request, RequestStatus, SamplingParams
from scheduler_svc.restart_budget import RestartBudget
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.tokenizer import ModelTokenizer
from scheduler_svc.worker_group import WorkerDiedError
from tests.hardening_support import write_tiny_model_dir
from tests.scripted_workers import ScriptedWorkers, plan_computes_token, reference_output
from tests.test_hardening_scheduling import FakeWorker, answer, one_plan, registered_group

POISON = 777  # a prompt token the injected faults look for


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> ModelTokenizer:
    return ModelTokenizer(write_tiny_model_dir(tmp_path_factory.mktemp("tok")))


@contextlib.asynccontextmanager
async def running_engine(tokenizer, workers: ScriptedWorkers, restart_timeout_s: float = 30.0, **config):
    settings = dict(num_kv_blocks=64, max_model_len=256, block_size=4, max_num_seqs=16, max_num_batched_tokens=256)
    scheduler = Scheduler(SchedulerConfig(**(settings | config)))
    engine = Engine(scheduler, workers, tokenizer, metrics=ServingMetrics(), worker_restart_timeout_s=restart_timeout_s)
    engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def submit(engine: Engine, prompt: list[int], max_tokens: int, name: str = ""):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return engine.add_request(ParsedRequest(name, prompt, params))


async def outcome(stream) -> list[int] | EngineError:
    """Every token the stream delivered, or the error it ended with."""
    tokens = []
    try:
        async for event in stream.events():
            tokens += event.token_ids
    except EngineError as error:
        return error
    return tokens


async def until(condition, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.002)


def prompts(n: int) -> list[list[int]]:
    return [[10 + i, 20 + i, 30 + i, 40 + i, 50 + i][: 2 + i % 4] * (1 + i % 3) for i in range(n)]


def metric(engine: Engine, name: str) -> float:
    return engine.metrics.registry.get_sample_value(name) or 0.0


def assert_pool_full(engine: Engine) -> None:
    scheduler = engine.scheduler
    assert not scheduler.has_unfinished_requests() and not scheduler.held_req_ids
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    assert scheduler.swap_pool.num_free_blocks == scheduler.swap_pool.num_blocks


async def test_requests_in_flight_resume_after_a_death_with_the_undisturbed_tokens(tokenizer):
    workers = ScriptedWorkers()
    async with running_engine(tokenizer, workers) as engine:
        streams = [submit(engine, prompt, 24) for prompt in prompts(8)]
        tasks = [asyncio.ensure_future(outcome(s)) for s in streams]
        await until(lambda: all(s.num_output_tokens >= 5 for s in streams))
        workers.kill()
        await asyncio.sleep(0.05)  # nothing fails while no worker is registered
        assert not any(task.done() for task in tasks)
        late = submit(engine, [60, 61, 62], 6)  # new requests queue meanwhile
        workers.restart()
        outputs = await asyncio.wait_for(asyncio.gather(*tasks, outcome(late)), 60)
        assert_pool_full(engine)
        [recovery] = engine.recoveries
    assert outputs == [reference_output(p, 24) for p in prompts(8)] + [reference_output([60, 61, 62], 6)]
    assert recovery.num_resumed == 8 and recovery.pause_s is not None
    assert metric(engine, "omnibus_resumed_requests_total") == 8
    assert metric(engine, "omnibus_quarantined_requests_total") == 0


async def test_each_suspect_resumes_alone_until_it_has_sampled(tokenizer):
    workers = ScriptedWorkers()
    async with running_engine(tokenizer, workers) as engine:
        streams = [submit(engine, prompt, 12) for prompt in prompts(4)]
        tasks = [asyncio.ensure_future(outcome(s)) for s in streams]
        await until(lambda: all(s.num_output_tokens >= 2 for s in streams))
        workers.kill()
        workers.restart()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    resent = [plan for plan in workers.plans[-40:] if plan.new_requests]
    assert [len(plan.new_requests) for plan in resent[-4:]] == [1, 1, 1, 1]
    assert len({plan.new_requests[0].req_id for plan in resent[-4:]}) == 4


async def test_a_worker_lost_while_idle_leaves_no_stale_prefix_cache(tokenizer):
    workers = ScriptedWorkers()
    prompt = list(range(100, 120))
    async with running_engine(tokenizer, workers) as engine:
        assert await outcome(submit(engine, prompt, 2)) == reference_output(prompt, 2)
        assert engine.scheduler.block_manager.num_cached_blocks > 0
        workers.kill()
        workers.restart()
        stream = submit(engine, prompt, 2)
        # The new worker never computed the cached blocks: a hit would read garbage (and the
        # scripted worker refuses a NewRequest with computed tokens it does not hold).
        assert await asyncio.wait_for(outcome(stream), 60) == reference_output(prompt, 2)
        assert stream.num_cached_tokens == 0


async def test_no_worker_back_in_time_fails_requests_with_unavailable_then_serves_again(tokenizer):
    workers = ScriptedWorkers()
    async with running_engine(tokenizer, workers, restart_timeout_s=0.3) as engine:
        stream = submit(engine, [5, 6, 7], 50)
        task = asyncio.ensure_future(outcome(stream))
        await until(lambda: stream.num_output_tokens >= 2)
        workers.kill("worker process 1234 exited with code -9")
        error = await asyncio.wait_for(task, 60)
        assert isinstance(error, EngineError) and error.kind == ErrorKind.UNAVAILABLE
        assert "no worker has registered within 0 s" in str(error) and "code -9" in str(error)
        with pytest.raises(EngineError, match="no worker has registered"):
            submit(engine, [5, 6, 7], 2)  # refused at once, not queued
        workers.restart()
        assert await asyncio.wait_for(outcome(submit(engine, [5, 6, 7], 3)), 60) == reference_output([5, 6, 7], 3)
        assert_pool_full(engine)


async def test_a_swapped_out_request_resumes_by_recompute(tokenizer):
    workers = ScriptedWorkers(step_delay_s=0.002)
    config = dict(num_kv_blocks=8, max_model_len=64, block_size=4, watermark=0.0, preemption_mode="swap",
                  num_swap_blocks=16)
    async with running_engine(tokenizer, workers, **config) as engine:
        streams = [submit(engine, [100 + i] * 7, 12) for i in range(3)]
        tasks = [asyncio.ensure_future(outcome(s)) for s in streams]
        await until(lambda: engine.scheduler.num_swapped > 0)
        workers.kill()
        assert engine.scheduler.num_swapped > 0
        workers.restart()
        outputs = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert_pool_full(engine)
    # The scripted worker refuses a swap-in of blocks it did not swap out (the dead one did).
    assert outputs == [reference_output([100 + i] * 7, 12) for i in range(3)]


@pytest.mark.parametrize("fault", ["crash", "step_error"])
async def test_a_poison_request_fails_alone_after_two_consecutive_failures(tokenizer, fault):
    workers = ScriptedWorkers()
    workers.restart_after_s = 0.01
    poison_prompt = [1, 2, POISON, 3]
    async with running_engine(tokenizer, workers) as engine:
        healthy = [submit(engine, prompt, 16) for prompt in prompts(6)]
        tasks = [asyncio.ensure_future(outcome(s)) for s in healthy]
        await until(lambda: all(s.num_output_tokens >= 3 for s in healthy))
        setattr(workers, "crash_if" if fault == "crash" else "fail_if", plan_computes_token(POISON))
        poison = asyncio.ensure_future(outcome(submit(engine, poison_prompt, 16)))
        outputs = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        error = await asyncio.wait_for(poison, 60)
        assert_pool_full(engine)
        failures = sum(plan_computes_token(POISON)(plan) for plan in workers.plans)
    assert outputs == [reference_output(p, 16) for p in prompts(6)]
    assert isinstance(error, EngineError) and error.kind == ErrorKind.INTERNAL
    assert "two consecutive failed steps" in str(error) and "injected" in str(error)
    assert failures == 2  # sent twice, failed twice, never again
    assert workers.num_deaths == (2 if fault == "crash" else 0)
    assert metric(engine, "omnibus_quarantined_requests_total") == 1


async def test_a_request_acquitted_by_sampling_is_not_quarantined_by_a_later_failure(tokenizer):
    workers = ScriptedWorkers()
    workers.restart_after_s = 0.01
    async with running_engine(tokenizer, workers) as engine:
        streams = [submit(engine, prompt, 30) for prompt in prompts(5)]
        tasks = [asyncio.ensure_future(outcome(s)) for s in streams]
        for _ in range(3):  # three deaths, each after every request has sampled again
            marks = [s.num_output_tokens for s in streams]
            await until(lambda: all(s.num_output_tokens > m + 1 for s, m in zip(streams, marks)))
            workers.kill()
        outputs = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert outputs == [reference_output(p, 30) for p in prompts(5)]
    assert metric(engine, "omnibus_quarantined_requests_total") == 0


def test_recompute_requests_holds_and_releases_in_order():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=16, max_model_len=64, block_size=4, max_num_seqs=4,
                                          max_num_batched_tokens=64))
    requests = [Request(f"r{i}", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4)) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    scheduler.schedule()
    assert scheduler.recompute_requests(["r0", "r1", "gone"], hold=True) == ["r0", "r1"]
    assert scheduler.held_req_ids == ["r0", "r1"]
    assert all(r.status == RequestStatus.PREEMPTED and r.num_computed_tokens == 0 for r in requests[:2])
    assert scheduler.release_held() == "r0" and scheduler.held_req_ids == ["r1"]
    scheduler.abort_requests(["r1"])  # a held request can be cancelled
    assert scheduler.held_req_ids == [] and scheduler.release_held() is None
    assert scheduler.reset_after_worker_loss() == ["r2"]
    assert scheduler.block_manager.num_free_blocks == 16 and scheduler.block_manager.num_cached_blocks == 0
    plan = scheduler.schedule()
    assert {r.req_id for r in plan.new_requests} == {"r0", "r2"} and plan.finished_req_ids == []


def test_restart_budget_is_a_sliding_window():
    budget = RestartBudget(max_restarts=2, window_s=600.0)
    assert budget.take(0.0) and budget.take(10.0)
    assert not budget.take(20.0)
    assert budget.take(600.0)  # the first restart has left the window
    assert not RestartBudget(max_restarts=0).take(0.0)
    with pytest.raises(ValueError, match="max_restarts"):
        RestartBudget(max_restarts=-1)


# The worker group's side: a death forgets the workers, and new ones register as the first did.

async def send_hello(socket, **changes) -> None:
    hello = msgspec.structs.replace(null_hello(64, 16, 1024), **changes)
    await socket.send(protocol.encode(hello))


async def test_a_new_process_for_a_registered_rank_replaces_it_and_fails_the_pending_step():
    async with registered_group() as (workers, worker, context):
        pending = asyncio.ensure_future(workers.execute(one_plan(0)))
        await worker.next_plan()
        worker.socket.close(linger=0)  # the old process is gone (its supervisor restarted it)
        await asyncio.sleep(0.1)
        replacement = FakeWorker(context, workers.endpoint)
        await send_hello(replacement.socket, pid=os.getpid() + 1)
        with pytest.raises(WorkerDiedError, match="registered again from pid"):
            await asyncio.wait_for(pending, 60)
        await until(lambda: workers.generation == 2)
        assert workers.is_registered and workers.num_deaths == 1 and workers.dead_reason is None
        replied = asyncio.ensure_future(answer(replacement, lambda plan: protocol.StepResult(plan.step_id, 0, [], [], 0.0)))
        assert (await asyncio.wait_for(workers.execute(one_plan(1)), 60)).step_id == 1
        await replied


async def test_a_silent_worker_is_forgotten_and_asked_to_register_when_it_beats_again():
    async with registered_group(heartbeat_timeout_s=0.5) as (workers, worker, context):
        await until(lambda: not workers.is_registered, 30)
        assert "no heartbeat" in workers.dead_reason and workers.lost_since is not None
        beat = context.socket(zmq.DEALER)
        beat.setsockopt(zmq.IDENTITY, b"worker-0-hb")
        beat.connect(workers.endpoint)

        async def beat_again() -> None:  # it beats on, as a woken worker does
            while True:
                await beat.send(protocol.encode(protocol.Heartbeat(rank=0, pid=os.getpid())))
                await asyncio.sleep(0.2)

        beating = asyncio.create_task(beat_again())
        assert isinstance(await asyncio.wait_for(worker.next_plan(), 60), protocol.Reregister)
        beating.cancel()
        await worker.register()
        await until(lambda: workers.is_registered and workers.generation == 2, 30)
        assert workers.lost_since is None
        beat.close(linger=0)


@pytest.mark.parametrize("change", [{"num_kv_blocks": 32}, {"model_fingerprint": "other"}, {"block_size": 32}])
async def test_a_returning_worker_that_cannot_serve_the_sized_scheduler_is_refused(change):
    async with registered_group() as (workers, worker, context):
        worker.socket.close(linger=0)
        await asyncio.sleep(0.1)
        replacement = FakeWorker(context, workers.endpoint)
        await send_hello(replacement.socket, pid=os.getpid() + 1, **change)
        await until(lambda: workers.num_dropped_frames == 1, 30)
        assert not workers.is_registered and workers.generation == 1
        assert "registered again" in workers.dead_reason


@pytest.mark.parametrize("flags, message", [
    (["--max-worker-restarts", "-1"], "--max-worker-restarts must be >= 0"),
    (["--worker-restart-timeout", "0"], "--worker-restart-timeout must be > 0"),
])
def test_serve_refuses_bad_restart_flags(tmp_path, flags, message):
    model_dir = write_tiny_model_dir(tmp_path / "model")
    with pytest.raises(SystemExit, match=message):
        cli.main(["serve", "--model", str(model_dir), *flags])
