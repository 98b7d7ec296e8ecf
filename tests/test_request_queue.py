"""RequestQueue and scheduling_key on their own, against keys worked out by hand."""

from __future__ import annotations

import math

import pytest

from scheduler_svc.request import Request, SamplingParams
from scheduler_svc.request_queue import RequestQueue, remaining_work, scheduling_key


def request(req_id: str, priority: int, arrival_time: float, sequence_number: int) -> Request:
    r = Request(req_id, [1], SamplingParams(max_tokens=1), arrival_time=arrival_time, priority=priority)
    r.sequence_number = sequence_number
    return r


def test_the_key_is_the_aged_priority_then_the_arrival_order():
    r = request("r", priority=3, arrival_time=20.0, sequence_number=5)
    assert scheduling_key(r, 10.0) == (5.0, 5)  # 3 + 20 s / 10 s per level
    assert scheduling_key(r, math.inf) == (3.0, 5)  # strict priorities: no aging term
    assert scheduling_key(request("s", -2, 5.0, 1), 2.5) == (0.0, 1)


def test_the_queue_keeps_key_order_through_adds_and_removals():
    queue = RequestQueue(aging_s=10.0)
    a = request("a", priority=1, arrival_time=0.0, sequence_number=0)  # key 1.0
    b = request("b", priority=0, arrival_time=15.0, sequence_number=1)  # key 1.5
    c = request("c", priority=0, arrival_time=5.0, sequence_number=2)  # key 0.5
    d = request("d", priority=1, arrival_time=0.0, sequence_number=3)  # key 1.0, after a
    for r in (b, d, a, c):
        queue.add(r)
    assert [r.req_id for r in queue] == ["c", "a", "d", "b"]
    assert (len(queue), bool(queue), queue[0], queue[3]) == (4, True, c, b)
    assert queue.pop_first() is c
    queue.remove(d)
    assert [r.req_id for r in queue] == ["a", "b"]
    queue.remove(a)
    queue.remove(b)
    assert (len(queue), bool(queue)) == (0, False)


def test_aging_must_be_positive():
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match=r"aging_s must be > 0 \(inf: no aging\), got"):
            RequestQueue(bad)
    assert RequestQueue(0.5).aging_s == 0.5 and RequestQueue(math.inf).aging_s == math.inf


def test_remaining_work_is_what_is_left_to_compute_plus_what_may_still_be_generated():
    r = Request("r", list(range(10)), SamplingParams(max_tokens=5))
    r.output_token_ids = [7, 8]
    r.num_computed_tokens = 8
    assert remaining_work(r) == (12 - 8) + (5 - 2)


def test_an_unknown_policy_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"^policy must be one of priority, sjf, fcfs, got 'lifo'$"):
        RequestQueue(1.0, policy="lifo")
