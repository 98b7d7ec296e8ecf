"""An in-process stand-in for `WorkerGroup` that tests kill, restart and poison at will.

`ContextRunner` is a worker without a model whose next token is a function of the whole context
(prompt and outputs so far) as read back from its paged KV cache of token ids, so a request resumed
with a token repeated, lost or misplaced continues differently from an undisturbed run, and a
prefix-cache hit or swap-in of K/V the worker never computed fails loudly. `ScriptedWorkers` runs
it behind the interface the engine uses (execute, num_deaths, is_registered, lost_since,
dead_reason, wait_change); a death forgets the runner, as a dead worker process takes its KV cache
and request state with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler_svc import protocol
from scheduler_svc.worker_group import WorkerDiedError, WorkerStepError

VOCAB = 900  # tokens below the tiny tokenizer's 1056 ids


def next_token(context: list[int]) -> int:
    """The 'model': a token that depends on every token of the context and on its length."""
    value = len(context)
    for token_id in context:
        value = (value * 1_000_003 + token_id) % 2_147_483_647
    return 3 + value % VOCAB


@dataclass(slots=True)
class _State:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


@dataclass(slots=True)
class ContextRunner:
    """A paged 'KV cache' of token ids: each step writes the tokens it computes into the request's
    blocks, and sampling reads the whole context back from them, as attention does. A prefix hit
    on a block this worker never wrote, or a swap-in of a copy it never made, cannot go unseen."""

    block_size: int = 16
    requests: dict[str, _State] = field(default_factory=dict)
    kv: dict[int, dict[int, int]] = field(default_factory=dict)  # block -> offset -> token id
    swap: dict[int, dict[int, int]] = field(default_factory=dict)  # CPU swap block -> its copy

    def execute(self, plan: protocol.StepPlan) -> protocol.StepResult:
        for device, cpu in plan.swap_out:
            self.swap[cpu] = dict(self.kv.get(device, {}))
        for device, cpu in plan.swap_in:
            assert cpu in self.swap, f"swap-in of block {cpu}, which this worker never swapped out"
            self.kv[device] = dict(self.swap[cpu])
        for req_id in plan.finished_req_ids:
            self.requests.pop(req_id, None)
        scheduled = []
        for new in plan.new_requests:
            assert new.req_id not in self.requests, f"{new.req_id} sent twice"
            self.requests[new.req_id] = _State(list(new.token_ids), list(new.block_ids), new.num_computed_tokens)
            scheduled.append((new.req_id, new.num_new_tokens))
        for cached in plan.cached_requests:
            state = self.requests[cached.req_id]  # KeyError: the scheduler thinks we know it
            assert state.num_computed_tokens == cached.num_computed_tokens
            state.block_ids += cached.new_block_ids
            scheduled.append((cached.req_id, cached.num_new_tokens))
        req_ids, token_ids = [], []
        for req_id, num_new_tokens in scheduled:
            state = self.requests[req_id]
            for position in range(state.num_computed_tokens, state.num_computed_tokens + num_new_tokens):
                block = state.block_ids[position // self.block_size]
                self.kv.setdefault(block, {})[position % self.block_size] = state.token_ids[position]
            state.num_computed_tokens += num_new_tokens
            if state.num_computed_tokens == len(state.token_ids):
                token = next_token(self._read_context(req_id, state))
                state.token_ids.append(token)
                req_ids.append(req_id)
                token_ids.append(token)
        return protocol.StepResult(plan.step_id, 0, req_ids, token_ids, 0.0)

    def _read_context(self, req_id: str, state: _State) -> list[int]:
        context = []
        for position in range(len(state.token_ids)):
            block = state.block_ids[position // self.block_size]
            token = self.kv.get(block, {}).get(position % self.block_size)
            assert token is not None, f"{req_id}: position {position} was never computed into block {block}"
            context.append(token)
        return context


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    """What an undisturbed run of `ContextRunner` generates (eos ignored)."""
    context = list(prompt)
    for _ in range(max_tokens):
        context.append(next_token(context))
    return context[len(prompt):]


PlanFault = Callable[[protocol.StepPlan], bool]


class ScriptedWorkers:
    """The engine's worker group: `kill()` and `restart()` on demand, faults on chosen plans."""

    def __init__(self, step_delay_s: float = 0.001, block_size: int = 4) -> None:
        self.step_delay_s = step_delay_s
        self.block_size = block_size
        self.runner = ContextRunner(block_size)
        self.num_deaths = 0
        self.generation = 1
        self.is_registered = True
        self.lost_since: float | None = None
        self.dead_reason: str | None = None
        self.crash_if: PlanFault = lambda plan: False  # the worker process dies on such a plan
        self.fail_if: PlanFault = lambda plan: False  # the worker reports an error for it
        self.restart_after_s: float | None = None  # after a crash: come back by itself this much later
        self.plans: list[protocol.StepPlan] = []
        self._change = asyncio.Event()

    async def execute(self, plan: protocol.StepPlan) -> protocol.StepResult:
        if not self.is_registered:
            raise WorkerDiedError(self.dead_reason)
        self.plans.append(plan)
        deaths = self.num_deaths
        await asyncio.sleep(self.step_delay_s)
        if self.num_deaths != deaths:  # killed while the step ran (and maybe restarted since)
            raise WorkerDiedError(self.dead_reason or "killed during the step")
        if self.crash_if(plan):
            self.kill("injected crash")
            raise WorkerDiedError(self.dead_reason)
        if self.fail_if(plan):
            for req_id in plan.finished_req_ids:  # as the real worker: all else is as before the plan
                self.runner.requests.pop(req_id, None)
            raise WorkerStepError("worker 0: injected step failure")
        return self.runner.execute(plan)

    def kill(self, reason: str = "killed by the test") -> None:
        self.num_deaths += 1
        self.is_registered = False
        self.dead_reason = reason
        self.lost_since = self.lost_since or time.monotonic()
        self.runner = ContextRunner(self.block_size)  # its KV cache and state died with it
        self._notify()
        if self.restart_after_s is not None:
            asyncio.get_running_loop().call_later(self.restart_after_s, self.restart)

    def restart(self) -> None:
        if self.is_registered:
            return
        self.generation += 1
        self.is_registered = True
        self.dead_reason = self.lost_since = None
        self._notify()

    async def wait_change(self, timeout_s: float | None) -> bool:
        try:
            await asyncio.wait_for(self._change.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _notify(self) -> None:
        self._change.set()
        self._change = asyncio.Event()


def plan_computes_token(token_id: int) -> PlanFault:
    """A fault on every plan that (re)sends a request whose tokens contain `token_id`."""
    return lambda plan: any(token_id in new.token_ids for new in plan.new_requests)
