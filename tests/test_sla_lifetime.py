"""Lifetime-aware admission on tiny pools, and the length forecast it admits against.

Every forecast, block count and admission step below is worked out by hand from the rules in
scheduler_svc/length_forecast.py (nearest-rank quantile of output / most, conditional on what a
request has generated; K/V for all but the last token) and scheduler.py's `_lifetime_fits`.
Blocks hold 4 tokens (make_config).
"""

from __future__ import annotations

import math

import pytest

from scheduler_svc.length_forecast import LengthForecast
from scheduler_svc.request import Request, RequestStatus
from tests.test_priority import request as priority_request
from tests.test_scheduler import Harness
from tests.test_sla_scheduling import last_record, run_to_end_and_check

STOPPED, ABORTED = RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_ABORTED


def request(req_id: str, num_prompt_tokens: int = 4, max_tokens: int = 20, priority: int = 0,
            prompt: list[int] | None = None) -> Request:
    r = priority_request(req_id, priority, 0.0, num_prompt_tokens, max_tokens)
    if prompt is not None:
        r.prompt_token_ids = list(prompt)
    return r


def finished(num_output: int, max_tokens: int = 20, num_prompt_tokens: int = 4) -> Request:
    """A request as it finished after `num_output` tokens."""
    r = request(f"done-{num_output}-{max_tokens}", num_prompt_tokens, max_tokens)
    r.output_token_ids = [7] * num_output
    return r


def lifetime(**overrides) -> Harness:
    return Harness(admission="lifetime", **overrides)


def admission_steps(h: Harness) -> dict[str, int]:
    """Run to the end; the step each request was first admitted in."""
    steps = {}
    while h.scheduler.has_unfinished_requests():
        plan, _ = h.step()
        for req_id in h.scheduler.records[-1].new_req_ids:
            steps[req_id] = plan.step_id
    return steps


# --- the forecast ---------------------------------------------------------------------------------

def test_the_forecast_is_the_whole_max_tokens_until_min_samples_then_the_nearest_rank_quantile():
    forecast = LengthForecast(max_model_len=64, quantile=0.5, window=3, min_samples=2)
    r = request("r", num_prompt_tokens=4, max_tokens=20)
    assert (forecast.ratio(), forecast.total_tokens(r), forecast.num_kv_tokens(r)) == (1.0, 24, 23)
    forecast.finished(finished(5), STOPPED)  # 0.25: one sample, still the prior
    assert forecast.ratio() == 1.0
    forecast.finished(finished(10), STOPPED)  # [0.25, 0.5]: rank ceil(0.5 * 2) = 1
    assert forecast.ratio() == 0.25
    assert (forecast.total_tokens(r), forecast.num_kv_tokens(r)) == (4 + 5, 8)
    forecast.finished(finished(20), STOPPED)  # [0.25, 0.5, 1.0]: rank 2
    assert forecast.ratio() == 0.5
    forecast.finished(finished(15), STOPPED)  # the window drops 0.25: [0.5, 0.75, 1.0], rank 2
    assert forecast.ratio() == 0.75
    forecast.finished(finished(1), ABORTED)  # an abort says nothing about lengths
    assert forecast.ratio() == 0.75


def test_the_forecast_is_conditional_on_what_the_request_has_generated():
    forecast = LengthForecast(max_model_len=64, quantile=0.5, min_samples=2)
    for num_output in (2, 4, 10, 16, 20):  # ratios 0.1, 0.2, 0.5, 0.8, 1.0
        forecast.finished(finished(num_output), STOPPED)
    r = request("r", max_tokens=20)
    assert forecast.total_tokens(r) == 4 + 10  # median of all five: 0.5
    r.output_token_ids = [1] * 4  # 0.2 generated: of 0.5, 0.8, 1.0 the median is 0.8
    assert forecast.total_tokens(r) == 4 + 16
    r.output_token_ids = [1] * 17  # 0.85: only 1.0 is beyond, fewer than min_samples: the maximum
    assert forecast.total_tokens(r) == 4 + 20


def test_the_forecast_never_counts_more_than_the_context_allows():
    forecast = LengthForecast(max_model_len=64, quantile=1.0, min_samples=1)
    forecast.finished(finished(1, max_tokens=100), STOPPED)  # ratio 0.01
    r = request("r", max_tokens=100)
    r.output_token_ids = [1] * 30  # 30 of the most, 100 capped by 64 - 4: no ratio above 0.5
    assert forecast.total_tokens(r) == 64
    forecast.finished(finished(60, max_tokens=100), STOPPED)  # capped by the context: 60 / 60 = 1
    assert forecast.ratio(0.5) == 1.0
    full = request("full", num_prompt_tokens=64, max_tokens=5)  # still samples one token
    assert forecast.max_output_tokens(full) == 1 and forecast.total_tokens(full) == 65


