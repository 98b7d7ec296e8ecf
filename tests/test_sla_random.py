"""1,000 random requests with priorities and tenants under memory and slot pressure, for every
scheduling policy and both admission rules: outputs equal the uncontended reference, no priority
preemption ever breaks its rules (a strictly better newcomer admitted in that step, no victim
inside its guard), and the run ends with the KV pool and the swap space whole. Lifetime admission
must preempt for memory less than immediate admission on the same requests, and report a forecast
outcome for every request that finished without being aborted."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.scheduler import QueueFullError, Scheduler
from tests.test_scheduler import FakeWorker, make_config, random_request, reference_output

TENANTS = ["", "a", "b", "c"]


def check_pool(scheduler: Scheduler, worker: FakeWorker) -> None:
    running_ids = [r.req_id for r in scheduler.running]
    assert set(worker.block_tables) == set(running_ids)
    held = Counter(b for req_id in running_ids for b in scheduler.block_manager.get_block_ids(req_id))
    for block_id, num_holders in held.items():
        assert scheduler.block_manager.blocks[block_id].ref_cnt == num_holders
    assert len(held) + scheduler.block_manager.num_free_blocks == scheduler.config.num_kv_blocks
    assert len(running_ids) <= scheduler.config.max_num_seqs


def check_priority_preemptions(scheduler: Scheduler, step_id: int, guards: dict[str, int]) -> int:
    """The step's priority victims: each was outside its guard, and a newcomer of strictly better
    priority was admitted in the same step. Returns how many there were."""
    record = scheduler.records[-1]
    victims = [scheduler.requests[i] for i in record.preempted_req_ids
               if i in scheduler.requests and scheduler.requests[i].preempted_for_priority]
    if not victims:
        return 0
    admitted = [scheduler.requests[i] for i in record.new_req_ids + record.resumed_req_ids]
    assert admitted, "preempted for priority, but nobody was admitted"
    best = min(r.priority for r in admitted)
    for victim in victims:
        assert best < victim.priority, "equal or lower priority preempted"
        assert step_id >= guards.get(victim.req_id, 0), "preempted inside its guard"
    return len(victims)


@pytest.mark.parametrize("policy, preemption_mode, admission", [
    ("priority", "recompute", "immediate"), ("priority", "swap", "immediate"), ("sjf", "recompute", "immediate"),
    ("fcfs", "recompute", "immediate"), ("priority", "recompute", "lifetime"), ("sjf", "swap", "lifetime"),
    ("fcfs", "recompute", "lifetime"),
])
def test_long_random_run_with_priorities_tenants_and_policies(policy, preemption_mode, admission):
    causes = random_run(policy, preemption_mode, admission)
    assert (causes["priority"] > 20) == (policy != "fcfs")
    if admission == "immediate":
        assert causes["memory"] > 20
    else:
        assert causes["memory"] < random_run(policy, preemption_mode, "immediate")["memory"]


def random_run(policy: str, preemption_mode: str, admission: str) -> dict[str, int]:
    """One checked run (see the module docstring); its preemptions by cause."""
    rng = random.Random(15_000 + len(policy))
    max_model_len = 32
    scheduler = Scheduler(make_config(
        num_kv_blocks=20, max_model_len=max_model_len, max_num_seqs=4, max_num_batched_tokens=16,
        max_queued_requests=20, watermark=0.1, preemption_mode=preemption_mode, num_swap_blocks=8,
        priority_aging_s=200.0, scheduling_policy=policy, priority_preemption_guard_steps=3,
        tenant_weights={"a": 2.0}, fair_share_half_life_steps=50, admission=admission,
    ))
    outcomes = []
    scheduler.length_forecast.on_outcome = lambda forecast, actual: outcomes.append(actual)
    worker = FakeWorker()
    requests: dict[str, Request] = {}
    outputs: dict[str, list[int]] = {}
    aborted: set[str] = set()
    backlog = []
    for i in range(1000):
        request = random_request(rng, f"r{i}", max_model_len)
        request.priority = rng.choice([0, 0, 1, 2, -1])
        request.tenant = rng.choice(TENANTS)
        backlog.append(request)
    backlog.reverse()
    num_priority_preemptions, clock = 0, 0.0
    while backlog or scheduler.has_unfinished_requests():
        clock += 1.0
        for _ in range(rng.choice([0, 0, 1, 1, 2, 4])):
            if backlog:
                backlog[-1].arrival_time = clock
                try:
                    scheduler.add_request(backlog[-1])
                except QueueFullError:
                    break
                request = backlog.pop()
                requests[request.req_id], outputs[request.req_id] = request, []
        if rng.random() < 0.03 and scheduler.requests:
            victim = rng.choice(sorted(scheduler.requests))
            scheduler.abort_requests([victim])
            aborted.add(victim)
        if not scheduler.has_unfinished_requests():
            continue
        guards = {r.req_id: r.priority_guard_until_step for r in scheduler.running}
        plan = scheduler.schedule()
        assert plan.new_requests or plan.cached_requests, "unfinished requests but nothing runs"
        num_priority_preemptions += check_priority_preemptions(scheduler, plan.step_id, guards)
        result = worker.execute(plan)
        check_pool(scheduler, worker)
        for update in scheduler.update_from_output(plan, result):
            outputs[update.req_id] += update.new_token_ids

    assert scheduler.block_manager.num_free_blocks == scheduler.config.num_kv_blocks
    assert scheduler.swap_pool.num_free_blocks == 8 and scheduler.num_swapped == 0
    assert len(requests) == 1000 and scheduler.num_waiting == scheduler.num_running == 0
    for req_id, request in requests.items():
        expected, expected_status = reference_output(request, max_model_len)
        if req_id in aborted:
            assert expected[: len(outputs[req_id])] == outputs[req_id]
        else:
            assert outputs[req_id] == expected, req_id
            assert request.status == expected_status
    causes = scheduler.num_preemptions_by_cause
    assert causes["priority"] == num_priority_preemptions
    assert sum(r.num_preemptions for r in requests.values()) == causes["priority"] + causes["memory"]
    assert set(r.status for r in requests.values()) >= {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH}
    assert sorted(outcomes) == sorted(r.num_tokens for r in requests.values() if r.req_id not in aborted)
    return causes
