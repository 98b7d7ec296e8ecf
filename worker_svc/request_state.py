"""Per-request state the worker keeps between steps, and applying a `StepPlan` to it.

The scheduler sends a request in full once, then per-step diffs; the worker appends the tokens it
samples itself. A plan is validated completely before anything changes, so a malformed plan is
rejected with the worker's state intact.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler_svc.protocol import CachedRequest, NewRequest, SamplingOptions, StepPlan


class PlanError(ValueError):
    """The plan disagrees with the worker's state or with the KV pool (a scheduler bug)."""


@dataclass(slots=True)
class RequestState:
    """What the worker knows about one running request."""

    req_id: str
    token_ids: list[int]  # prompt + every output known so far
    block_table: list[int]
    num_computed_tokens: int  # tokens whose K/V are in the cache
    sampling: SamplingOptions
    # Leading token_ids that are the prompt (penalties and min_tokens count the rest); None: all
    # the token ids it arrived with.
    num_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.num_prompt_tokens is None:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: tokens [start, start + num_new_tokens)."""

    state: RequestState
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.state.num_computed_tokens

    @property
    def seq_len(self) -> int:
        """Context length once this step's tokens are written."""
        return self.state.num_computed_tokens + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the last known token (a partial prefill samples nothing)."""
        return self.seq_len == self.state.num_tokens


class RequestStates:
    """Every request the worker holds, keyed by req_id."""

    def __init__(self, block_size: int, num_blocks: int, max_model_len: int | None = None) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.requests: dict[str, RequestState] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.requests

    def __getitem__(self, req_id: str) -> RequestState:
        return self.requests[req_id]

    def apply(self, plan: StepPlan) -> list[ScheduledRequest]:
        """Drop finished requests, add new ones, apply diffs; return the batch in plan order.

        Finished ids go first so that a preempted request can be dropped and resent as a
        `NewRequest` in the same plan. Raises `PlanError` (state untouched) on any mismatch.
        """
        self._validate(plan)
        for req_id in plan.finished_req_ids:
            self.requests.pop(req_id, None)
        scheduled = [self._add(new) for new in plan.new_requests]
        scheduled += [self._update(cached) for cached in plan.cached_requests]
        return scheduled

    def undo(self, plan: StepPlan) -> None:
        """Revert `apply(plan)` after the step failed, except for dropping finished requests.

        The scheduler has advanced nothing for a failed step, so it may resend the same diffs.
        """
        for cached in plan.cached_requests:
            table = self.requests[cached.req_id].block_table
            del table[len(table) - len(cached.new_block_ids) :]
        for new in plan.new_requests:
            self.requests.pop(new.req_id, None)

    def advance(self, scheduled: list[ScheduledRequest], sampled_token_ids: list[int]) -> None:
        """Record a finished step: tokens computed, plus one sampled token per sampling row."""
        sampled = iter(sampled_token_ids)
        for sched in scheduled:
            samples = sched.samples
            sched.state.num_computed_tokens += sched.num_new_tokens
            if samples:
                sched.state.token_ids.append(next(sampled))

    def _add(self, new: NewRequest) -> ScheduledRequest:
        state = RequestState(
            req_id=new.req_id,
            token_ids=list(new.token_ids),
            block_table=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            sampling=new.sampling,
            num_prompt_tokens=new.num_prompt_tokens,
        )
        self.requests[new.req_id] = state
        return ScheduledRequest(state, new.num_new_tokens)

    def _update(self, cached: CachedRequest) -> ScheduledRequest:
        state = self.requests[cached.req_id]
        state.block_table.extend(cached.new_block_ids)
        return ScheduledRequest(state, cached.num_new_tokens)

    def _validate(self, plan: StepPlan) -> None:
        finished = set(plan.finished_req_ids)
        seen: set[str] = set()
        for new in plan.new_requests:
            self._check_unique(new.req_id, seen)
            self._check_blocks(new.req_id, new.block_ids)
            self._check_step(new.req_id, len(new.token_ids), len(new.block_ids),
                             new.num_computed_tokens, new.num_new_tokens)
            if new.num_prompt_tokens is not None and not 1 <= new.num_prompt_tokens <= len(new.token_ids):
                raise PlanError(f"request {new.req_id!r}: {new.num_prompt_tokens} prompt tokens "
                                f"of {len(new.token_ids)} known tokens")
        for cached in plan.cached_requests:
            self._check_unique(cached.req_id, seen)
            state = self.requests.get(cached.req_id)
            if state is None or cached.req_id in finished:
                raise PlanError(f"step {plan.step_id}: cached request {cached.req_id!r} is unknown")
            if cached.num_computed_tokens != state.num_computed_tokens:
                raise PlanError(
                    f"step {plan.step_id}: request {cached.req_id!r} num_computed_tokens mismatch: "
                    f"scheduler {cached.num_computed_tokens}, worker {state.num_computed_tokens}"
                )
            # Blocks already in the table were checked when they arrived.
            self._check_blocks(cached.req_id, cached.new_block_ids)
            self._check_step(cached.req_id, state.num_tokens,
                             len(state.block_table) + len(cached.new_block_ids),
                             state.num_computed_tokens, cached.num_new_tokens)

    @staticmethod
    def _check_unique(req_id: str, seen: set[str]) -> None:
        if req_id in seen:
            raise PlanError(f"request {req_id!r} is scheduled twice in one plan")
        seen.add(req_id)

    def _check_step(self, req_id: str, num_tokens: int, num_table_blocks: int,
                    num_computed: int, num_new: int) -> None:
        end = num_computed + num_new
        if num_computed < 0 or num_new <= 0 or end > num_tokens:
            raise PlanError(
                f"request {req_id!r}: cannot compute tokens [{num_computed}, {end}) "
                f"of {num_tokens} known tokens"
            )
        if self.max_model_len is not None and end > self.max_model_len:
            raise PlanError(f"request {req_id!r}: {end} tokens exceed max_model_len "
                            f"{self.max_model_len}")
        if num_table_blocks * self.block_size < end:
            raise PlanError(f"request {req_id!r}: {num_table_blocks} blocks cannot hold "
                            f"{end} tokens (block_size {self.block_size})")

    def _check_blocks(self, req_id: str, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            # An out-of-range slot would write outside the pool (a device assert on CUDA).
            raise PlanError(f"request {req_id!r}: block ids {bad[:4]} outside the pool of "
                            f"{self.num_blocks}")
