"""What the scheduler decided in one step, kept for tests, metrics and debugging."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StepRecord:
    """One non-empty step. Counts of free blocks and queues are taken after scheduling it."""

    step_id: int
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # req_id -> tokens
    new_req_ids: list[str] = field(default_factory=list)  # scheduled for the first time
    resumed_req_ids: list[str] = field(default_factory=list)  # re-admitted after a preemption
    preempted_req_ids: list[str] = field(default_factory=list)  # preempted in this step
    swapped_out_req_ids: list[str] = field(default_factory=list)  # the preempted that were swapped
    swapped_in_req_ids: list[str] = field(default_factory=list)  # the resumed that were swapped
    finished_req_ids: list[str] = field(default_factory=list)  # as sent in the plan
    num_free_blocks: int = 0
    num_waiting: int = 0
    num_running: int = 0
