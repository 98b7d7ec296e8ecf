"""Swap preemption: exact decisions on tiny pools, the cost rule, and the worker's swap space.

The fake worker (tests/test_scheduler.py) copies its fake K/V between the pool and a fake swap
space as plans say, and samples from what it reads back, so swapped data that is lost, misplaced
or stale changes the output.
"""

from __future__ import annotations

import pytest
import torch

from scheduler_svc.preemption_cost import PreemptionCost
from scheduler_svc.request import RequestStatus
from tests.test_scheduler import (
    Harness,
    make_request,
    reference_output,
    run_to_completion,
    schedule_twice_preempting_a_request_in_flight,
)
from worker_svc.kv_cache import KVCacheSpec, allocate_kv_caches
from worker_svc.swap_space import SwapSpace


def swap_harness(**overrides) -> Harness:
    """Three requests of 7 tokens fill a 6-block pool; each needs a third block at token 9."""
    config = dict(num_kv_blocks=6, preemption_mode="swap", num_swap_blocks=4)
    config.update(overrides)
    h = Harness(**config)
    h.add(make_request("a", 7, max_tokens=3), make_request("b", 7), make_request("c", 7))
    h.step()
    h.step()
    return h


def test_the_victim_is_swapped_out_keeping_its_computed_tokens():
    h = swap_harness()
    plan, _ = h.step()
    c = h.scheduler.get_request("c")
    assert h.scheduler.records[-1].swapped_out_req_ids == ["c"]
    assert plan.swap_out == [(4, 0), (5, 1)]  # c's two blocks into swap blocks 0 and 1
    assert plan.finished_req_ids == ["c"]  # the worker drops its state; it is resent on resume
    assert (c.status, c.num_computed_tokens, c.num_preemptions) == (RequestStatus.SWAPPED, 8, 1)
    assert h.scheduler.num_swapped == 1 and h.scheduler.swap_pool.num_free_blocks == 2


def test_a_swapped_request_resumes_from_its_copied_blocks():
    h = swap_harness()
    h.step()  # swaps c out; a finishes and frees three blocks
    plan, _ = h.step()
    [resumed] = plan.new_requests
    assert (resumed.req_id, resumed.num_computed_tokens, resumed.num_new_tokens) == ("c", 8, 1)
    assert plan.swap_in == [(resumed.block_ids[0], 0), (resumed.block_ids[1], 1)]
    assert h.scheduler.records[-1].swapped_in_req_ids == ["c"]
    assert h.scheduler.records[-1].resumed_req_ids == ["c"]
    assert h.scheduler.swap_pool.num_free_blocks == 4


def test_swapped_outputs_equal_the_unpreempted_run():
    h = swap_harness()
    outputs: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    while h.scheduler.has_unfinished_requests():
        _, updates = h.step()
        for update in updates:
            outputs[update.req_id] += update.new_token_ids
    assert any(r.swapped_in_req_ids for r in h.scheduler.records)
    for name, max_tokens in (("a", 3), ("b", 8), ("c", 8)):
        request = make_request(name, 7, max_tokens=max_tokens)
        assert outputs[name] == reference_output(request, 64)[0][2:]  # the first two came earlier
    assert h.scheduler.block_manager.num_free_blocks == 6


def test_without_room_in_the_swap_space_the_victim_is_recomputed():
    h = swap_harness(num_swap_blocks=1)
    h.step()
    c = h.scheduler.get_request("c")
    assert (c.status, c.num_computed_tokens) == (RequestStatus.PREEMPTED, 0)
    assert h.scheduler.records[-1].swapped_out_req_ids == []


def test_recompute_mode_never_swaps():
    h = swap_harness(preemption_mode="recompute", kv_bytes_per_block=1000, swap_bytes_per_s=1e6)
    h.scheduler.observe_step_time(100, 1.0)  # the cost rule alone would swap (see below)
    plan, _ = h.step()
    assert plan.swap_out == [] and h.scheduler.get_request("c").status == RequestStatus.PREEMPTED


def test_aborting_a_swapped_request_frees_its_swap_blocks():
    h = swap_harness()
    h.step()
    h.scheduler.abort_requests(["c"])
    assert h.scheduler.swap_pool.num_free_blocks == 4 and h.scheduler.num_swapped == 0


def test_a_worker_loss_recomputes_swapped_and_running_requests_past_unknown_ids():
    """`recompute_requests` after a worker loss: an unknown id does not stop the walk, and a
    swapped-out request counts as one that had K/V (its swap blocks died with the worker)."""
    h = swap_harness()
    h.step()  # swaps c out
    assert h.scheduler.get_request("c").status == RequestStatus.SWAPPED
    had_kv = h.scheduler.recompute_requests(["gone", "c", "b"])
    assert had_kv == ["c", "b"]
    assert h.scheduler.swap_pool.num_free_blocks == 4 and h.scheduler.num_swapped == 0
    for req_id in ("b", "c"):
        request = h.scheduler.get_request(req_id)
        assert (request.status, request.num_computed_tokens) == (RequestStatus.PREEMPTED, 0)


