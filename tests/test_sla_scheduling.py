"""Scheduling for SLA tiers on tiny pools: preemptive priorities, the thrash guard, fair share
between tenants (with weights), shortest job first with aging, and FCFS.

Every expected order, victim and step below is worked out by hand from the rules in
scheduler_svc/request_queue.py and scheduler.py; outputs are checked against the fake worker's
uncontended reference (tests/test_scheduler.py), so a preemption that loses a token shows.
"""

from __future__ import annotations

import math

import pytest

from scheduler_svc.fair_share import TenantUsage, load_tenant_weights
from scheduler_svc.request import Request
from tests.test_priority import admitted_order
from tests.test_priority import request as priority_request
from tests.test_scheduler import Harness, reference_output

MAX_MODEL_LEN = 64  # make_config's


def request(req_id: str, priority: int = 0, arrival_time: float = 0.0, num_prompt_tokens: int = 4,
            max_tokens: int = 1, tenant: str = "") -> Request:
    """test_priority's requests, one output token by default."""
    return priority_request(req_id, priority, arrival_time, num_prompt_tokens, max_tokens, tenant)


def run_to_end_and_check(h: Harness, requests: list[Request]) -> None:
    while h.scheduler.has_unfinished_requests():
        h.step()
    for r in requests:
        assert r.output_token_ids == reference_output(r, MAX_MODEL_LEN)[0], r.req_id
    assert h.scheduler.block_manager.num_free_blocks == h.scheduler.config.num_kv_blocks


def last_record(h: Harness):
    return h.scheduler.records[-1]


# --- preemptive priorities ---------------------------------------------------------------------

def test_a_newcomer_that_outranks_a_full_batch_preempts_the_lowest_ranked_and_runs_at_once():
    h = Harness(max_num_seqs=2, priority_aging_s=math.inf)
    low1 = request("low1", priority=1, max_tokens=6)
    low2 = request("low2", priority=2, max_tokens=6)
    h.add(low1, low2)
    assert h.step_tokens() == {"low1": 4, "low2": 4}
    high = request("high", priority=0, max_tokens=3)
    h.add(high)
    assert h.step_tokens() == {"high": 4, "low1": 1}  # low2 ranks last: it makes the room
    record = last_record(h)
    assert (record.preempted_req_ids, record.new_req_ids) == (["low2"], ["high"])
    assert h.scheduler.num_preemptions_by_cause == {"memory": 0, "priority": 1}
    run_to_end_and_check(h, [low1, low2, high])


def test_a_full_kv_pool_gives_way_to_a_newcomer_with_the_fewest_victims():
    # 5 blocks of 4: a and b hold 2 each (7-token prompts, their 8th token fits), one is free;
    # high's 8-token prompt needs 2. Preempting c (lowest) frees 2: enough, so a and b stay.
    h = Harness(num_kv_blocks=5, priority_aging_s=math.inf)
    a = request("a", priority=1, num_prompt_tokens=3, max_tokens=2)
    b = request("b", priority=1, num_prompt_tokens=7, max_tokens=2)
    c = request("c", priority=2, num_prompt_tokens=4, max_tokens=5)
    h.add(a, b, c)
    assert h.step_tokens() == {"a": 3, "b": 7, "c": 4}
    assert h.scheduler.block_manager.num_free_blocks == 1
    high = request("high", priority=0, num_prompt_tokens=8, max_tokens=2)
    h.add(high)
    assert h.step_tokens() == {"high": 8, "a": 1, "b": 1}
    assert (last_record(h).preempted_req_ids, last_record(h).new_req_ids) == (["c"], ["high"])
    run_to_end_and_check(h, [a, b, c, high])


