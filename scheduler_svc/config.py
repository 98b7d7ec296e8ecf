"""Limits of the iteration-level scheduler and of one request, checked once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

# gRPC refuses a larger request message (RESOURCE_EXHAUSTED) before it is parsed.
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


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
    # Who is admitted next (request_queue.py): "priority" (aged priority, then fair share between
    # tenants, then arrival; a waiting request that outranks a running one preempts it when the
    # sequence cap or the KV pool leaves it no room), "sjf" (aged priority, then shortest remaining
    # work, aged; preempts like priority) or "fcfs" (arrival only, no priority preemption).
    scheduling_policy: str = "priority"
    # The thrash guard: a request preempted for priority runs at least this many steps after it
    # resumes before priority can preempt it again.
    priority_preemption_guard_steps: int = 16
    # Fair share counts a tenant's served tokens with this half-life, in scheduler steps.
    fair_share_half_life_steps: int = 1000
    tenant_weights: dict[str, float] = field(default_factory=dict)  # unlisted tenants weigh 1
    # When a waiting request may be admitted: "immediate" (its next blocks fit) or "lifetime"
    # (length_forecast.py: its forecast total length, beside the running requests' forecast growth,
    # must fit the pool with the watermark to spare; with nothing running the head is admitted
    # anyway). Immediate is the default: it measured better (docs/benchmarks.md, SLA tiers).
    admission: str = "immediate"
    admission_quantile: float = 0.5  # the quantile of observed output / max_tokens forecasts use

    def __post_init__(self) -> None:
        for name in (
            "num_kv_blocks",
            "max_model_len",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_queued_requests",
            "fair_share_half_life_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling must be 'continuous' or 'static', got {self.scheduling!r}")
        if self.scheduling_policy not in ("priority", "sjf", "fcfs"):
            raise ValueError(f"scheduling_policy must be priority, sjf or fcfs, got {self.scheduling_policy!r}")
        if not isinstance(self.priority_preemption_guard_steps, int) or self.priority_preemption_guard_steps < 0:
            raise ValueError(
                f"priority_preemption_guard_steps must be an integer >= 0, got {self.priority_preemption_guard_steps!r}"
            )
        if self.admission not in ("lifetime", "immediate"):
            raise ValueError(f"admission must be lifetime or immediate, got {self.admission!r}")
        if not 0.0 < self.admission_quantile <= 1.0:
            raise ValueError(f"admission_quantile must be in (0, 1], got {self.admission_quantile!r}")
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


@dataclass(slots=True, frozen=True)
class RequestLimits:
    """Bounds on what one request may carry (flags of `omnibus serve`), checked before any costly
    work: the checks read lengths, so refusing an oversized request costs no more than the bounds."""

    max_input_chars: int = 1 << 20  # characters of `prompt`, of all `messages`, or of a Tokenize input
    max_chat_messages: int = 4096
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 256
    # Clients may ask for priorities in [-max_abs_priority, max_abs_priority]: with aging, a
    # request then waits at most about 2 * max_abs_priority * priority_aging_s behind later work.
    max_abs_priority: int = 100

    def __post_init__(self) -> None:
        for name in ("max_input_chars", "max_chat_messages", "max_stop_strings", "max_stop_string_chars",
                     "max_stop_token_ids"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_abs_priority, int) or not 0 <= self.max_abs_priority < 2**31:
            raise ValueError(f"max_abs_priority must be an integer in [0, 2**31), got {self.max_abs_priority!r}")
