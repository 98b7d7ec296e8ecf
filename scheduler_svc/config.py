"""Limits of the iteration-level scheduler, checked once at construction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SchedulerConfig:
    """How much work one step may carry and how much KV cache there is to carry it."""

    num_kv_blocks: int  # size of the worker's KV pool (from its WorkerHello)
    max_model_len: int  # prompt + outputs of one request never exceed this
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 128  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens computed in one step, prefill chunks and decodes
    max_queued_requests: int = 1024  # waiting requests before add_request refuses more
    # Fraction of the pool kept free when admitting a waiting request, so the running ones can
    # grow a little before anyone has to be preempted.
    watermark: float = 0.01
    # Split prompts larger than the step's remaining budget across steps. Without it a prompt
    # runs whole in one step, so the budget must hold the longest one.
    enable_chunked_prefill: bool = True
    # "continuous" admits waiting requests whenever budget and blocks allow. "static" is the
    # baseline policy for comparisons: a batch of up to max_num_seqs requests is admitted only when
    # the previous batch has wholly finished, and no newcomer joins it while it runs.
    scheduling: str = "continuous"
    # Keep full KV blocks under a hash of their salted prefix and reuse them for later requests
    # that start with the same tokens (see block_manager.py).
    enable_prefix_caching: bool = True
    # Seconds of waiting that make up one priority level (see request_queue.py): a request of
    # priority p waits at most about (p - p') * priority_aging_s behind later work of priority
    # p'. math.inf gives strict priorities (starvation possible).
    priority_aging_s: float = 10.0
    # How a running request is preempted when the pool runs out: "recompute" (free its blocks,
    # compute them again later), "swap" (copy them to the worker's CPU swap space and back), or
    # "auto" (per victim, whichever preemption_cost.py estimates to be cheaper). Swapping needs
    # swap space with room; without it a victim is recomputed whatever the mode.
    preemption_mode: str = "auto"
    num_swap_blocks: int = 0  # the worker's CPU swap space (from its WorkerHello)
    kv_bytes_per_block: int = 0  # from the WorkerHello, for the cost rule
    swap_bytes_per_s: float = 0.0  # measured by the worker, for the cost rule

    def __post_init__(self) -> None:
        for name in (
            "num_kv_blocks",
            "max_model_len",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_queued_requests",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling must be 'continuous' or 'static', got {self.scheduling!r}")
        if self.preemption_mode not in ("auto", "recompute", "swap"):
            raise ValueError(f"preemption_mode must be auto, recompute or swap, got {self.preemption_mode!r}")
        if self.num_swap_blocks < 0:
            raise ValueError(f"num_swap_blocks must be >= 0, got {self.num_swap_blocks}")
        if not self.priority_aging_s > 0:
            raise ValueError(f"priority_aging_s must be > 0, got {self.priority_aging_s!r}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise a full batch of decodes (one token each) could never run in one step.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len}), or long prompts never run"
            )

    @property
    def watermark_blocks(self) -> int:
        """Blocks an admission must leave free (while other requests are running)."""
        return int(self.watermark * self.num_kv_blocks)
