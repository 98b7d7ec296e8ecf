"""Scheduler decisions on tiny pools, driven by a fake worker that keeps a worker's state.

The fake worker keeps a fake KV pool (one token id per slot) and "samples" a token from a hash
of the context it reads back through the request's block table. An output therefore matches the
uncontended reference only if every plan carried the right tokens (for instance the outputs of a
preempted request when it is resent) and the right blocks (a prefix-cache hit on a block that
holds other tokens, or one evicted and overwritten, changes the output).
"""

from __future__ import annotations

import random
import subprocess
import sys
import zlib
from collections import Counter
from array import array

import pytest

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.protocol import StepPlan, StepResult
from scheduler_svc.request import Request, RequestStatus, SamplingParams
from scheduler_svc.scheduler import QueueFullError, RequestUpdate, Scheduler

BLOCK_SIZE = 4
VOCAB_SIZE = 1000
NO_EOS = frozenset({VOCAB_SIZE})  # never sampled


def sample_token(token_ids: list[int]) -> int:
    return zlib.crc32(array("i", token_ids).tobytes()) % VOCAB_SIZE


class FakeWorker:
    """Keeps what a real worker keeps per request and checks every plan against it."""

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.token_ids: dict[str, list[int]] = {}
        self.block_tables: dict[str, list[int]] = {}
        self.num_computed_tokens: dict[str, int] = {}
        self.kv_slots: dict[int, int] = {}  # slot -> the token id whose "K/V" it holds
        self.swap_slots: dict[int, int] = {}  # the same, in the CPU swap space

    def execute(self, plan: StepPlan) -> StepResult:
        for req_id in plan.finished_req_ids:
            assert req_id in self.token_ids, f"told to drop unknown request {req_id}"
            for state in (self.token_ids, self.block_tables, self.num_computed_tokens):
                del state[req_id]
        self._copy_blocks(self.kv_slots, self.swap_slots, plan.swap_out)
        self._copy_blocks(self.swap_slots, self.kv_slots, [(cpu, dev) for dev, cpu in plan.swap_in])
        scheduled = []
        for new in plan.new_requests:
            assert new.req_id not in self.token_ids, f"{new.req_id} sent twice"
            self.token_ids[new.req_id] = list(new.token_ids)
            self.block_tables[new.req_id] = list(new.block_ids)
            self.num_computed_tokens[new.req_id] = new.num_computed_tokens
            scheduled.append((new.req_id, new.num_new_tokens))
        for cached in plan.cached_requests:
            assert self.num_computed_tokens[cached.req_id] == cached.num_computed_tokens
            self.block_tables[cached.req_id] += cached.new_block_ids
            scheduled.append((cached.req_id, cached.num_new_tokens))
        return self._run(plan.step_id, scheduled)

    def _run(self, step_id: int, scheduled: list[tuple[str, int]]) -> StepResult:
        # As a real worker does (docs/CONTRACTS.md), every token's K/V is written before anything
        # reads: a newcomer may hit a block that a running request fills in the same step.
        for req_id, num_new_tokens in scheduled:
            assert num_new_tokens >= 1
            num_computed = self.num_computed_tokens[req_id] + num_new_tokens
            self.num_computed_tokens[req_id] = num_computed
            tokens = self.token_ids[req_id]
            assert num_computed <= len(tokens)
            assert len(self.block_tables[req_id]) * self.block_size >= num_computed
            for position in range(num_computed - num_new_tokens, num_computed):
                self.kv_slots[self._slot(req_id, position)] = tokens[position]
        req_ids, token_ids = [], []
        for req_id, _ in scheduled:
            tokens, num_computed = self.token_ids[req_id], self.num_computed_tokens[req_id]
            if num_computed == len(tokens):
                context = [self.kv_slots.get(self._slot(req_id, i), -1) for i in range(num_computed)]
                tokens.append(sample_token(context))
                req_ids.append(req_id)
                token_ids.append(tokens[-1])
        return StepResult(step_id, 0, req_ids, token_ids, 0.0)

    def _copy_blocks(self, source: dict[int, int], target: dict[int, int], pairs) -> None:
        for from_block, to_block in pairs:
            for i in range(self.block_size):
                token = source.get(from_block * self.block_size + i)
                if token is None:
                    target.pop(to_block * self.block_size + i, None)
                else:
                    target[to_block * self.block_size + i] = token

    def _slot(self, req_id: str, position: int) -> int:
        block_id = self.block_tables[req_id][position // self.block_size]
        return block_id * self.block_size + position % self.block_size


def reference_output(request: Request, max_model_len: int) -> tuple[list[int], RequestStatus]:
    """The request's output generated alone, with the stop rules written out naively."""
    params = request.sampling_params
    tokens, output = list(request.prompt_token_ids), []
    while True:
        token = sample_token(tokens)
        tokens.append(token)
        output.append(token)
        if token in params.stop_token_ids:
            return output, RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token in request.eos_token_ids:
            return output, RequestStatus.FINISHED_STOPPED
        if len(output) >= params.max_tokens or len(tokens) >= max_model_len:
            return output, RequestStatus.FINISHED_LENGTH


def make_config(**overrides) -> SchedulerConfig:
    values = dict(
        num_kv_blocks=12,
        max_model_len=64,
        block_size=BLOCK_SIZE,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_queued_requests=64,
        watermark=0.0,
    )
    values.update(overrides)
    return SchedulerConfig(**values)


def make_request(
    req_id: str, num_prompt_tokens: int, max_tokens: int = 8, eos=NO_EOS, **params
) -> Request:
    start = zlib.crc32(req_id.encode())
    prompt = [(start + i) % VOCAB_SIZE for i in range(num_prompt_tokens)]
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens, **params), eos)


