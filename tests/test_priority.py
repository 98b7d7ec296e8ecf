"""Priorities with aging: exact order on tiny pools, and a starvation test that can fail.

Lower `priority` runs first; one priority level is worth `priority_aging_s` seconds of waiting
(scheduler_svc/request_queue.py). Arrival times are set by hand: the order never reads a clock.
"""

from __future__ import annotations

import math
import zlib

from scheduler_svc.request import Request, SamplingParams
from tests.test_scheduler import NO_EOS, Harness, reference_output


def request(req_id: str, priority: int = 0, arrival_time: float = 0.0, num_prompt_tokens: int = 4,
            max_tokens: int = 2, tenant: str = "") -> Request:
    prompt = [zlib.crc32(req_id.encode()) % 900 + i for i in range(num_prompt_tokens)]
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens), NO_EOS,
                   arrival_time=arrival_time, priority=priority, tenant=tenant)


def admitted_order(h: Harness) -> list[str]:
    order = []
    while h.scheduler.has_unfinished_requests():
        h.step()
        order += h.scheduler.records[-1].new_req_ids
    return order


def test_lower_priority_value_runs_first_and_fcfs_within_a_priority():
    h = Harness(max_num_seqs=1, priority_aging_s=math.inf)
    h.add(request("low-1", priority=2), request("high-1", priority=0), request("mid", priority=1),
          request("high-2", priority=0), request("low-2", priority=2))
    assert admitted_order(h) == ["high-1", "high-2", "mid", "low-1", "low-2"]


def test_waiting_ages_one_level_per_priority_aging_s():
    h = Harness(max_num_seqs=1, priority_aging_s=10.0)
    # key = priority + arrival / 10: old-low 1.0, young-high 0 + 1.5 = 1.5, later-high 0 + 0.5.
    h.add(request("old-low", priority=1, arrival_time=0.0), request("young-high", priority=0, arrival_time=15.0),
          request("later-high", priority=0, arrival_time=5.0))
    assert admitted_order(h) == ["later-high", "old-low", "young-high"]


def test_victim_is_the_lowest_priority_latest_arrival_among_running():
    # Three 7-token requests fill a 6-block pool; each needs a third block at token 9.
    h = Harness(num_kv_blocks=6, priority_aging_s=math.inf)
    h.add(request("low", priority=1, num_prompt_tokens=7, max_tokens=4),
          request("high-a", priority=0, num_prompt_tokens=7, max_tokens=4),
          request("high-b", priority=0, num_prompt_tokens=7, max_tokens=4))
    h.step()
    assert [r.req_id for r in h.scheduler.running] == ["high-a", "high-b", "low"]
    h.step()
    h.step()
    assert h.scheduler.records[-1].preempted_req_ids == ["low"]
    assert [r.req_id for r in h.scheduler.waiting] == ["low"]


def test_a_preempted_request_goes_back_before_later_arrivals_of_its_priority():
    h = Harness(num_kv_blocks=6, priority_aging_s=math.inf)
    h.add(request("a", num_prompt_tokens=7, max_tokens=4), request("b", num_prompt_tokens=7, max_tokens=4),
          request("c", num_prompt_tokens=7, max_tokens=4))
    h.step()
    h.step()
    h.add(request("d", arrival_time=1.0))
    h.step()
    assert h.scheduler.records[-1].preempted_req_ids == ["c"]
    assert [r.req_id for r in h.scheduler.waiting] == ["c", "d"]


def flood(priority_aging_s: float, num_steps: int) -> Request:
    """max_num_seqs=1; one high-priority request arrives every simulated second, each taking
    about 2 s; a priority-5 request arrives at t=0.5. Returns it after `num_steps` steps."""
    h = Harness(max_num_seqs=1, priority_aging_s=priority_aging_s)
    low = request("low", priority=5, arrival_time=0.5)
    h.add(request("high-0", arrival_time=0.0), low)
    for step in range(1, num_steps + 1):
        h.add(request(f"high-{step}", arrival_time=float(step)))  # one step = one second
        h.step()
    return low


def test_a_low_priority_request_completes_under_a_flood_of_high_priority_work():
    low = flood(priority_aging_s=2.0, num_steps=60)
    # It waits for the work that arrived before t = 0.5 + 5 * 2 s, then runs.
    assert low.status.is_finished
    assert low.output_token_ids == reference_output(request("low", priority=5), 64)[0]


def test_without_aging_the_same_flood_starves_it():
    low = flood(priority_aging_s=math.inf, num_steps=60)
    assert low.num_computed_tokens == 0 and not low.status.is_finished
