"""Iteration-level scheduler: decides, every step, which tokens of which requests to compute.

There are no prefill and decode phases. Each request has `num_computed_tokens`, and one token
budget per step is shared by the running requests (a decode token, or the next chunk of a prompt)
and then by waiting requests, admitted in queue order. A waiting request first takes whatever of
its prefix the prefix cache holds, and computes only the rest. When a running request needs a
block and none is free, the running request that sorts last is preempted: by recompute (its
blocks are freed, staying in the prefix cache until evicted, and it computes them again later) or
by swap (the worker copies them to its CPU swap space, and back when it resumes), per
`SchedulerConfig.preemption_mode`. Either way it goes back to the queue, where its sort key gives
it back its place.

Order is `request_queue.scheduling_key`: priority (lower first) aged by waiting time, then
arrival (under `scheduling_policy="fcfs"`, arrival alone). Both the waiting queue and the running
list are kept in that order, so the running list is served in it and its last entry is the memory
preemption victim: the lowest-priority, latest arrival. Who is admitted next is the policy's
`RequestQueue.next_request` (fair share between tenants, or shortest job first, within the head's
priority level); admission never skips that request (one that does not fit blocks those behind
it), so large requests are not starved by small ones.

Admission (`SchedulerConfig.admission`): "immediate" admits the head when its next blocks fit
(leaving the watermark free while others run). "lifetime" also asks that the pool carry it to its
end: the blocks the running requests are forecast to grow into (length_forecast.py) plus the
blocks of the newcomer's forecast length must fit the free ones with the watermark to spare. With
nothing running the head is admitted whatever its forecast, so the pool is never left idle, and
a request that priority preemption made room for is admitted without it (its victims are gone).

Preemptive priorities (policies priority and sjf): before the running requests are served, if the
request to admit next outranks running ones (a strictly lower priority value, and an earlier aged
key) and the sequence cap, the token budget or the KV pool leaves it no room this step, the fewest
lowest-ranked of them that make room are preempted (cause "priority"; recompute or swap by the same
rule as for memory) and it is admitted in this step. If no such set makes room nobody is preempted;
if the running requests alone outgrow the pool, the memory preemption comes first (it takes the
lowest-ranked too) and the newcomer is admitted after that step, as any newcomer is.
Equal priorities never preempt each other, and a request preempted for priority is protected from
priority preemption for `priority_preemption_guard_steps` steps after it resumes, so two classes
cannot thrash. The room is estimated from the blocks the kept requests and the newcomer need this
step; a victim's block is freed only if no kept request holds it, and the newcomer's prefix-cache
hit on a block the victims free costs a free block, as `BlockManager.allocate_slots` counts it.

Static scheduling (`SchedulerConfig.scheduling == "static"`, the baseline to compare against)
changes one decision, who may be admitted: once the previous batch has wholly finished, the first
`max_num_seqs` waiting requests become the batch, and only its members are admitted (in one step
if the budget allows, else over the next steps, in queue order; a later arrival queued before them
does not block them) until every one of them has finished.

Recovery (the engine decides who and when): `recompute_requests` sends requests whose K/V a failed
step or a dead worker lost back to the queue, as a recompute-preemption does, or holds them out of
it until `release_held`; `reset_after_worker_loss` does so for every request with K/V and empties
the prefix cache, whose blocks died with the worker.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice

from scheduler_svc.block_manager import BlockManager
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.fair_share import TenantUsage
from scheduler_svc.length_forecast import LengthForecast
from scheduler_svc.preemption_cost import PreemptionCost
from scheduler_svc.protocol import CachedRequest, NewRequest, StepPlan, StepResult
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.request_queue import RequestQueue
from scheduler_svc.step_record import StepRecord
from scheduler_svc.swap_pool import SwapPool


_PRUNE_EVERY_STEPS = 1024  # how often tenants whose usage has decayed away are forgotten


class QueueFullError(RuntimeError):
    """`max_queued_requests` requests are already waiting."""


@dataclass(slots=True)
class RequestUpdate:
    """Tokens a request gained in one step, and its status after them."""

    req_id: str
    new_token_ids: list[int]
    status: RequestStatus


@dataclass(slots=True)
class _Step:
    """A step being scheduled: what is left of its budget and what it holds so far."""

    record: StepRecord
    token_budget: int
    new_requests: list[NewRequest] = field(default_factory=list)
    cached_requests: list[CachedRequest] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    memory_preempted: bool = False  # a running request lost its blocks for want of memory
    # The request that priority preemption made room for: admitted first, whatever the shares
    # charged since then say.
    reserved: Request | None = None


class Scheduler:
    """Owns every unfinished request and the KV block pool; see the module docstring."""

    def __init__(self, config: SchedulerConfig, max_records: int = 10_000) -> None:
        self.config = config
        self.block_manager = BlockManager(
            config.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}  # unfinished requests only
        # WAITING, PREEMPTED and SWAPPED, in the policy's order.
        self.waiting = RequestQueue(config.priority_aging_s, config.scheduling_policy, config.max_model_len)
        self.tenant_usage = TenantUsage(config.fair_share_half_life_steps, dict(config.tenant_weights))
        self.num_preemptions_by_cause = {"memory": 0, "priority": 0}  # since start, for metrics
        self.length_forecast = LengthForecast(config.max_model_len, config.admission_quantile)
        self.running: list[Request] = []  # RUNNING (they hold blocks), in queue order
        self._num_added = 0
        self.swap_pool = SwapPool(config.num_swap_blocks)
        self.preemption_cost = PreemptionCost(config.kv_bytes_per_block, config.swap_bytes_per_s)
        self.records: deque[StepRecord] = deque(maxlen=max_records)
        # Requests the worker knows but must drop; sent with the next plan that runs anything.
        self._finished_req_ids: list[str] = []
        self._next_step_id = 0
        # Static scheduling: the unfinished members of the current batch (running or waiting).
        self._static_batch: set[str] = set()
        # Requests kept out of the queue until released (the engine resumes the suspects of a
        # failed step one at a time; see engine.py), in the order they were held.
        self._held: dict[str, Request] = {}

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_swapped(self) -> int:
        return self.swap_pool.num_requests

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, req_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.requests.get(req_id)

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises QueueFullError, or ValueError if it could never run."""
        if request.req_id in self.requests:
            raise ValueError(f"request {request.req_id!r} already exists")
        if len(self.waiting) >= self.config.max_queued_requests:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting")
        self._check_fits(request)
        request.status = RequestStatus.WAITING
        request.sequence_number = self._num_added
        self._num_added += 1
        self.requests[request.req_id] = request
        self.waiting.add(request)

    def abort_requests(self, req_ids: Iterable[str]) -> None:
        """Drop requests now; unknown and already finished ids are ignored."""
        self.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, req_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish requests now (e.g. on a stop string), freeing their blocks for the next step."""
        if not status.is_finished:
            raise ValueError(f"{status.name} is not a finished status")
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is not None:
                self._finish(request, status)

    def schedule(self) -> StepPlan:
        """Plan the next step; the worker applies `finished_req_ids` before `new_requests`.

        When nothing can run the plan is empty, uses up no step id and need not be sent: the
        finished ids it would carry stay pending for the next plan that runs something.
        """
        step = _Step(StepRecord(self._next_step_id), self.config.max_num_batched_tokens)
        self._preempt_for_priority(step)
        self._schedule_running(step)
        # After a memory preemption the pool is short; admitting newcomers would only thrash it.
        if not step.memory_preempted:
            self._schedule_waiting(step)
        return self._build_plan(step)

    def update_from_output(self, plan: StepPlan, result: StepResult) -> list[RequestUpdate]:
        """Append the tokens sampled in `plan`'s step, finishing requests that hit a stop.

        Tokens of requests finished or aborted while the step ran are dropped. Updates come in
        batch order; a request whose prefill chunk was partial gets none.
        """
        sampled = self._match_result(plan, result)
        return [self._append_token(request, token_id) for request, token_id in sampled]

    def observe_step_time(self, num_scheduled_tokens: int, seconds: float) -> None:
        """How long the worker took for a step: the recompute side of the preemption cost rule."""
        self.preemption_cost.observe_step(num_scheduled_tokens, seconds)

    @property
    def held_req_ids(self) -> list[str]:
        """Requests held out of the queue (`recompute_requests(hold=True)`), oldest first."""
        return list(self._held)

    def recompute_requests(self, req_ids: Iterable[str], hold: bool = False) -> list[str]:
        """Send requests back to the queue to be computed again from their prompt and the tokens
        they already have, as a recompute-preemption does: their K/V on the worker is lost or
        suspect (it died, or failed the step). With `hold` they wait outside the queue until
        `release_held`. Unknown, finished and already held ids are ignored; returns the ids of
        the requests that had K/V (running or swapped out)."""
        had_kv = []
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None or req_id in self._held:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
                self.block_manager.free(request)
                self._finished_req_ids.append(req_id)  # a worker that survived drops its state
                had_kv.append(req_id)
            else:
                self.waiting.remove(request)  # before its key changes (sjf counts computed tokens)
                if request.status == RequestStatus.SWAPPED:
                    self.swap_pool.free(req_id)
                    had_kv.append(req_id)
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
            if hold:
                self._held[req_id] = request
            else:
                self.waiting.add(request)
        return had_kv

    def release_held(self) -> str | None:
        """Queue the oldest held request again; returns its id (None if none is held)."""
        if not self._held:
            return None
        req_id = next(iter(self._held))
        self.waiting.add(self._held.pop(req_id))
        return req_id

    def reset_after_worker_loss(self, hold: Iterable[str] = ()) -> list[str]:
        """The workers died, and their KV pool, swap space and request state with them: every
        request that had K/V is recomputed (those in `hold` held), the new workers have nothing
        to drop, and the prefix cache forgets every block. Returns the ids recomputed."""
        hold = set(hold)
        lost = [r.req_id for r in self.running]
        lost += [r.req_id for r in self.waiting if r.status == RequestStatus.SWAPPED]
        recomputed = self.recompute_requests([i for i in lost if i not in hold])
        recomputed += self.recompute_requests([i for i in lost if i in hold], hold=True)
        self._finished_req_ids.clear()
        self.block_manager.reset_prefix_cache()
        return recomputed

    def _check_fits(self, request: Request) -> None:
        if request.num_computed_tokens or request.output_token_ids:
            raise ValueError(f"request {request.req_id!r} is not fresh")
        if not 1 <= request.num_prompt_tokens <= self.config.max_model_len:
            raise ValueError(
                f"request {request.req_id!r} has {request.num_prompt_tokens} prompt tokens; "
                f"need 1..{self.config.max_model_len}"
            )
        max_tokens = request.sampling_params.max_tokens
        max_num_tokens = min(request.num_prompt_tokens + max_tokens, self.config.max_model_len)
        num_blocks = self.block_manager.num_blocks
        if self.block_manager.num_required_blocks(max_num_tokens) > num_blocks:
            # Alone in the pool it would still run out of blocks, and FCFS would then stall.
            raise ValueError(
                f"request {request.req_id!r} may reach {max_num_tokens} tokens, more than the "
                f"KV pool holds ({num_blocks} blocks of {self.config.block_size})"
            )

    def _schedule_running(self, step: _Step) -> None:
        i = 0
        while i < len(self.running) and step.token_budget > 0:
            request = self.running[i]
            num_new_tokens = self._num_new_tokens(request, step.token_budget)
            if num_new_tokens == 0:
                i += 1  # its last token is still being sampled
                continue
            new_block_ids = self._allocate_or_preempt(request, num_new_tokens, step)
            if new_block_ids is None:
                break  # it preempted itself, being the last running request
            step.cached_requests.append(
                CachedRequest(
                    request.req_id, new_block_ids, request.num_computed_tokens, num_new_tokens
                )
            )
            self._commit(request, num_new_tokens, step)
            i += 1

    def _allocate_or_preempt(
        self, request: Request, num_new_tokens: int, step: _Step
    ) -> list[int] | None:
        """New block ids for `request`, preempting later arrivals until they fit.

        Returns None if `request` itself had to be preempted.
        """
        while (new_block_ids := self.block_manager.allocate_slots(request, num_new_tokens)) is None:
            if len(self.running) == 1:
                raise RuntimeError(
                    f"request {request.req_id!r} cannot grow to "
                    f"{request.num_computed_tokens + num_new_tokens} tokens even with the whole KV "
                    f"pool; requests must be validated to fit it"
                )
            victim = self.running[-1]
            self._preempt(victim, step)
            if victim is request:
                return None
        return new_block_ids

    def _preempt(self, request: Request, step: _Step, cause: str = "memory") -> None:
        self.running.remove(request)
        self.num_preemptions_by_cause[cause] += 1
        request.preempted_for_priority = cause == "priority"
        if cause == "memory":
            step.memory_preempted = True
        if self._should_swap(request):
            block_ids = self.block_manager.get_block_ids(request.req_id)
            step.swap_out += zip(block_ids, self.swap_pool.allocate(request.req_id, len(block_ids)))
            request.status = RequestStatus.SWAPPED  # keeps num_computed_tokens: its K/V are kept
            step.record.swapped_out_req_ids.append(request.req_id)
        else:
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
        self.block_manager.free(request)
        request.num_preemptions += 1
        self.waiting.add(request)
        self._finished_req_ids.append(request.req_id)  # resent whole when it resumes
        step.record.preempted_req_ids.append(request.req_id)

    def _should_swap(self, request: Request) -> bool:
        mode = self.config.preemption_mode
        num_blocks = len(self.block_manager.get_block_ids(request.req_id))
        if mode == "recompute" or not self.swap_pool.can_hold(num_blocks):
            return False
        if request.num_computed_tokens >= request.num_tokens:
            return False  # its last token is in a step still running: its result would be lost
        return mode == "swap" or self.preemption_cost.prefers_swap(request.num_computed_tokens, num_blocks)

    def _preempt_for_priority(self, step: _Step) -> None:
        """Make room in this step for the request to admit next, if it outranks running ones;
        see the module docstring."""
        if self.config.scheduling_policy == "fcfs" or self.config.scheduling != "continuous":
            return
        head = self._admission_head()
        if head is None:
            return
        victims = self._priority_victims(head, step.record.step_id)
        for victim in victims:
            self._preempt(victim, step, "priority")
        if victims:
            step.reserved = head

    def _priority_victims(self, head: Request, step_id: int) -> list[Request]:
        """The fewest lowest-ranked running requests `head` may preempt whose preemption lets it
        run this step; [] if it needs none or no such set makes room."""
        eligible = [r for r in reversed(self.running) if self._may_preempt_for(head, r, step_id)]
        if not eligible or self._growth(self.running)[0] > self.block_manager.num_free_blocks:
            # The running requests alone outgrow the pool: a memory preemption of the lowest
            # ranked comes first, and the newcomer waits out that step like everyone else.
            return []
        kept, victims = list(self.running), []
        while not self._fits_with(head, kept, victims):
            if not eligible:
                return []
            victims.append(eligible.pop(0))
            kept.remove(victims[-1])
        return victims

    def _may_preempt_for(self, head: Request, victim: Request, step_id: int) -> bool:
        outranks = head.priority < victim.priority and self._running_key(head) < self._running_key(victim)
        return outranks and step_id >= victim.priority_guard_until_step

    def _fits_with(self, head: Request, kept: list[Request], victims: list[Request]) -> bool:
        """Whether `head` could be admitted this step if only `kept` ran (and `victims` had freed
        their blocks), by the same budget, block and watermark rules as scheduling uses."""
        if len(kept) >= self.config.max_num_seqs:
            return False
        num_needed, budget = self._growth(kept)
        swapped = head.status == RequestStatus.SWAPPED
        hits = [] if swapped else self.block_manager.get_computed_blocks(head)
        num_computed = head.num_computed_tokens + len(hits) * self.config.block_size
        num_new_tokens = self._num_new_tokens(head, budget, num_computed) if budget > 0 else 0
        if num_new_tokens == 0:
            return False
        num_needed += self.block_manager.num_required_blocks(num_computed + num_new_tokens) - len(hits)
        freed = self._blocks_freed_by(victims)
        # A hit on a free block is revived from the free queue, which costs a free block in
        # allocate_slots; the victims' blocks are free by then, so a hit on one costs one too.
        num_needed += sum(1 for block in hits if block.ref_cnt == 0 or block.block_id in freed)
        num_free = self.block_manager.num_free_blocks + len(freed)
        watermark_blocks = self.config.watermark_blocks if kept else 0
        return num_free - num_needed >= watermark_blocks

    def _growth(self, running: list[Request]) -> tuple[int, int]:
        """New blocks `running` take this step, served as `_schedule_running` serves them, and
        the token budget they leave."""
        budget, num_blocks = self.config.max_num_batched_tokens, 0
        for request in running:
            if budget <= 0:
                break
            num_new_tokens = self._num_new_tokens(request, budget)
            num_blocks += self._num_blocks_to_grow(request, num_new_tokens)
            budget -= num_new_tokens
        return num_blocks, budget

    def _num_blocks_to_grow(self, request: Request, num_new_tokens: int) -> int:
        num_held = len(self.block_manager.get_block_ids(request.req_id))
        return max(self.block_manager.num_required_blocks(request.num_computed_tokens + num_new_tokens) - num_held, 0)

    def _blocks_freed_by(self, victims: list[Request]) -> set[int]:
        """Ids of the blocks that preempting `victims` frees: those no other request holds."""
        holders = Counter(b for v in victims for b in self.block_manager.get_block_ids(v.req_id))
        blocks = self.block_manager.blocks
        return {block_id for block_id, n in holders.items() if blocks[block_id].ref_cnt == n}

    def _schedule_waiting(self, step: _Step) -> None:
        while step.token_budget > 0 and len(self.running) < self.config.max_num_seqs:
            reserved, step.reserved = step.reserved, None
            request = reserved or self._admission_head()
            # Victims already made room for a reserved request: the forecast must not refuse it.
            if request is None or not self._try_admit(request, step, forecast=reserved is None):
                break  # nobody overtakes the head of the queue
            if step.record.preempted_req_ids:
                break  # priority made room for that one only: a victim must not resume at once

    def _try_admit(self, request: Request, step: _Step, forecast: bool) -> bool:
        """Admit `request` if its next tokens fit (and, if `forecast`, its lifetime; see
        `_lifetime_fits`); False if not. A waiting request first takes its prefix-cache hits; a
        swapped-out one keeps its computed tokens, copied back into new blocks."""
        swapped = request.status == RequestStatus.SWAPPED
        computed_blocks = [] if swapped else self.block_manager.get_computed_blocks(request)
        num_hit_tokens = len(computed_blocks) * self.config.block_size
        num_computed = request.num_computed_tokens + num_hit_tokens
        num_new_tokens = self._num_new_tokens(request, step.token_budget, num_computed)
        if num_new_tokens == 0:
            return False
        if forecast and not self._lifetime_fits(request, computed_blocks):
            return False
        # The watermark is headroom for running requests to grow; with none it only blocks.
        watermark_blocks = self.config.watermark_blocks if self.running else 0
        if self.block_manager.allocate_slots(
            request, num_new_tokens, watermark_blocks, computed_blocks
        ) is None:
            return False
        if swapped:
            device_blocks = self.block_manager.get_block_ids(request.req_id)
            step.swap_in += zip(device_blocks, self.swap_pool.free(request.req_id))
            step.record.swapped_in_req_ids.append(request.req_id)
        else:
            self.block_manager.record_lookup(request.num_tokens, num_hit_tokens)
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = min(num_hit_tokens, request.num_prompt_tokens)
        request.num_computed_tokens = num_computed
        self.waiting.remove(request)  # the head, or in static mode the batch's first member waiting
        self.length_forecast.admitted(request)
        self._admit(request, num_new_tokens, step)
        return True

    def _lifetime_fits(self, request: Request, computed_blocks: list) -> bool:
        """Lifetime-aware admission: whether `request`, grown to its forecast length, fits beside
        the running requests grown to theirs, with the watermark to spare. Always true under
        `admission="immediate"`, static scheduling, or with nothing running: a pool that holds
        nobody is never kept idle (the request fits alone, `_check_fits` saw to that)."""
        if self.config.admission != "lifetime" or self.config.scheduling != "continuous" or not self.running:
            return True
        forecast, blocks = self.length_forecast, self.block_manager
        num_reserved = sum(
            max(blocks.num_required_blocks(forecast.num_kv_tokens(r)) - len(blocks.get_block_ids(r.req_id)), 0)
            for r in self.running
        )
        # A hit on a free block is revived from the free queue: it costs a free block too.
        num_needed = blocks.num_required_blocks(forecast.num_kv_tokens(request)) - len(computed_blocks)
        num_needed += sum(1 for block in computed_blocks if block.ref_cnt == 0)
        return blocks.num_free_blocks - num_reserved - num_needed >= self.config.watermark_blocks

    def _admission_head(self) -> Request | None:
        """The batching policy, who may be admitted next: continuous, the queue's head; static,
        the current batch's first member in queue order. A later arrival that sorts before the
        members (a higher priority) is not one of them and must not block them: the batch would
        never finish, and nothing would run again."""
        if not self.waiting:
            return None
        if self.config.scheduling == "continuous":
            step_id = self._next_step_id
            return self.waiting.next_request(lambda tenant: self.tenant_usage.share(tenant, step_id))
        if not self._static_batch:
            # Every member has finished (so nothing runs): the next batch is the queue's head.
            head = islice(self.waiting, self.config.max_num_seqs)
            self._static_batch = {r.req_id for r in head}
        return next((r for r in self.waiting if r.req_id in self._static_batch), None)

    def _admit(self, request: Request, num_new_tokens: int, step: _Step) -> None:
        if request.status in (RequestStatus.PREEMPTED, RequestStatus.SWAPPED):
            step.record.resumed_req_ids.append(request.req_id)
            if request.preempted_for_priority:
                guard_steps = self.config.priority_preemption_guard_steps
                request.priority_guard_until_step = step.record.step_id + guard_steps
                request.preempted_for_priority = False
        else:
            step.record.new_req_ids.append(request.req_id)
        request.status = RequestStatus.RUNNING
        bisect.insort(self.running, request, key=self._running_key)
        step.new_requests.append(
            NewRequest(
                req_id=request.req_id,
                token_ids=request.all_token_ids,
                block_ids=self.block_manager.get_block_ids(request.req_id),
                num_computed_tokens=request.num_computed_tokens,
                num_new_tokens=num_new_tokens,
                sampling=request.sampling_options(),
                num_prompt_tokens=request.num_prompt_tokens,
            )
        )
        self._commit(request, num_new_tokens, step)

    def _running_key(self, request: Request) -> tuple[float, int]:
        return self.waiting.key(request)

    def _num_new_tokens(self, request: Request, token_budget: int, num_computed: int | None = None) -> int:
        """Tokens `request` can compute within `token_budget` (0: none this step), counting
        from `num_computed` (default: its `num_computed_tokens`)."""
        if num_computed is None:
            num_computed = request.num_computed_tokens
        num_remaining = request.num_tokens - num_computed
        if num_remaining <= token_budget:
            return num_remaining
        return token_budget if self.config.enable_chunked_prefill else 0

    def _commit(self, request: Request, num_new_tokens: int, step: _Step) -> None:
        # Counted as computed once scheduled, so the next plan never schedules them twice.
        request.num_computed_tokens += num_new_tokens
        step.token_budget -= num_new_tokens
        step.record.num_scheduled_tokens[request.req_id] = num_new_tokens
        self.tenant_usage.charge(request.tenant, num_new_tokens, step.record.step_id)

    def _build_plan(self, step: _Step) -> StepPlan:
        if not step.new_requests and not step.cached_requests:
            # Nothing runs, so nothing is sent: finished ids wait for a step that is. (A step
            # that swaps always runs something: the request whose growth forced the swap-out.)
            assert not step.swap_out and not step.swap_in
            return StepPlan(self._next_step_id, [], [], [])
        finished_req_ids, self._finished_req_ids = self._finished_req_ids, []
        record = step.record
        record.finished_req_ids = list(finished_req_ids)
        record.num_free_blocks = self.block_manager.num_free_blocks
        record.num_waiting = len(self.waiting)
        record.num_running = len(self.running)
        self.records.append(record)
        if record.step_id % _PRUNE_EVERY_STEPS == 0:
            self.tenant_usage.prune(record.step_id, {r.tenant for r in self.requests.values()})
        self._next_step_id += 1
        return StepPlan(record.step_id, step.new_requests, step.cached_requests, finished_req_ids,
                        swap_out=step.swap_out, swap_in=step.swap_in)

    def _match_result(self, plan: StepPlan, result: StepResult) -> list[tuple[Request, int]]:
        """Pair each sampled token with its request, checking the result against the plan."""
        if result.step_id != plan.step_id or len(result.req_ids) != len(result.token_ids):
            raise ValueError(
                f"result of step {result.step_id} ({len(result.req_ids)} ids, "
                f"{len(result.token_ids)} tokens) does not answer plan {plan.step_id}"
            )
        tokens = dict(zip(result.req_ids, result.token_ids))
        scheduled = [r.req_id for r in plan.new_requests] + [r.req_id for r in plan.cached_requests]
        if unexpected := tokens.keys() - set(scheduled):
            raise RuntimeError(f"the worker sampled for unscheduled requests {sorted(unexpected)}")
        sampled = []
        for req_id in scheduled:
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished or aborted while the step ran
            should_sample = request.num_computed_tokens == request.num_tokens
            if should_sample != (req_id in tokens):
                raise RuntimeError(
                    f"request {req_id!r} expected {'a' if should_sample else 'no'} sampled token "
                    f"in step {plan.step_id}"
                )
            if should_sample:
                sampled.append((request, tokens[req_id]))
        return sampled

    def _append_token(self, request: Request, token_id: int) -> RequestUpdate:
        request.output_token_ids.append(token_id)
        status = self._check_stop(request, token_id)
        if status is not None:
            self._finish(request, status)
        return RequestUpdate(request.req_id, [token_id], request.status)

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        # A stop token wins over a length limit reached by the same token: the output is whole.
        # Both id collections are sets for requests from the API (proto_convert builds a frozenset),
        # so this costs the same for one stop token id as for the most a request may carry.
        params = request.sampling_params
        if token_id in params.stop_token_ids or (
            not params.ignore_eos and token_id in request.eos_token_ids
        ):
            return RequestStatus.FINISHED_STOPPED
        if (
            request.num_output_tokens >= params.max_tokens
            or request.num_tokens >= self.config.max_model_len
        ):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self.block_manager.free(request)
            self._finished_req_ids.append(request.req_id)  # the worker holds its state
        elif self._held.pop(request.req_id, None) is None:
            self.waiting.remove(request)
            if request.status == RequestStatus.SWAPPED:
                self.swap_pool.free(request.req_id)
        request.status = status
        del self.requests[request.req_id]
        self._static_batch.discard(request.req_id)
        self.length_forecast.finished(request, status)