class Harness:
    """A scheduler and a fake worker stepped together, as the engine loop does."""

    def __init__(self, **config_overrides) -> None:
        self.scheduler = Scheduler(make_config(**config_overrides))
        self.worker = FakeWorker(self.scheduler.config.block_size)

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def step(self) -> tuple[StepPlan, list[RequestUpdate]]:
        plan = self.scheduler.schedule()
        updates = self.scheduler.update_from_output(plan, self.worker.execute(plan))
        return plan, updates

    def step_tokens(self) -> dict[str, int]:
        """Run one step; return how many tokens each request computed in it."""
        plan, _ = self.step()
        return {r.req_id: r.num_new_tokens for r in plan.new_requests + plan.cached_requests}


def test_prefill_then_decode_until_max_tokens():
    h = Harness()
    h.add(make_request("a", 6, max_tokens=3))
    plan, updates = h.step()
    [new] = plan.new_requests
    assert (new.req_id, new.block_ids, new.num_computed_tokens, new.num_new_tokens) == (
        "a", [0, 1], 0, 6
    )
    assert updates == [RequestUpdate("a", [sample_token(new.token_ids)], RequestStatus.RUNNING)]
    plan, _ = h.step()
    [cached] = plan.cached_requests
    assert (cached.new_block_ids, cached.num_computed_tokens, cached.num_new_tokens) == ([], 6, 1)
    plan, updates = h.step()
    assert plan.cached_requests[0].num_computed_tokens == 7
    assert updates[0].status == RequestStatus.FINISHED_LENGTH
    assert h.scheduler.block_manager.num_free_blocks == 12
    assert not h.scheduler.has_unfinished_requests()
    assert h.scheduler.get_request("a") is None
    expected, _ = reference_output(make_request("a", 6, max_tokens=3), 64)
    assert h.worker.token_ids["a"][6:] == expected


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    h = Harness(max_num_batched_tokens=8)
    h.add(make_request("a", 20, max_tokens=2))
    plans = [h.step() for _ in range(3)]
    assert [u for _, u in plans[:2]] == [[], []]  # partial chunks sample nothing
    assert plans[0][0].new_requests[0].num_new_tokens == 8
    assert plans[0][0].new_requests[0].block_ids == [0, 1]
    assert [(c.new_block_ids, c.num_computed_tokens, c.num_new_tokens)
            for p, _ in plans[1:] for c in p.cached_requests] == [([2, 3], 8, 8), ([4], 16, 4)]
    assert len(plans[2][1]) == 1


def test_prefill_chunk_shares_the_budget_with_running_decodes():
    h = Harness(max_num_batched_tokens=8, num_kv_blocks=16)
    h.add(make_request("a", 3), make_request("b", 4))
    assert h.step_tokens() == {"a": 3, "b": 4}
    h.add(make_request("c", 20))
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 6}
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 6}
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 6}
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 2}
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 1}


def test_without_chunking_a_prompt_waits_for_a_whole_budget_and_keeps_its_place():
    h = Harness(enable_chunked_prefill=False, max_num_batched_tokens=16, max_model_len=16)
    h.add(make_request("a", 4, max_tokens=3))
    assert h.step_tokens() == {"a": 4}
    h.add(make_request("b", 16, max_tokens=1), make_request("c", 2, max_tokens=1))
    assert h.step_tokens() == {"a": 1}  # b needs 16 of the 15 left; c may not overtake it
    assert h.step_tokens() == {"a": 1}  # a finishes
    assert h.step_tokens() == {"b": 16}
    assert h.step_tokens() == {"c": 2}


