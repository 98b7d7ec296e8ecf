"""The batching bound's simulator (benchmarks/batching_bound.py) on synthetic step costs: hand-computed
makespans, the real scheduler's own plans as the reference, and the fit on exact points. No model
is loaded and nothing is timed."""

from __future__ import annotations

import random

import pytest

from benchmarks.batching_bound import (
    BatchingConfig,
    any_schedule_bound,
    CostModel,
    CostPoint,
    ScheduledChunk,
    fit_cost,
    mean_decode_context,
    schedule_steps,
    simulate,
)
from tests.test_scheduler import Harness, make_request

FLAT = CostModel(1.0, 0.0, 0.0, 0.0)  # 1 ms a step, whatever it holds
PER_ROW = CostModel(0.0, 1.0, 0.0, 0.0)  # 1 ms per decode row, nothing else
SLOTS = BatchingConfig(max_num_seqs=16)


def ratio(lengths: list[tuple[int, int]], cost: CostModel, config: BatchingConfig = SLOTS) -> float:
    static, continuous = (simulate(lengths, p, cost, config) for p in ("static", "continuous"))
    return continuous.output_tok_s / static.output_tok_s


def one_long_per_wave(long: int, short: int) -> list[tuple[int, int]]:
    """Two waves of 16 one-token prompts: one output of `long` tokens, then 15 of `short`."""
    return ([(1, long)] + [(1, short)] * 15) * 2


def test_equal_lengths_tie_under_a_flat_cost():
    lengths = [(4, 10)] * 32
    static, continuous = (simulate(lengths, p, FLAT, SLOTS) for p in ("static", "continuous"))
    assert static.num_steps == continuous.num_steps == 20  # two waves of 1 prefill + 9 decodes
    assert static.makespan_ms == continuous.makespan_ms == 20.0


def test_one_long_request_per_wave_under_a_flat_cost():
    # Static: each wave lasts as long as its long member, 2 x 100 steps. Continuous: the second
    # wave's long request (and 14 shorts) join at step 10, when the shorts leave; the last short
    # waits for those 14, running steps 20..29; the makespan is 10 + 100 steps.
    lengths = one_long_per_wave(100, 10)
    static, continuous = (simulate(lengths, p, FLAT, SLOTS) for p in ("static", "continuous"))
    assert (static.makespan_ms, continuous.makespan_ms) == (200.0, 110.0)
    assert ratio(lengths, FLAT) == pytest.approx(200 / 110)


def test_a_cost_proportional_to_the_batch_removes_the_advantage():
    # Both policies decode the same rows; when only rows cost, the schedule cannot matter.
    lengths = one_long_per_wave(100, 10)
    assert ratio(lengths, PER_ROW) == pytest.approx(1.0)
    between = CostModel(1.0, 0.1, 0.0, 0.0)
    assert 1.0 < ratio(lengths, between) < ratio(lengths, FLAT)


def test_batch_flat_counterfactual_restores_the_flat_ratio():
    lengths = one_long_per_wave(100, 10)
    flat = PER_ROW.batch_flat(16, context_per_row=50.0)
    assert flat == CostModel(16.0, 0.0, 0.0, 0.0)
    assert ratio(lengths, flat) == pytest.approx(200 / 110)


def test_bound_by_hand_and_never_beaten():
    # 500 outputs in 16 slots need 32 steps, but the long requests need 100 each.
    assert any_schedule_bound(one_long_per_wave(100, 10), FLAT, SLOTS).makespan_ms == 100.0
    rng = random.Random(3)
    for _ in range(20):
        lengths = [(rng.randint(1, 600), rng.randint(1, 300)) for _ in range(40)]
        cost = CostModel(*(rng.uniform(0.0, 1.0) for _ in range(4)))
        bound = any_schedule_bound(lengths, cost, SLOTS)
        for policy in ("static", "continuous"):
            assert simulate(lengths, policy, cost, SLOTS).makespan_ms >= bound.makespan_ms - 1e-6


def test_static_prefills_a_wave_in_budget_sized_chunks():
    config = BatchingConfig(max_num_seqs=2, max_num_batched_tokens=8)
    steps = list(schedule_steps([(5, 2), (5, 2), (3, 1)], "static", config))
    assert steps == [
        [ScheduledChunk(0, 0, 5, False), ScheduledChunk(1, 0, 3, False)],
        [ScheduledChunk(0, 5, 1, True), ScheduledChunk(1, 3, 2, False)],  # 0 finishes
        [ScheduledChunk(1, 5, 1, True)],  # a slot is free, but 2 is not of this batch
        [ScheduledChunk(2, 0, 3, False)],
    ]
    assert [c.index for c in list(schedule_steps([(5, 2), (5, 2), (3, 1)], "continuous", config))[2]] == [1, 2]


def test_step_cost_reads_rows_context_and_prefill_from_the_chunks():
    cost = CostModel(1.0, 10.0, 0.5, 2.0)
    step = [ScheduledChunk(0, 7, 1, True), ScheduledChunk(1, 0, 4, False)]
    assert cost.chunks_ms(step) == 1.0 + 10.0 * 1 + 0.5 * (8 + 4) + 2.0 * 4


def test_mean_decode_context_by_hand():
    # (3, 3): decodes read 4 and 5 tokens; (1, 2): one decode reading 2.
    assert mean_decode_context([(3, 3), (1, 2)]) == pytest.approx((4 + 5 + 2) / 3)


@pytest.mark.parametrize("policy", ["static", "continuous"])
@pytest.mark.parametrize("chunked", [True, False])
def test_schedule_matches_the_real_scheduler(policy: str, chunked: bool):
    rng = random.Random(7)
    lengths = [(rng.randint(1, 30), rng.randint(1, 20)) for _ in range(20)]
    budget = 16 if chunked else 64
    h = Harness(scheduling=policy, max_num_seqs=4, max_num_batched_tokens=budget, enable_chunked_prefill=chunked,
                num_kv_blocks=400, enable_prefix_caching=False)
    h.add(*(make_request(str(i), p, max_tokens=o) for i, (p, o) in enumerate(lengths)))
    real = []
    while h.scheduler.has_unfinished_requests():
        real.append({int(req_id): n for req_id, n in h.step_tokens().items()})
    config = BatchingConfig(4, budget, chunked)
    simulated = [{c.index: c.num_new_tokens for c in step} for step in schedule_steps(lengths, policy, config)]
    assert simulated == real
    assert sum(h.scheduler.num_preemptions_by_cause.values()) == 0


def test_fit_recovers_exact_coefficients_and_needs_varied_points():
    truth = CostModel(3.0, 0.5, 0.01, 0.2)
    shapes = [(1, 65, 0), (16, 1040, 0), (16, 12304, 0), (4, 1028, 0), (0, 256, 256), (15, 4111, 256)]
    points = [CostPoint(r, c, p, truth.step_ms(r, c, p)) for r, c, p in shapes]
    fitted = fit_cost(points)
    for name in ("intercept_ms", "per_row_ms", "per_context_token_ms", "per_prefill_token_ms"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6, abs=1e-9)
    decode_only = [p for p in points if not p.num_prefill_tokens]
    with pytest.raises(ValueError, match="cannot separate"):
        fit_cost(decode_only)