def test_a_victim_whose_token_is_still_being_sampled_is_recomputed_not_swapped():
    # Swapped, it would keep num_computed_tokens past its last token, whose result is dropped
    # (it no longer runs): it would wait forever for a token nobody computes.
    h, first, second = schedule_twice_preempting_a_request_in_flight(
        preemption_mode="swap", num_swap_blocks=8
    )
    c, d = h.scheduler.get_request("c"), h.scheduler.get_request("d")
    assert (c.status, c.num_computed_tokens, second.swap_out) == (RequestStatus.PREEMPTED, 0, [])
    for plan, result in [(first, h.worker.execute(first)), (second, h.worker.execute(second))]:
        h.scheduler.update_from_output(plan, result)
    run_to_completion(h)
    assert c.output_token_ids == reference_output(make_request("c", 8), 64)[0]
    assert d.output_token_ids == reference_output(make_request("d", 20, max_tokens=2), 64)[0]
    assert h.scheduler.swap_pool.num_free_blocks == 8


def test_auto_mode_swaps_only_when_the_cost_rule_says_it_is_cheaper():
    h = swap_harness(preemption_mode="auto", kv_bytes_per_block=1000, swap_bytes_per_s=1e6)
    # No prefill-sized step seen yet: the recompute cost is unknown, so recompute.
    h.step()
    assert h.scheduler.get_request("c").status == RequestStatus.PREEMPTED

    h = swap_harness(preemption_mode="auto", kv_bytes_per_block=1000, swap_bytes_per_s=1e6)
    h.scheduler.observe_step_time(100, 1.0)  # 10 ms a token: 8 tokens cost 80 ms to recompute
    h.step()  # swapping 2 blocks out and back costs 2 * 2 * 1000 B / 1 MB/s = 4 ms
    assert h.scheduler.get_request("c").status == RequestStatus.SWAPPED


def test_cost_rule_figures():
    cost = PreemptionCost(kv_bytes_per_block=2048, swap_bytes_per_s=1e9)
    assert cost.recompute_s(100) is None and not cost.prefers_swap(100, 7)
    cost.observe_step(10, 1.0)  # too small a step to say anything about prefill
    assert cost.seconds_per_token is None
    cost.observe_step(200, 0.2)
    cost.observe_step(100, 0.2)
    assert cost.seconds_per_token == pytest.approx(0.001 + 0.2 * (0.002 - 0.001))
    assert cost.swap_s(10) == pytest.approx(2 * 10 * 2048 / 1e9)
    assert cost.prefers_swap(1000, 10) and not cost.prefers_swap(0, 10)
    assert not PreemptionCost(2048, 0.0).prefers_swap(10**6, 1)  # no swap space measured


SPEC = KVCacheSpec(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def random_pool(num_blocks: int):
    caches = allocate_kv_caches(SPEC, num_blocks, "cpu")
    for k, v in caches:
        k.normal_()
        v.normal_()
    return caches


def test_swap_space_round_trip_moves_exactly_the_named_blocks(seed):
    caches = random_pool(6)
    original = [(k.clone(), v.clone()) for k, v in caches]
    swap = SwapSpace(SPEC, 3, torch.device("cpu"))
    swap.swap_out(caches, [(4, 2), (1, 0)])
    for k, v in caches:  # the freed blocks are reused and overwritten
        k[[1, 4]] = float("nan")
        v[[1, 4]] = float("nan")
    swap.swap_in(caches, [(5, 2), (0, 0)])  # back into other blocks
    for (k, v), (k0, v0) in zip(caches, original):
        assert torch.equal(k[5], k0[4]) and torch.equal(v[5], v0[4])
        assert torch.equal(k[0], k0[1]) and torch.equal(v[0], v0[1])
        assert torch.equal(k[[2, 3]], k0[[2, 3]])  # untouched blocks stay
    with pytest.raises(ValueError, match="outside the pools"):
        swap.check([(6, 0)], num_device_blocks=6)
    with pytest.raises(ValueError, match="outside the pools"):
        swap.check([(0, 3)], num_device_blocks=6)


def test_swap_space_measures_a_rate_and_leaves_the_pool_intact(seed):
    caches = random_pool(6)
    before = [(k.clone(), v.clone()) for k, v in caches]
    rate = SwapSpace(SPEC, 4, torch.device("cpu")).measure_bytes_per_s(caches, SPEC.bytes_per_block)
    assert rate > 0
    for (k, v), (k0, v0) in zip(caches, before):
        assert torch.equal(k, k0) and torch.equal(v, v0)