def test_request_added_mid_generation_runs_in_the_very_next_step():
    h = Harness()
    h.add(make_request("a", 5), make_request("b", 3))
    assert h.step_tokens() == {"a": 5, "b": 3}
    assert h.step_tokens() == {"a": 1, "b": 1}
    h.add(make_request("c", 7))
    plan, _ = h.step()
    assert [r.req_id for r in plan.new_requests] == ["c"]
    assert [(r.req_id, r.num_new_tokens) for r in plan.cached_requests] == [("a", 1), ("b", 1)]
    assert h.scheduler.records[-1].new_req_ids == ["c"]
    assert h.scheduler.records[-1].num_scheduled_tokens == {"a": 1, "b": 1, "c": 7}


def test_finished_request_frees_blocks_that_the_next_step_reuses():
    h = Harness(num_kv_blocks=4)
    h.add(make_request("a", 8, max_tokens=1), make_request("b", 12, max_tokens=1))
    plan, updates = h.step()
    assert [r.req_id for r in plan.new_requests] == ["a"]  # b needs 3 blocks, 2 are free
    assert updates[0].status == RequestStatus.FINISHED_LENGTH
    assert h.scheduler.block_manager.free_block_ids == [2, 3, 1, 0]  # a's freed tail-first
    plan, _ = h.step()
    assert plan.finished_req_ids == ["a"]
    assert plan.new_requests[0].req_id == "b"
    assert plan.new_requests[0].block_ids == [2, 3, 1]


def preemption_harness() -> Harness:
    """Three requests of 7 tokens fill a 6-block pool; each needs a third block at token 9."""
    h = Harness(num_kv_blocks=6)
    h.add(make_request("a", 7, max_tokens=3), make_request("b", 7), make_request("c", 7))
    plan, _ = h.step()
    assert [r.block_ids for r in plan.new_requests] == [[0, 1], [2, 3], [4, 5]]
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 1}
    return h