def test_no_preemption_when_no_victim_set_makes_room():
    # a, b, c hold 1 + 2 + 1 of 5 blocks and do not grow next step (3, 7, 3 computed tokens).
    # high needs 3 blocks; the only request it outranks (c) frees 1, a and b are its equals.
    h = Harness(num_kv_blocks=5, priority_aging_s=math.inf)
    a = request("a", priority=-1, num_prompt_tokens=3, max_tokens=3)
    b = request("b", priority=-1, num_prompt_tokens=7, max_tokens=2)
    c = request("c", priority=1, num_prompt_tokens=3, max_tokens=3)
    h.add(a, b, c)
    h.step()
    high = request("high", priority=-1, num_prompt_tokens=12, max_tokens=1)
    h.add(high)
    h.step()
    assert last_record(h).preempted_req_ids == [] and last_record(h).new_req_ids == []
    run_to_end_and_check(h, [a, b, c, high])


def test_equal_priorities_never_preempt_each_other_even_when_aging_ranks_the_newcomer_first():
    h = Harness(max_num_seqs=1, priority_aging_s=10.0)
    running = request("running", priority=0, arrival_time=5.0, max_tokens=4)
    h.add(running)
    h.step()
    older = request("older", priority=0, arrival_time=0.0)  # aged key 0.0 < running's 0.5
    h.add(older)
    steps = [h.step_tokens() for _ in range(4)]
    assert steps == [{"running": 1}, {"running": 1}, {"running": 1}, {"older": 4}]
    assert h.scheduler.num_preemptions_by_cause["priority"] == 0


def test_a_higher_priority_that_aging_ranks_after_the_running_request_does_not_preempt():
    h = Harness(max_num_seqs=1, priority_aging_s=10.0)
    low = request("low", priority=1, arrival_time=0.0, max_tokens=3)  # key 1.0
    h.add(low)
    h.step()
    h.add(request("late-high", priority=0, arrival_time=15.0))  # key 1.5: ranks after low
    assert [h.step_tokens() for _ in range(3)] == [{"low": 1}, {"low": 1}, {"late-high": 4}]


def guarded_run(guard_steps: int) -> list[dict[str, int]]:
    """low runs; high1 preempts it and finishes in one step; low resumes (step 2); high2 is added
    after step 2. Returns the tokens of steps 3..7."""
    h = Harness(max_num_seqs=1, priority_aging_s=math.inf, priority_preemption_guard_steps=guard_steps)
    low = request("low", priority=1, max_tokens=12)
    h.add(low)
    assert h.step_tokens() == {"low": 4}
    h.add(request("high1", priority=0))
    assert h.step_tokens() == {"high1": 4}
    # Resumed: its prompt's full block is a prefix-cache hit, its first output is recomputed.
    assert h.step_tokens() == {"low": 1} and last_record(h).resumed_req_ids == ["low"]
    h.add(request("high2", priority=0))
    steps = [h.step_tokens() for _ in range(5)]
    run_to_end_and_check(h, [low])
    return steps


def test_the_thrash_guard_protects_a_resumed_victim_for_the_guard_steps():
    # Resumed in step 2 with a guard of 3: priority may preempt it again from step 5. Each resume
    # recomputes what follows its first full block: 8 - 4 tokens after step 5, 6 - 4 after step 3.
    assert guarded_run(3) == [{"low": 1}, {"low": 1}, {"high2": 4}, {"low": 4}, {"low": 1}]
    assert guarded_run(0) == [{"high2": 4}, {"low": 2}, {"low": 1}, {"low": 1}, {"low": 1}]


def test_static_scheduling_and_fcfs_never_preempt_for_priority():
    for overrides in ({"scheduling": "static"}, {"scheduling_policy": "fcfs"}):
        h = Harness(max_num_seqs=1, priority_aging_s=math.inf, **overrides)
        h.add(request("low", priority=1, max_tokens=3))
        h.step()
        h.add(request("high", priority=0))
        assert [h.step_tokens() for _ in range(3)] == [{"low": 1}, {"low": 1}, {"high": 4}], overrides


# --- fair share between tenants ------------------------------------------------------------------

def test_a_flooding_tenant_does_not_push_another_behind_its_backlog():
    h = Harness(max_num_seqs=1)
    flood = [request(f"a{i}", tenant="A") for i in range(1, 5)]
    h.add(*flood)
    h.step()  # a1 is served 4 tokens
    h.add(request("b1", tenant="B", arrival_time=0.1))
    assert [last_record(h).new_req_ids[0]] + admitted_order(h) == ["a1", "b1", "a2", "a3", "a4"]


