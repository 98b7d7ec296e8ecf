"""The priority-preemption room estimate with the prefix cache on: a newcomer's hit on a block
that only its victims hold is no free saving. Preempting them returns the block to the free queue
with its hash, and `BlockManager.allocate_slots` then charges the hit one free block to revive it,
so the estimate must count it as needed as well as freed.

Block size 4 (tests/test_scheduler.py). Every block count, victim and block id below is worked
out by hand from the rules in block_manager.py; outputs are checked against the fake worker's
uncontended reference.
"""

from __future__ import annotations

import math

from scheduler_svc.request import Request, SamplingParams
from tests.test_scheduler import NO_EOS, Harness, reference_output

PREFIX = list(range(100, 108))  # two full blocks


def request(req_id: str, prompt: list[int], priority: int, max_tokens: int = 2) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens), NO_EOS, priority=priority)


def start(keep_priority: int) -> tuple[Harness, list[Request]]:
    """A 5-block pool: `keep` (3 tokens, 2 to generate) holds block 0, `low` (PREFIX + 1, 6 to
    generate) holds blocks 1-3 with PREFIX cached in blocks 1 and 2, held by low alone; block 4 is
    free. Neither grows in the next two steps (at most 4 and 11 tokens). Then `high` (PREFIX + 9
    = 17 tokens, 5 blocks) arrives: it hits blocks 1 and 2 and needs 3 new ones."""
    h = Harness(num_kv_blocks=5, priority_aging_s=math.inf)
    keep = request("keep", [900, 901, 902], keep_priority)
    low = request("low", PREFIX + [500], priority=2, max_tokens=6)
    h.add(keep, low)
    assert h.step_tokens() == {"keep": 3, "low": 9}
    manager = h.scheduler.block_manager
    assert (manager.get_block_ids("keep"), manager.get_block_ids("low")) == ([0], [1, 2, 3])
    assert manager.free_block_ids == [4]
    high = request("high", PREFIX + list(range(600, 609)), priority=0)
    h.add(high)
    return h, [keep, low, high]


def run_to_end_and_check(h: Harness, requests: list[Request]) -> None:
    while h.scheduler.has_unfinished_requests():
        h.step()
    for r in requests:
        assert r.output_token_ids == reference_output(r, 64)[0], r.req_id
    assert h.scheduler.block_manager.num_free_blocks == 5


def test_a_hit_on_a_block_only_the_victims_hold_is_paid_for_so_both_are_preempted():
    # Preempting low alone frees 3 blocks, 4 free; but then high's hits 1 and 2 are free blocks
    # to revive: 3 new + 2 revived = 5 > 4. Preempting keep too gives 5 free: enough.
    # (Counting the hits as freed but not as revived, preempting low alone looks enough.)
    h, requests = start(keep_priority=1)
    assert h.step_tokens() == {"high": 9}
    record = h.scheduler.records[-1]
    assert (record.preempted_req_ids, record.new_req_ids) == (["low", "keep"], ["high"])
    assert h.scheduler.num_preemptions_by_cause == {"memory": 0, "priority": 2}
    # Free queue after the preemptions: 4, low's 3, 2, 1 (tail-first), keep's 0. The hits 1, 2
    # are revived from it; the 3 new blocks come from its front: 4, 3, 0.
    assert h.scheduler.block_manager.get_block_ids("high") == [1, 2, 4, 3, 0]
    run_to_end_and_check(h, requests)


def test_no_priority_preemption_when_the_victim_frees_the_newcomers_hits_only():
    # keep is high's equal, so low is the only victim, and preempting it leaves high 1 block
    # short (above). Nobody is preempted: high waits until keep finishes, then preempts low.
    h, requests = start(keep_priority=0)
    assert h.step_tokens() == {"keep": 1, "low": 1}
    assert h.scheduler.records[-1].preempted_req_ids == []
    # keep finished in that step: blocks 4, 0 free. With low kept, high's 3 new blocks do not
    # fit in 2; with low preempted, 2 + 3 freed = 5 = 3 new + 2 revived.
    assert h.step_tokens() == {"high": 9}
    record = h.scheduler.records[-1]
    assert (record.preempted_req_ids, record.new_req_ids) == (["low"], ["high"])
    # Free queue: 4, 0, then low's 3, 2, 1; hits 1, 2 revived, new blocks 4, 0, 3.
    assert h.scheduler.block_manager.get_block_ids("high") == [1, 2, 4, 0, 3]
    run_to_end_and_check(h, requests)