def test_preemption_evicts_the_latest_arrival_and_requeues_it_at_the_front():
    h = preemption_harness()
    h.add(make_request("d", 2))
    plan, _ = h.step()
    record = h.scheduler.records[-1]
    assert record.preempted_req_ids == ["c"]
    assert record.num_scheduled_tokens == {"a": 1, "b": 1}
    assert plan.finished_req_ids == ["c"]  # the worker drops c's state
    assert [(r.req_id, r.new_block_ids) for r in plan.cached_requests] == [("a", [5]), ("b", [4])]
    assert plan.new_requests == []  # no admissions in a step that preempted
    c = h.scheduler.get_request("c")
    assert (c.status, c.num_computed_tokens, c.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert [r.req_id for r in h.scheduler.waiting] == ["c", "d"]


def test_preempted_request_is_resent_whole_with_its_outputs():
    h = preemption_harness()
    h.step()  # preempts c; a reaches max_tokens and frees [0, 1, 5]
    c = h.scheduler.get_request("c")
    outputs_before = list(c.output_token_ids)
    assert len(outputs_before) == 2
    plan, _ = h.step()
    assert plan.finished_req_ids == ["a"]
    [resent] = plan.new_requests
    assert resent.req_id == "c"
    assert resent.token_ids == c.prompt_token_ids + outputs_before
    assert resent.num_prompt_tokens == 7  # which of the token ids are the prompt
    assert (resent.num_computed_tokens, resent.num_new_tokens) == (0, 9)
    assert resent.block_ids == [5, 1, 0]
    assert h.scheduler.records[-1].resumed_req_ids == ["c"]
    assert h.scheduler.records[-1].new_req_ids == []
    while h.scheduler.has_unfinished_requests():
        h.step()
    expected, _ = reference_output(make_request("c", 7), 64)
    assert c.output_token_ids == expected


def test_request_that_cannot_grow_preempts_itself():
    h = Harness(num_kv_blocks=4)
    h.add(make_request("a", 7), make_request("b", 8))
    h.step()
    plan, _ = h.step()  # b needs a third block; it is the latest arrival, so it goes
    assert h.scheduler.records[-1].preempted_req_ids == ["b"]
    assert h.scheduler.records[-1].num_scheduled_tokens == {"a": 1}
    assert plan.finished_req_ids == ["b"]
    assert h.scheduler.block_manager.get_block_ids("a") == [0, 1]


def test_no_admissions_in_a_step_that_preempted():
    # Prefix caching off: with it, c's cached first block would make re-admitting c need two
    # blocks, and nothing would fit whatever the rule.
    h = Harness(num_kv_blocks=6, max_num_batched_tokens=4, max_num_seqs=3, enable_prefix_caching=False)
    h.add(make_request("a", 8), make_request("b", 4), make_request("c", 4))
    for _ in range(5):
        h.step()
    assert h.scheduler.block_manager.num_free_blocks == 0
    assert h.step_tokens() == {"a": 1, "b": 1}
    record = h.scheduler.records[-1]
    # c preempted itself; a 2-token chunk of it would fit the freed block and the budget left,
    # but re-admitting it at once would only thrash.
    assert record.preempted_req_ids == ["c"]
    assert (record.num_free_blocks, record.resumed_req_ids) == (1, [])


def test_a_waiting_request_that_would_fit_waits_out_a_step_that_preempted():
    h = Harness(num_kv_blocks=5)
    c = make_request("c", 11)
    c.priority = 5  # runs after everyone else, so it is the victim
    h.add(make_request("a", 8), c)
    assert h.step_tokens() == {"a": 8, "c": 11}  # the pool is full: a [0, 1], c [2, 3, 4]
    h.add(make_request("d", 4, max_tokens=1))  # one block, ahead of c in the queue
    assert h.step_tokens() == {"a": 1}  # a's ninth token preempts c; two blocks are free after
    record = h.scheduler.records[-1]
    assert (record.preempted_req_ids, record.num_free_blocks) == (["c"], 2)
    assert record.new_req_ids == [] and [r.req_id for r in h.scheduler.waiting] == ["d", "c"]
    assert h.step_tokens() == {"a": 1, "d": 4}


def test_lone_request_that_outgrows_the_pool_is_a_clear_error():
    h = Harness(num_kv_blocks=2)
    request = make_request("a", 7, max_tokens=1)
    h.add(request)
    request.sampling_params.max_tokens = 5  # what validation in add_request rules out
    h.step()
    h.step()
    with pytest.raises(RuntimeError, match="'a' cannot grow to 9 tokens even with the whole KV pool"):
        h.step()


def test_eos_stops_and_is_part_of_the_output():
    prompt_request = make_request("a", 5)
    eos = sample_token(prompt_request.prompt_token_ids)
    h = Harness()
    h.add(make_request("a", 5, eos=frozenset({eos})))
    _, updates = h.step()
    assert updates == [RequestUpdate("a", [eos], RequestStatus.FINISHED_STOPPED)]
    assert h.scheduler.block_manager.num_free_blocks == 12


def test_ignore_eos_runs_to_max_tokens_but_stop_token_ids_still_stop():
    eos = sample_token(make_request("a", 5).prompt_token_ids)
    h = Harness()
    h.add(make_request("a", 5, max_tokens=4, eos=frozenset({eos}), ignore_eos=True))
    statuses = [h.step()[1][0].status for _ in range(4)]
    assert statuses == [RequestStatus.RUNNING] * 3 + [RequestStatus.FINISHED_LENGTH]
    h.add(make_request("a", 5, max_tokens=4, stop_token_ids=[eos], ignore_eos=True))
    assert h.step()[1] == [RequestUpdate("a", [eos], RequestStatus.FINISHED_STOPPED)]


def test_stop_token_id_in_the_middle_of_generation():
    expected, _ = reference_output(make_request("a", 5, max_tokens=4), 64)
    stop = expected[2]
    assert stop not in expected[:2]
    h = Harness()
    h.add(make_request("a", 5, max_tokens=10, stop_token_ids=[stop]))
    updates = [h.step()[1][0] for _ in range(3)]
    assert [u.new_token_ids[0] for u in updates] == expected[:3]
    assert updates[-1].status == RequestStatus.FINISHED_STOPPED
    assert not h.scheduler.has_unfinished_requests()


def test_stop_token_wins_over_max_tokens_reached_by_the_same_token():
    first = sample_token(make_request("a", 5).prompt_token_ids)
    h = Harness()
    h.add(make_request("a", 5, max_tokens=1, stop_token_ids=[first]))
    assert h.step()[1][0].status == RequestStatus.FINISHED_STOPPED


def test_max_model_len_stops_generation():
    h = Harness(max_model_len=10)
    h.add(make_request("a", 7, max_tokens=100 - 7))
    statuses = [h.step()[1][0].status for _ in range(3)]
    assert statuses == [RequestStatus.RUNNING] * 2 + [RequestStatus.FINISHED_LENGTH]
    assert h.scheduler.records[-1].num_scheduled_tokens == {"a": 1}


def test_prompt_of_max_model_len_yields_one_token():
    h = Harness(max_model_len=8)
    h.add(make_request("a", 8, max_tokens=5))
    assert h.step()[1][0].status == RequestStatus.FINISHED_LENGTH


def test_abort_frees_blocks_at_once_and_tells_the_worker_next_step():
    h = Harness(num_kv_blocks=4)
    h.add(make_request("a", 8), make_request("b", 7))
    h.step()
    h.add(make_request("c", 8))
    h.scheduler.abort_requests(["a", "unknown"])
    assert h.scheduler.block_manager.num_free_blocks == 2
    plan, _ = h.step()
    assert plan.finished_req_ids == ["a"]
    assert [(r.req_id, r.block_ids) for r in plan.new_requests] == [("c", [1, 0])]
    assert "a" not in h.worker.token_ids
    h.scheduler.abort_requests(["a"])  # already finished: no error, no second notice
    h.scheduler.abort_requests(["c", "b"])
    plan, _ = h.step()
    assert plan == StepPlan(plan.step_id, [], [], [])  # nothing to run, nothing sent
    assert h.scheduler.block_manager.num_free_blocks == 4


def test_abort_of_a_waiting_request_is_not_sent_to_the_worker():
    h = Harness(num_kv_blocks=3)
    h.add(make_request("a", 8, max_tokens=4), make_request("b", 8, max_tokens=4))
    h.step()
    h.scheduler.abort_requests(["b"])
    assert h.scheduler.num_waiting == 0
    plan, _ = h.step()
    assert plan.finished_req_ids == []


def test_result_of_a_request_aborted_while_the_step_ran_is_ignored():
    h = Harness()
    h.add(make_request("a", 4), make_request("b", 4))
    plan = h.scheduler.schedule()
    result = h.worker.execute(plan)
    h.scheduler.abort_requests(["a"])
    updates = h.scheduler.update_from_output(plan, result)
    assert [u.req_id for u in updates] == ["b"]
    assert h.scheduler.schedule().finished_req_ids == ["a"]


def test_result_that_does_not_answer_the_plan_raises():
    h = Harness()
    h.add(make_request("a", 4))
    plan = h.scheduler.schedule()
    with pytest.raises(ValueError):
        h.scheduler.update_from_output(plan, StepResult(plan.step_id + 1, 0, ["a"], [1], 0.0))
    with pytest.raises(RuntimeError, match="expected a sampled token"):
        h.scheduler.update_from_output(plan, StepResult(plan.step_id, 0, [], [], 0.0))
    with pytest.raises(RuntimeError, match="unscheduled"):
        h.scheduler.update_from_output(plan, StepResult(plan.step_id, 0, ["x"], [1], 0.0))


def test_finish_requests_for_a_stop_string():
    h = Harness()
    h.add(make_request("a", 4))
    h.step()
    h.scheduler.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert h.scheduler.block_manager.num_free_blocks == 12
    with pytest.raises(ValueError):
        h.scheduler.finish_requests(["a"], RequestStatus.RUNNING)


def test_queue_full_error():
    h = Harness(max_queued_requests=2)
    h.add(make_request("a", 4), make_request("b", 4))
    with pytest.raises(QueueFullError):
        h.add(make_request("c", 4))
    h.step()  # both admitted: the queue has room again
    h.add(make_request("c", 4))


def test_add_request_rejects_what_could_never_run():
    h = Harness(num_kv_blocks=4, max_model_len=64)
    h.add(make_request("a", 4))
    with pytest.raises(ValueError, match="already exists"):
        h.add(make_request("a", 4))
    with pytest.raises(ValueError, match="prompt tokens"):
        h.add(make_request("b", 0))
    with pytest.raises(ValueError, match="prompt tokens"):
        h.add(make_request("b", 65))
    with pytest.raises(ValueError, match="KV pool"):
        h.add(make_request("b", 10, max_tokens=7))  # 17 tokens > 4 blocks of 4
    h.add(make_request("b", 10, max_tokens=6))


def test_watermark_keeps_headroom_for_running_requests():
    h = Harness(num_kv_blocks=10, watermark=0.2)  # 2 blocks
    h.add(make_request("a", 7))
    h.step()
    h.add(make_request("b", 24), make_request("c", 4))
    assert h.step_tokens() == {"a": 1, "b": 24}  # 8 free - 6 = 2 left: allowed
    assert h.step_tokens() == {"a": 1, "b": 1}  # c would leave 1 < 2 free
    assert h.scheduler.num_waiting == 1


def test_watermark_does_not_block_a_request_alone():
    h = Harness(num_kv_blocks=10, watermark=0.2)
    h.add(make_request("a", 39, max_tokens=1))  # 10 blocks: the whole pool
    assert h.step_tokens() == {"a": 39}


def test_max_num_seqs_caps_the_batch():
    h = Harness(max_num_seqs=2)
    h.add(make_request("a", 4, max_tokens=2), make_request("b", 4), make_request("c", 4))
    assert h.step_tokens() == {"a": 4, "b": 4}
    assert h.step_tokens() == {"a": 1, "b": 1}  # a finishes
    assert h.step_tokens() == {"b": 1, "c": 4}


def test_fcfs_never_skips_a_waiting_request_that_does_not_fit():
    h = Harness(num_kv_blocks=4)
    h.add(make_request("a", 8))
    h.step()
    h.add(make_request("b", 12, max_tokens=1), make_request("c", 4, max_tokens=1))
    for _ in range(3):
        assert h.step_tokens() == {"a": 1}


def test_empty_plan_when_nothing_is_runnable():
    h = Harness()
    plan = h.scheduler.schedule()
    assert plan == StepPlan(0, [], [], [])
    assert h.scheduler.schedule().step_id == 0  # empty plans use up no step ids
    assert len(h.scheduler.records) == 0


def test_scheduling_again_before_the_result_schedules_nothing_twice():
    h = Harness()
    h.add(make_request("a", 4))
    plan = h.scheduler.schedule()
    assert h.scheduler.schedule() == StepPlan(plan.step_id + 1, [], [], [])  # a awaits its token
    updates = h.scheduler.update_from_output(plan, h.worker.execute(plan))
    assert [u.req_id for u in updates] == ["a"]
    assert h.step_tokens() == {"a": 1}


def run_to_completion(h: Harness, max_steps: int = 200) -> None:
    """Step until every request has finished; a request stuck in the queue fails, not hangs."""
    for _ in range(max_steps):
        if not h.scheduler.has_unfinished_requests():
            return
        h.step()
    raise AssertionError(f"unfinished after {max_steps} steps: {sorted(h.scheduler.requests)}")


def scheduled_tokens(plan: StepPlan) -> dict[str, int]:
    return {r.req_id: r.num_new_tokens for r in plan.new_requests + plan.cached_requests}


def schedule_twice_preempting_a_request_in_flight(**config) -> tuple[Harness, StepPlan, StepPlan]:
    """c's decode is in the first plan; the second, scheduled before the first's result, needs
    blocks for d's next prefill chunk, so c is preempted while its token is still being sampled."""
    h = Harness(num_kv_blocks=6, max_num_batched_tokens=8, **config)
    c = make_request("c", 8)
    c.priority = 1  # sorts after d: the victim
    h.add(c)
    assert h.step_tokens() == {"c": 8}
    h.add(make_request("d", 20, max_tokens=2))
    first = h.scheduler.schedule()
    assert scheduled_tokens(first) == {"c": 1, "d": 7}  # c holds 3 blocks, d 2: one is free
    second = h.scheduler.schedule()
    assert scheduled_tokens(second) == {"d": 8}  # d needs 2 more blocks
    assert h.scheduler.records[-1].preempted_req_ids == ["c"]
    return h, first, second


def test_a_token_sampled_for_a_request_preempted_meanwhile_is_dropped():
    h, first, second = schedule_twice_preempting_a_request_in_flight()
    c, d = h.scheduler.get_request("c"), h.scheduler.get_request("d")
    assert (c.status, c.num_computed_tokens) == (RequestStatus.PREEMPTED, 0)
    first_result = h.worker.execute(first)
    second_result = h.worker.execute(second)
    assert first_result.req_ids == ["c"]  # the worker sampled c's token before it dropped c
    assert h.scheduler.update_from_output(first, first_result) == []  # c recomputes that token
    assert h.scheduler.update_from_output(second, second_result) == []  # d's chunks are partial
    assert len(c.output_token_ids) == 1
    run_to_completion(h)
    assert c.output_token_ids == reference_output(make_request("c", 8), 64)[0]
    assert d.output_token_ids == reference_output(make_request("d", 20, max_tokens=2), 64)[0]


def test_step_records_are_bounded():
    scheduler = Scheduler(make_config(), max_records=2)
    worker = FakeWorker()
    scheduler.add_request(make_request("a", 4))
    for _ in range(3):
        plan = scheduler.schedule()
        scheduler.update_from_output(plan, worker.execute(plan))
    assert [r.step_id for r in scheduler.records] == [1, 2]


def test_config_validation():
    with pytest.raises(ValueError, match="max_model_len"):
        make_config(enable_chunked_prefill=False, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="max_num_seqs"):
        make_config(max_num_seqs=128)
    with pytest.raises(ValueError, match="watermark"):
        make_config(watermark=1.0)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        make_config(num_kv_blocks=0)
    assert make_config(num_kv_blocks=100, watermark=0.05).watermark_blocks == 5


def test_sampling_params():
    params = SamplingParams(max_tokens=3, temperature=0.5, top_p=0.9, top_k=4, seed=7)
    options = params.to_options()
    assert (options.temperature, options.top_p, options.top_k, options.seed) == (0.5, 0.9, 4, 7)
    for bad in (dict(max_tokens=0), dict(max_tokens=1, top_p=0.0), dict(max_tokens=1, top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_scheduler_svc_core_imports_no_gpu_libraries():
    code = (
        "import sys, scheduler_svc.scheduler; "
        "bad = {'torch', 'cupy', 'transformers'} & sys.modules.keys(); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


SHARED_PREFIXES = [[7] * 9, [1, 2, 3, 4, 5, 6, 7, 8], [42] * 4]


def random_request(rng: random.Random, req_id: str, max_model_len: int) -> Request:
    """Random lengths and stops; half the prompts start with a shared prefix, a few salted."""
    prefix = rng.choice(SHARED_PREFIXES) if rng.random() < 0.5 else []
    prompt = prefix + [rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, 24 - len(prefix)))]
    params = SamplingParams(
        max_tokens=rng.randint(1, max_model_len - len(prompt) + 2),
        stop_token_ids=rng.sample(range(VOCAB_SIZE), 20) if rng.random() < 0.3 else [],
        ignore_eos=rng.random() < 0.2,
    )
    eos = frozenset(rng.sample(range(VOCAB_SIZE), 10))
    return Request(req_id, prompt, params, eos, cache_salt=rng.choice(["", "", "", "tenant"]))


def check_worker_view(scheduler: Scheduler, worker: FakeWorker, arrival: dict[str, int]) -> None:
    """The worker's state, rebuilt from plan diffs alone, equals the scheduler's."""
    running_ids = [r.req_id for r in scheduler.running]
    assert set(worker.block_tables) == set(running_ids)
    for request in scheduler.running:
        assert worker.block_tables[request.req_id] == (
            scheduler.block_manager.get_block_ids(request.req_id)
        )
        assert worker.num_computed_tokens[request.req_id] == request.num_computed_tokens
        assert worker.token_ids[request.req_id][: request.num_tokens] == request.all_token_ids
    held = Counter(b for req_id in running_ids for b in scheduler.block_manager.get_block_ids(req_id))
    for block_id, num_holders in held.items():  # shared prefix blocks are counted, never lost
        assert scheduler.block_manager.blocks[block_id].ref_cnt == num_holders
    assert len(held) + scheduler.block_manager.num_free_blocks == scheduler.config.num_kv_blocks
    order = [arrival[req_id] for req_id in running_ids]
    order += [arrival[r.req_id] for r in scheduler.waiting]
    assert order == sorted(order), "queues left arrival order"
    assert len(running_ids) <= scheduler.config.max_num_seqs


@pytest.mark.parametrize(
    "enable_chunked_prefill, preemption_mode",
    [(True, "recompute"), (False, "recompute"), (True, "swap")],
)
def test_long_random_run_under_memory_pressure(enable_chunked_prefill, preemption_mode):
    rng = random.Random(20240601 + enable_chunked_prefill)
    max_model_len = 32
    scheduler = Scheduler(
        make_config(
            num_kv_blocks=14,
            max_model_len=max_model_len,
            max_num_seqs=6,
            max_num_batched_tokens=16 if enable_chunked_prefill else 32,
            max_queued_requests=20,
            watermark=0.1,
            enable_chunked_prefill=enable_chunked_prefill,
            preemption_mode=preemption_mode,
            num_swap_blocks=8,  # room for a few victims: the others are recomputed
        )
    )
    worker = FakeWorker()
    requests: dict[str, Request] = {}
    arrival: dict[str, int] = {}
    outputs: dict[str, list[int]] = {}
    statuses: dict[str, RequestStatus] = {}
    aborted: set[str] = set()
    num_partial_prefills = num_hit_tokens = 0
    backlog = [random_request(rng, f"r{i}", max_model_len) for i in range(1000)]
    backlog.reverse()
    while backlog or scheduler.has_unfinished_requests():
        for _ in range(rng.choice([0, 0, 1, 1, 2, 4])):
            if backlog:
                request = backlog[-1]
                try:
                    scheduler.add_request(request)
                except QueueFullError:
                    break
                backlog.pop()
                requests[request.req_id] = request
                arrival[request.req_id] = len(arrival)
                outputs[request.req_id] = []
        if rng.random() < 0.05 and scheduler.requests:
            victim = rng.choice(sorted(scheduler.requests))
            scheduler.abort_requests([victim])
            aborted.add(victim)
        if not scheduler.has_unfinished_requests():
            continue
        plan = scheduler.schedule()
        assert plan.new_requests or plan.cached_requests, "unfinished requests but nothing runs"
        assert plan.num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        num_partial_prefills += sum(
            r.num_computed_tokens + r.num_new_tokens < len(r.token_ids) for r in plan.new_requests
        )
        num_hit_tokens += sum(r.num_computed_tokens for r in plan.new_requests)
        result = worker.execute(plan)
        check_worker_view(scheduler, worker, arrival)
        if rng.random() < 0.02:  # an abort that lands while the step runs
            victim = rng.choice([r.req_id for r in plan.new_requests + plan.cached_requests])
            scheduler.abort_requests([victim])
            aborted.add(victim)
        for update in scheduler.update_from_output(plan, result):
            outputs[update.req_id] += update.new_token_ids
            if update.status.is_finished:
                statuses[update.req_id] = update.status

    assert scheduler.block_manager.num_free_blocks == scheduler.config.num_kv_blocks
    assert len(requests) == 1000 and scheduler.num_waiting == scheduler.num_running == 0
    for req_id, request in requests.items():
        expected, expected_status = reference_output(request, max_model_len)
        if req_id in aborted:
            assert expected[: len(outputs[req_id])] == outputs[req_id]
            assert request.status == RequestStatus.FINISHED_ABORTED
        else:
            assert outputs[req_id] == expected, req_id
            assert statuses[req_id] == expected_status == request.status
    num_preemptions = sum(r.num_preemptions for r in requests.values())
    assert num_preemptions > 50
    assert sum(len(r.resumed_req_ids) for r in scheduler.records) > 50
    assert len(aborted) > 20
    assert set(statuses.values()) == {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH}
    assert (num_partial_prefills > 50) == enable_chunked_prefill
    assert num_hit_tokens > 1000  # shared prefixes and recompute-preempted requests hit the cache
    num_swapped = sum(len(r.swapped_out_req_ids) for r in scheduler.records)
    assert (num_swapped > 20) == (preemption_mode == "swap")
    assert sum(len(r.swapped_in_req_ids) for r in scheduler.records) > 20 or preemption_mode != "swap"
    assert scheduler.swap_pool.num_free_blocks == 8


def test_the_last_token_of_the_budget_still_serves_a_running_request():
    h = Harness(max_num_seqs=3, max_num_batched_tokens=3)
    h.add(make_request("a", 1), make_request("b", 1), make_request("c", 1))
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 1}
    assert h.step_tokens() == {"a": 1, "b": 1, "c": 1}  # the third decode takes the last token


def test_a_request_awaiting_its_token_does_not_hold_up_the_ones_after_it():
    h = Harness(max_num_batched_tokens=8)
    h.add(make_request("a", 2), make_request("b", 2), make_request("c", 30))
    first = h.scheduler.schedule()
    assert scheduled_tokens(first) == {"a": 2, "b": 2, "c": 4}
    second = h.scheduler.schedule()  # before the result: a and b await their tokens
    assert scheduled_tokens(second) == {"c": 8}
    h.scheduler.abort_requests(["b"])
    third = h.scheduler.schedule()  # a, still awaiting, sits just before c
    assert scheduled_tokens(third) == {"c": 8}
    for plan in (first, second, third):
        h.scheduler.update_from_output(plan, h.worker.execute(plan))


def test_sequence_numbers_count_add_request_calls_from_zero():
    h = Harness()
    requests = [make_request(name, 4) for name in "abc"]
    h.add(*requests)
    assert [r.sequence_number for r in requests] == [0, 1, 2]


def test_plans_and_records_carry_what_was_decided():
    h = Harness(num_kv_blocks=4, max_num_seqs=2)
    a = make_request("a", 4, max_tokens=1, temperature=0.5, top_k=3, seed=9)
    h.add(a, make_request("b", 4), make_request("c", 4))
    plan, _ = h.step()  # a finishes; c waits for a sequence slot
    assert plan.new_requests[0].sampling == a.sampling_params.to_options()
    record = h.scheduler.records[-1]
    assert (record.num_waiting, record.num_running, record.finished_req_ids) == (1, 2, [])  # as scheduled
    plan, _ = h.step()
    assert h.scheduler.records[-1].finished_req_ids == plan.finished_req_ids == ["a"]


def test_misuse_is_refused_with_a_message_that_says_what():
    h = Harness(max_queued_requests=1)
    stale = make_request("stale", 4)
    stale.num_computed_tokens = 2
    with pytest.raises(ValueError, match="^request 'stale' is not fresh$"):
        h.add(stale)
    h.add(make_request("a", 4))
    with pytest.raises(QueueFullError, match="^1 requests are already waiting$"):
        h.add(make_request("b", 4))
    with pytest.raises(ValueError, match="^RUNNING is not a finished status$"):
        h.scheduler.finish_requests(["a"], RequestStatus.RUNNING)
    plan = h.scheduler.schedule()
    with pytest.raises(ValueError, match=r"^result of step 1 \(0 ids, 0 tokens\) does not answer plan 0$"):
        h.scheduler.update_from_output(plan, StepResult(1, 0, [], [], 0.0))
    with pytest.raises(RuntimeError, match="^request 'a' expected a sampled token in step 0$"):
        h.scheduler.update_from_output(plan, StepResult(0, 0, [], [], 0.0))
    chunked = Harness(max_num_batched_tokens=8)
    chunked.add(make_request("p", 20))
    plan = chunked.scheduler.schedule()  # a partial prefill chunk samples nothing
    with pytest.raises(RuntimeError, match="^request 'p' expected no sampled token in step 0$"):
        chunked.scheduler.update_from_output(plan, StepResult(0, 0, ["p"], [1], 0.0))
