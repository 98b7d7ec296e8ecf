"""Static batching (`scheduling="static"`): exact decisions on tiny pools.

A static batch is the set of requests admitted together: the first `max_num_seqs` waiting when the
previous batch has wholly finished. No newcomer joins it while any member runs or waits to resume.
The harness and fake worker are the continuous scheduler's (tests/test_scheduler.py).
"""

from __future__ import annotations

import random

import pytest

from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.scheduler import QueueFullError, Scheduler
from tests.test_scheduler import (
    FakeWorker,
    Harness,
    check_worker_view,
    make_config,
    make_request,
    random_request,
    reference_output,
)


def late_arrival_script(h: Harness) -> list[dict[str, int]]:
    """a and b start together; c arrives after the first step. Tokens per step until done."""
    h.add(make_request("a", 4, max_tokens=2), make_request("b", 5, max_tokens=4))
    steps = [h.step_tokens()]
    h.add(make_request("c", 3, max_tokens=2))
    while h.scheduler.has_unfinished_requests():
        steps.append(h.step_tokens())
    return steps


def test_nobody_joins_a_running_batch():
    h = Harness(scheduling="static")
    assert late_arrival_script(h) == [
        {"a": 4, "b": 5},
        {"a": 1, "b": 1},  # a finishes; c waits although budget and blocks are free
        {"b": 1},
        {"b": 1},  # b, the batch's longest member, finishes
        {"c": 3},
        {"c": 1},
    ]


def test_continuous_mode_is_unchanged_on_the_same_script():
    h = Harness()  # scheduling defaults to continuous
    assert h.scheduler.config.scheduling == "continuous"
    assert late_arrival_script(h) == [
        {"a": 4, "b": 5},
        {"a": 1, "b": 1, "c": 3},
        {"b": 1, "c": 1},
        {"b": 1},
    ]


def test_next_batch_starts_the_step_after_the_last_member_finishes():
    h = Harness(scheduling="static")
    h.add(make_request("a", 4, max_tokens=1), make_request("b", 4, max_tokens=2))
    h.step()
    h.add(make_request("c", 4, max_tokens=1))
    plan, updates = h.step()
    assert [(u.req_id, u.status) for u in updates] == [("b", RequestStatus.FINISHED_LENGTH)]
    assert plan.new_requests == []
    plan, _ = h.step()
    assert plan.finished_req_ids == ["b"]
    assert [r.req_id for r in plan.new_requests] == ["c"]
    assert [(r.step_id, r.new_req_ids) for r in h.scheduler.records] == [
        (0, ["a", "b"]), (1, []), (2, ["c"])
    ]


def test_batch_size_is_capped_at_max_num_seqs():
    h = Harness(scheduling="static", max_num_seqs=2)
    h.add(*(make_request(r, 4, max_tokens=m) for r, m in zip("abcde", (1, 3, 2, 2, 1))))
    steps = []
    while h.scheduler.has_unfinished_requests():
        steps.append(h.step_tokens())
    assert steps == [
        {"a": 4, "b": 4},
        {"b": 1},
        {"b": 1},
        {"c": 4, "d": 4},
        {"c": 1, "d": 1},
        {"e": 4},
    ]


def test_prompts_beyond_the_budget_are_chunked_in_before_any_newcomer():
    h = Harness(scheduling="static", max_num_seqs=3, max_num_batched_tokens=8, num_kv_blocks=16)
    h.add(*(make_request(r, 6, max_tokens=4) for r in "abcd"))  # d: beyond the batch size
    assert h.step_tokens() == {"a": 6, "b": 2}
    h.add(make_request("e", 1, max_tokens=1))  # a newcomer while the batch is still forming
    assert h.step_tokens() == {"a": 1, "b": 4, "c": 3}
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 3}
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 1}  # a finishes; budget is free, d waits
    assert h.step_tokens() == {"b": 1, "c": 1}  # b finishes
    assert h.step_tokens() == {"c": 1}  # c, the last member, finishes
    assert h.step_tokens() == {"d": 6, "e": 1}