def test_under_fcfs_the_same_tenant_waits_behind_the_flood():
    h = Harness(max_num_seqs=1, scheduling_policy="fcfs")
    h.add(*[request(f"a{i}", tenant="A") for i in range(1, 5)])
    h.step()
    h.add(request("b1", tenant="B", arrival_time=0.1))
    assert [last_record(h).new_req_ids[0]] + admitted_order(h) == ["a1", "a2", "a3", "a4", "b1"]


def test_three_tenants_take_turns_least_served_first():
    # Each request is served 4 tokens. Shares (decay is tiny over 7 steps): a1 (all 0, key
    # order), b1, c1, then A=4 vs B=4 (A's decayed longer: A), B, then A alone.
    h = Harness(max_num_seqs=1)
    h.add(*[request(f"a{i}", tenant="A") for i in range(1, 5)],
          *[request(f"b{i}", tenant="B") for i in range(1, 3)], request("c1", tenant="C"))
    assert admitted_order(h) == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]


def test_weights_scale_a_tenants_share():
    # A weighs 2: its share is tokens / 2. No decay (huge half-life), so ties go to key order:
    # a1 (0 = 0), b1 (B 0 < A 2), a2 (2 < 4), a3 (4 = 4, a3 first in key order), b2 (8 > 4... B 4
    # < A 6), a4 (A 6 < B 8), b3, b4.
    h = Harness(max_num_seqs=1, tenant_weights={"A": 2.0}, fair_share_half_life_steps=10**9)
    h.add(*[request(f"a{i}", tenant="A") for i in range(1, 5)],
          *[request(f"b{i}", tenant="B") for i in range(1, 5)])
    assert admitted_order(h) == ["a1", "b1", "a2", "a3", "b2", "a4", "b3", "b4"]


def test_fair_share_never_lets_a_lower_priority_overtake():
    h = Harness(max_num_seqs=1, priority_aging_s=math.inf)
    h.add(*[request(f"a{i}", tenant="A") for i in range(1, 4)], request("b-low", priority=1, tenant="B"))
    assert admitted_order(h) == ["a1", "a2", "a3", "b-low"]


def test_fair_share_keeps_aging_between_levels():
    # Aging 10 s: p1 (arrival 0, key 1.0) sorts before b (p0, arrival 20, key 2.0) even though B
    # has been served nothing; a2 (p0, arrival 5, key 0.5) sorts before both.
    h = Harness(max_num_seqs=1, priority_aging_s=10.0)
    h.add(request("a1", tenant="A", arrival_time=0.0), request("a2", tenant="A", arrival_time=5.0),
          request("p1", priority=1, tenant="A", arrival_time=0.0),
          request("b", tenant="B", arrival_time=20.0))
    assert admitted_order(h) == ["a1", "a2", "p1", "b"]


def test_tenant_usage_decays_by_half_per_half_life_and_forgets_idle_tenants():
    usage = TenantUsage(half_life_steps=10, weights={"w": 4.0})
    usage.charge("t", 100, step=0)
    usage.charge("w", 100, step=0)
    assert usage.tokens("t", 10) == pytest.approx(50.0) and usage.tokens("t", 20) == pytest.approx(25.0)
    usage.charge("t", 10, step=10)
    assert usage.tokens("t", 10) == pytest.approx(60.0)
    assert usage.share("w", 10) == pytest.approx(12.5)  # 50 / 4
    usage.prune(step=80, keep={"w"})  # t: 60 / 2**7 < 1 token
    assert usage.num_tenants == 1
    with pytest.raises(ValueError, match="half_life_steps"):
        TenantUsage(half_life_steps=0)


def test_pruning_forgets_only_tenants_below_one_token_and_a_half_life_of_one_step_is_allowed():
    usage = TenantUsage(half_life_steps=1)
    usage.charge("one", 2, step=4)  # 1.0 at step 5: not below one token
    usage.charge("many", 50, step=5)
    usage.charge("half", 1, step=4)  # 0.5 at step 5
    assert usage.tokens("one", 5) == 1.0
    usage.prune(step=5, keep=set())
    assert usage.num_tenants == 2 and usage.tokens("many", 5) == 50.0 and usage.tokens("half", 5) == 0.0