def test_a_request_that_reaches_every_observed_length_is_forecast_its_maximum():
    forecast = LengthForecast(max_model_len=64, quantile=1.0, min_samples=1)
    for _ in range(2):
        forecast.finished(finished(10, max_tokens=20), STOPPED)  # every ratio is 0.5
    r = request("r", max_tokens=20)
    r.output_token_ids = [1] * 9  # 0.45: 0.5 is beyond it, so 10 outputs
    assert forecast.total_tokens(r) == 4 + 10
    r.output_token_ids = [1] * 10  # 0.5: nothing beyond, the maximum
    assert forecast.total_tokens(r) == 4 + 20


def test_outcomes_pair_the_first_admissions_forecast_with_the_actual_length():
    outcomes = []
    forecast = LengthForecast(max_model_len=64, min_samples=1, on_outcome=lambda *pair: outcomes.append(pair))
    r = request("r", max_tokens=20)
    forecast.admitted(r)  # the prior: 24 tokens
    forecast.finished(finished(10), STOPPED)  # now 0.5
    forecast.admitted(r)  # resumed after a preemption: the first forecast stands
    r.output_token_ids = [1] * 3
    forecast.finished(r, STOPPED)
    aborted = request("aborted")
    forecast.admitted(aborted)
    forecast.finished(aborted, ABORTED)
    assert outcomes == [(24, 7)]


@pytest.mark.parametrize("field, value", [("quantile", 0.0), ("quantile", 1.5), ("window", 0),
                                          ("min_samples", 0), ("max_model_len", 0)])
def test_bad_forecast_settings_are_refused_naming_the_field(field, value):
    settings = {"max_model_len": 64} | {field: value}
    with pytest.raises(ValueError, match=field):
        LengthForecast(**settings)


@pytest.mark.parametrize("field, value", [("admission", "later"), ("admission_quantile", 0.0),
                                          ("admission_quantile", math.nan)])
def test_bad_admission_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Harness(**{field: value})


# --- admission decisions --------------------------------------------------------------------------

def test_with_no_history_a_request_is_admitted_only_if_its_whole_max_tokens_fits():
    # Each request may reach 24 tokens: K/V for 23, 6 blocks. a is admitted alone; beside a (1 block
    # held, 5 more forecast), 11 free - 5 - 6 = 0 admits b; c would need 6 of the 0 left over.
    h = lifetime(num_kv_blocks=12)
    a, b, c = request("a"), request("b"), request("c")
    h.add(a, b, c)
    steps = admission_steps(h)
    assert steps == {"a": 0, "b": 0, "c": 20}  # a and b finish in step 19 (20 tokens each)
    assert h.scheduler.num_preemptions_by_cause == {"memory": 0, "priority": 0}
    for r in (a, b, c):
        assert r.num_preemptions == 0


def test_immediate_admission_takes_all_three_and_pays_in_preemptions():
    h = Harness(num_kv_blocks=12)
    h.add(request("a"), request("b"), request("c"))
    assert admission_steps(h) == {"a": 0, "b": 0, "c": 0}
    assert h.scheduler.num_preemptions_by_cause["memory"] > 0


def test_the_watermark_is_kept_free_of_forecasts_too():
    h = lifetime(num_kv_blocks=12, watermark=0.1)  # 1 block: 0 left over for b is now too few
    h.add(request("a"), request("b"))
    assert admission_steps(h) == {"a": 0, "b": 20}


def test_a_pool_that_holds_nobody_admits_the_head_whatever_its_forecast():
    # a may reach 32 tokens: 8 blocks, the whole pool, 2 more than leave the watermark (2) free.
    h = lifetime(num_kv_blocks=8, watermark=0.25)
    h.add(request("a", max_tokens=28), request("b", max_tokens=1))
    assert admission_steps(h) == {"a": 0, "b": 28}