def test_preempted_member_resumes_before_any_newcomer():
    h = Harness(scheduling="static", num_kv_blocks=7)
    h.add(make_request("a", 7, max_tokens=3), make_request("b", 7), make_request("c", 7))
    assert h.step_tokens() == {"a": 7, "b": 7, "c": 7}
    h.add(make_request("d", 2, max_tokens=1))
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 1}  # continuous would admit d to the free block
    assert h.step_tokens() == {"a": 1, "b": 1}  # c preempted; a finishes, freeing 3 blocks
    assert h.scheduler.records[-1].preempted_req_ids == ["c"]
    # b's third block evicts c's freed tail block; c's head block is still cached (4 tokens).
    assert h.step_tokens() == {"b": 1, "c": 5}
    assert h.scheduler.records[-1].resumed_req_ids == ["c"]
    assert h.step_tokens() == {"b": 1, "c": 1}  # d would fit the one free block, but waits
    assert h.scheduler.block_manager.num_free_blocks == 1


def test_aborting_members_ends_the_batch_early():
    h = Harness(scheduling="static", max_num_seqs=2, max_num_batched_tokens=4)
    h.add(make_request("a", 4), make_request("b", 4), make_request("c", 4))
    assert h.step_tokens() == {"a": 4}  # b is a member still waiting for budget
    h.scheduler.abort_requests(["b"])
    assert h.step_tokens() == {"a": 1}  # c is not a member
    h.scheduler.abort_requests(["a"])
    assert h.step_tokens() == {"c": 4}


def test_config_rejects_an_unknown_policy():
    assert make_config(scheduling="static").scheduling == "static"
    with pytest.raises(ValueError, match="scheduling"):
        make_config(scheduling="dynamic")


def test_long_random_run_keeps_batches_closed():
    """Random arrivals, aborts and memory pressure: outputs match the uncontended reference, and
    every request admitted during one batch was waiting when that batch formed."""
    rng = random.Random(20240607)
    max_model_len, max_num_seqs = 32, 4
    config = make_config(
        num_kv_blocks=14, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=16, max_queued_requests=20, watermark=0.1, scheduling="static",
    )
    scheduler, worker = Scheduler(config), FakeWorker()
    backlog = [random_request(rng, f"r{i}", max_model_len) for i in range(300)][::-1]
    requests: dict[str, Request] = {}
    arrival: dict[str, int] = {}
    aborted: set[str] = set()
    eligible: set[str] = set()
    admitted: set[str] = set()
    num_batches = 0
    while backlog or scheduler.has_unfinished_requests():
        for _ in range(rng.choice([0, 1, 1, 2, 4])):
            if not backlog:
                break
            try:
                scheduler.add_request(backlog[-1])
            except QueueFullError:
                break
            request = backlog.pop()
            requests[request.req_id] = request
            arrival[request.req_id] = len(arrival)
        if rng.random() < 0.03 and scheduler.requests:
            victim = rng.choice(sorted(scheduler.requests))
            scheduler.abort_requests([victim])
            aborted.add(victim)
        if not scheduler.has_unfinished_requests():
            continue
        if not scheduler.running and not any(
            r.status == RequestStatus.PREEMPTED for r in scheduler.waiting
        ):
            eligible, admitted = {r.req_id for r in scheduler.waiting}, set()
            num_batches += 1
        plan = scheduler.schedule()
        assert plan.new_requests or plan.cached_requests, "unfinished requests but nothing runs"
        admitted.update(scheduler.records[-1].new_req_ids)
        assert admitted <= eligible, f"{admitted - eligible} joined a running batch"
        assert len(admitted) <= max_num_seqs
        result = worker.execute(plan)
        check_worker_view(scheduler, worker, arrival)
        scheduler.update_from_output(plan, result)
    assert num_batches > 50
    assert sum(r.num_preemptions for r in requests.values()) > 30 and len(aborted) > 20
    for req_id, request in requests.items():
        if req_id not in aborted:
            expected, status = reference_output(request, max_model_len)
            assert (request.output_token_ids, request.status) == (expected, status)