def test_tenant_names_must_be_strings():
    with pytest.raises(ValueError, match=r"^tenant weights: tenant names must be strings, got 1$"):
        TenantUsage(weights={1: 2.0})


def test_tenant_weights_file(tmp_path):
    path = tmp_path / "weights.json"
    path.write_text('{"gold": 4, "": 0.5}')
    assert load_tenant_weights(path) == {"gold": 4.0, "": 0.5}
    for bad, message in (('{"a": 0}', "weight of 'a'"), ('{"a": "x"}', "weight of 'a'"),
                         ('[1]', "JSON object"), ('{', "cannot read"), ('{"a": true}', "weight of 'a'")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            load_tenant_weights(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_tenant_weights(tmp_path / "missing.json")


# --- shortest job first, FCFS ----------------------------------------------------------------------

def sjf_requests() -> list[Request]:
    # Work = prompt + max_tokens. Keys (aging 10 s, max_model_len 64): long 0 + 44/64 = 0.69,
    # short 6/64 = 0.09, short-at-5 0.5 + 0.09 = 0.59, short-at-7 0.7 + 0.09 = 0.79.
    return [request("long", max_tokens=40, arrival_time=0.0), request("short-at-7", max_tokens=2, arrival_time=7.0),
            request("short-at-5", max_tokens=2, arrival_time=5.0), request("short", max_tokens=2, arrival_time=0.0)]


@pytest.mark.parametrize("policy, expected", [
    ("sjf", ["short", "short-at-5", "long", "short-at-7"]),
    ("priority", ["long", "short", "short-at-5", "short-at-7"]),
    ("fcfs", ["long", "short-at-7", "short-at-5", "short"]),
])
def test_policy_orders(policy, expected):
    h = Harness(max_num_seqs=1, priority_aging_s=10.0, scheduling_policy=policy)
    requests = sjf_requests()
    h.add(*requests)
    assert admitted_order(h) == expected
    for r in requests:
        assert r.output_token_ids == reference_output(r, MAX_MODEL_LEN)[0]


def test_sjf_without_aging_is_pure_shortest_first_but_keeps_priorities():
    h = Harness(max_num_seqs=1, priority_aging_s=math.inf, scheduling_policy="sjf")
    h.add(request("long", max_tokens=40, arrival_time=0.0), request("short-low", priority=1, max_tokens=1),
          request("mid", max_tokens=10, arrival_time=100.0), request("short", max_tokens=2, arrival_time=100.0))
    assert admitted_order(h) == ["short", "mid", "long", "short-low"]


def test_fcfs_ignores_priorities():
    h = Harness(max_num_seqs=1, priority_aging_s=math.inf, scheduling_policy="fcfs")
    h.add(request("low", priority=5), request("high", priority=-5), request("mid", priority=0))
    assert admitted_order(h) == ["low", "high", "mid"]


def test_bad_policy_and_guard_are_refused():
    from tests.test_scheduler import make_config

    with pytest.raises(ValueError, match="scheduling_policy must be priority, sjf or fcfs"):
        make_config(scheduling_policy="lifo")
    with pytest.raises(ValueError, match="priority_preemption_guard_steps must be an integer >= 0"):
        make_config(priority_preemption_guard_steps=-1)


# --- what the mutation audit found untested (docs/testing.md) ------------------------------------

def test_the_request_priority_made_room_for_is_admitted_though_its_tenant_was_charged_since():
    # Shares when high-x is picked: X ~10 (k1, k2, v's prompts in step 1) < Y ~11 (y-old in step
    # 0), so high-x outranks high-y and v (priority 2) is preempted for it. k1 and k2 then decode,
    # charging X to ~12 > Y: picked afresh, high-y would take the room made for high-x.
    h = Harness(max_num_seqs=3, priority_aging_s=math.inf)
    h.add(request("y-old", tenant="Y", num_prompt_tokens=11))
    h.step()
    k1, k2 = request("k1", priority=1, tenant="X", max_tokens=8), request("k2", priority=1, tenant="X", max_tokens=8)
    v = request("v", priority=2, tenant="X", num_prompt_tokens=2, max_tokens=8)
    h.add(k1, k2, v)
    h.step()
    high_y, high_x = request("high-y", tenant="Y"), request("high-x", tenant="X")
    h.add(high_y, high_x)
    assert h.step_tokens() == {"k1": 1, "k2": 1, "high-x": 4}
    assert (last_record(h).preempted_req_ids, last_record(h).new_req_ids) == (["v"], ["high-x"])
    run_to_end_and_check(h, [k1, k2, v, high_y, high_x])


def test_tenants_whose_usage_has_decayed_away_are_forgotten_every_1024_steps():
    # A is served 4 tokens in step 0 and never again; with a half-life of 10 steps it is below one
    # token from step 21 on, but only step 1024 (a multiple of 1024) prunes. B stays: it is active.
    h = Harness(max_model_len=2048, num_kv_blocks=300, fair_share_half_life_steps=10)
    h.add(request("a", tenant="A"), request("b", tenant="B", max_tokens=1100))
    for _ in range(1024):
        h.step()
    assert h.scheduler.records[-1].step_id == 1023 and h.scheduler.tenant_usage.num_tenants == 2
    h.step()
    assert h.scheduler.tenant_usage.num_tenants == 1
    assert h.scheduler.tenant_usage.tokens("B", 1024) > 1


@pytest.mark.parametrize("num_prompt_tokens, victims", [(12, []), (16, ["c"])])
def test_room_for_a_newcomer_keeps_the_watermark_free_beside_the_kept_requests(num_prompt_tokens, victims):
    # 10 blocks, watermark 1. a, b, c hold 2 each (7-token prompts; their 8th token needs no new
    # block): 4 free. high's 12 tokens take 3, leaving exactly the watermark: nobody is preempted.
    # 16 tokens take all 4: c (lowest) makes room, and 6 - 4 = 2 >= 1.
    h = Harness(num_kv_blocks=10, watermark=0.1, priority_aging_s=math.inf)
    a = request("a", priority=1, num_prompt_tokens=7, max_tokens=3)
    b = request("b", priority=1, num_prompt_tokens=7, max_tokens=3)
    c = request("c", priority=2, num_prompt_tokens=7, max_tokens=3)
    h.add(a, b, c)
    h.step()
    assert h.scheduler.block_manager.num_free_blocks == 4
    high = request("high", priority=0, num_prompt_tokens=num_prompt_tokens)
    h.add(high)
    h.step()
    assert (last_record(h).preempted_req_ids, last_record(h).new_req_ids) == (victims, ["high"])
    run_to_end_and_check(h, [a, b, c, high])


def test_a_newcomer_that_needs_every_block_may_take_them_all_once_nobody_is_kept():
    # max_num_seqs 1: low must go. high's 32-token prompt (max_model_len 32) takes all 8 blocks:
    # with nobody kept there is no watermark (2 blocks) to leave.
    h = Harness(num_kv_blocks=8, max_model_len=32, watermark=0.25, max_num_seqs=1, priority_aging_s=math.inf)
    low = request("low", priority=1, max_tokens=3)
    h.add(low)
    h.step()
    high = request("high", priority=0, num_prompt_tokens=32)
    h.add(high)
    assert h.step_tokens() == {"high": 32}
    assert last_record(h).preempted_req_ids == ["low"]
    while h.scheduler.has_unfinished_requests():
        h.step()
    assert low.output_token_ids == reference_output(low, 32)[0]


def test_one_token_of_budget_left_is_room_enough_for_a_chunk():
    # A budget of 3 tokens: a, b and c decode one each. high needs a slot: c goes, and a and b's
    # decodes leave it 1 token, the first chunk of its prompt. Nobody else is preempted.
    h = Harness(max_num_seqs=3, max_num_batched_tokens=3, priority_aging_s=math.inf)
    a = request("a", priority=1, num_prompt_tokens=1, max_tokens=4)
    b = request("b", priority=1, num_prompt_tokens=1, max_tokens=4)
    c = request("c", priority=2, num_prompt_tokens=1, max_tokens=4)
    h.add(a, b, c)
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 1}
    high = request("high", priority=0)
    h.add(high)
    assert h.step_tokens() == {"a": 1, "b": 1, "high": 1}
    assert last_record(h).preempted_req_ids == ["c"]
    run_to_end_and_check(h, [a, b, c, high])


def test_the_guard_starts_once_per_priority_preemption_not_at_every_resume():
    # low is preempted for priority in step 1 and resumes in step 2: guarded until step 5. Sent
    # back by `recompute_requests` (a worker was lost) it resumes in step 3, which is no priority
    # preemption: its guard still ends at step 5, so high2 preempts it in step 5.
    h = Harness(max_num_seqs=1, priority_aging_s=math.inf, priority_preemption_guard_steps=3)
    low = request("low", priority=1, max_tokens=12)
    h.add(low)
    h.step()
    h.add(request("high1", priority=0))
    assert h.step_tokens() == {"high1": 4}
    h.step()
    assert last_record(h).resumed_req_ids == ["low"] and low.priority_guard_until_step == 5
    h.scheduler.recompute_requests(["low"])
    h.step()
    assert last_record(h).resumed_req_ids == ["low"] and low.priority_guard_until_step == 5
    h.add(request("high2", priority=0))
    assert [h.step_tokens() for _ in range(2)] == [{"low": 1}, {"high2": 4}]
    run_to_end_and_check(h, [low])


def test_a_swapped_out_request_makes_room_for_all_its_blocks_even_where_the_cache_holds_its_prefix():
    # Swap preemption, 8 blocks, watermark 3. L (p3) is preempted for P1 and resumes in step 2,
    # guarded to step 4; H (p0, M's 8-token prompt plus 2) then preempts M (p2) by swap, not the
    # guarded L, and hits M's two cached prompt blocks. From step 4 M outranks the unguarded L, but
    # swapping back in takes 3 fresh blocks (it keeps no cache hits): 3 free + L's 2 - 3 < 3, so L
    # is not preempted. Counting H's blocks as M's hits would make it 3 + 2 - 1 >= 3.
    h = Harness(num_kv_blocks=8, watermark=0.375, max_num_seqs=2, priority_aging_s=math.inf,
                priority_preemption_guard_steps=2, preemption_mode="swap", num_swap_blocks=16)
    low, mid = request("L", priority=3, max_tokens=20), request("M", priority=2, num_prompt_tokens=8, max_tokens=20)
    h.add(low, mid)
    h.step()
    h.add(request("P1", priority=1))
    h.step()
    h.step()
    high = request("H", max_tokens=20)
    high.prompt_token_ids = mid.prompt_token_ids + [5, 6]
    h.add(high)
    h.step()
    assert last_record(h).swapped_out_req_ids == ["M"] and high.num_cached_tokens == 8
    h.step()
    assert last_record(h).step_id == 4 and last_record(h).preempted_req_ids == []
    run_to_end_and_check(h, [low, mid, high])


def test_under_fcfs_a_request_released_from_hold_never_preempts_a_later_arrival():
    # a is held out of the queue (a worker was lost: `recompute_requests(hold=True)`), so b, a
    # later arrival, runs alone. Released, a outranks b by priority and by arrival, but fcfs
    # never preempts for priority: a waits for b.
    h = Harness(max_num_seqs=1, scheduling_policy="fcfs", priority_aging_s=math.inf)
    a, b = request("a", priority=0, max_tokens=2), request("b", priority=1, max_tokens=3)
    h.add(a, b)
    h.step()
    h.scheduler.recompute_requests(["a"], hold=True)
    assert h.step_tokens() == {"b": 4}
    assert h.scheduler.release_held() == "a"
    # a's prompt block is still cached: only its first output is computed again.
    assert [h.step_tokens() for _ in range(3)] == [{"b": 1}, {"b": 1}, {"a": 1}]
    assert h.scheduler.num_preemptions_by_cause["priority"] == 0
    run_to_end_and_check(h, [a, b])