@pytest.mark.parametrize("quantile, num_admitted", [(0.5, 6), (1.0, 2)])
def test_a_learned_short_forecast_admits_more(quantile, num_admitted):
    # Seven requests seen stopping at a quarter of max_tokens, one at all of it. The median (0.5)
    # forecasts each newcomer 4 + 5 tokens, K/V for 8: 2 blocks. The k-th admitted in step 0 sees
    # 12 - (k - 1) free and k - 1 reserved (each earlier one holds 1 block, forecast 2):
    # 12 - 2 (k - 1) - 2 >= 0 up to k = 6. The maximum (1.0) forecasts 24 tokens: 6 blocks, two.
    h = lifetime(num_kv_blocks=12, admission_quantile=quantile)
    for num_output in [5] * 7 + [20]:
        h.scheduler.length_forecast.finished(finished(num_output), STOPPED)
    requests = [request(f"r{i}") for i in range(8)]
    h.add(*requests)
    h.step()
    assert last_record(h).new_req_ids == [f"r{i}" for i in range(num_admitted)]
    run_to_end_and_check(h, requests)  # they run to 20 tokens: past the forecast, preempted, exact


def test_prefix_cache_hits_on_held_blocks_cost_nothing():
    # a holds its two prompt blocks and grows a third in step 1 (forecast 11 tokens: 3 blocks, no
    # reserve left). b reaches 24 tokens (K/V 23: 6 blocks) and hits a's 2: it needs 4 of the 4
    # free, in a pool of 7.
    h = lifetime(num_kv_blocks=7)
    a = request("a", num_prompt_tokens=8, max_tokens=4)
    h.add(a)
    h.step()
    b = request("b", max_tokens=12, prompt=a.prompt_token_ids + [901, 902, 903, 904])
    h.add(b)
    h.step()
    assert last_record(h).new_req_ids == ["b"] and b.num_cached_tokens == 8
    run_to_end_and_check(h, [a, b])


@pytest.mark.parametrize("max_tokens, admitted", [(25, True), (29, False)])
def test_a_hit_on_a_free_block_costs_a_free_block(max_tokens, admitted):
    # x (forecast 12 tokens, K/V 11: 3 blocks) holds 2 after step 1; a finished in step 0, its two
    # prompt blocks are free but cached. b's 12-token prompt hits them: it needs all the blocks of
    # its K/V (36 tokens: 9, or 40: 10) of the 10 free, 1 reserved for x.
    h = lifetime(num_kv_blocks=12)
    x, a = request("x", max_tokens=8), request("a", num_prompt_tokens=8, max_tokens=1)
    h.add(x, a)
    h.step()
    assert a.status == RequestStatus.FINISHED_LENGTH
    b = request("b", max_tokens=max_tokens, prompt=a.prompt_token_ids + [901, 902, 903, 904])
    h.add(b)
    h.step()
    assert (last_record(h).new_req_ids == ["b"]) == admitted
    run_to_end_and_check(h, [x, b])


def test_a_request_priority_made_room_for_is_admitted_whatever_its_forecast():
    # low1 and low2 (forecast 7 tokens of K/V: 2 blocks each) fill max_num_seqs=2. high may reach
    # 44 tokens (11 blocks): beside low1 it does not fit its forecast, but low2 was preempted for it.
    h = lifetime(max_num_seqs=2, num_kv_blocks=12, priority_aging_s=math.inf)
    low1, low2 = request("low1", max_tokens=4, priority=1), request("low2", max_tokens=4, priority=2)
    h.add(low1, low2)
    assert h.step_tokens() == {"low1": 4, "low2": 4}
    high = request("high", max_tokens=40, priority=0)
    h.add(high)
    assert h.step_tokens() == {"high": 4, "low1": 1}
    assert (last_record(h).preempted_req_ids, last_record(h).new_req_ids) == (["low2"], ["high"])
    run_to_end_and_check(h, [low1, low2, high])


def test_static_scheduling_ignores_the_forecast():
    h = Harness(num_kv_blocks=12, admission="lifetime", scheduling="static")
    h.add(request("a"), request("b"), request("c"))
    assert admission_steps(h) == {"a": 0, "b": 0, "c": 0}


def test_the_scheduler_reports_forecast_outcomes_of_finished_requests():
    h = lifetime(num_kv_blocks=12)
    outcomes = []
    h.scheduler.length_forecast.on_outcome = lambda *pair: outcomes.append(pair)
    a, b = request("a", max_tokens=3), request("b", max_tokens=20)
    h.add(a, b)
    h.step()
    h.scheduler.abort_requests(["b"])
    run_to_end_and_check(h, [a])
    assert outcomes == [(4 + 3, 4 + 3)]


def test_the_admission_flag_reaches_the_serving_options(tmp_path):
    from clients.cli import _parser, _serving_options

    for argv, expected in ([[], "immediate"], [["--admission", "lifetime"], "lifetime"]):
        args = _parser().parse_args(["serve", *argv])
        assert _serving_options(args, tmp_path).admission == expected
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--admission", "later"])
