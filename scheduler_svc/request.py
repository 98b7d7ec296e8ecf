"""A generation request as the scheduler sees it: token ids, sampling parameters, progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from scheduler_svc.protocol import SamplingOptions


class RequestStatus(IntEnum):
    """Lifecycle of a request; every FINISHED_* value sorts after the live ones."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # lost its KV blocks; waits in its queue place to be recomputed
    SWAPPED = 3  # its KV blocks are in the worker's CPU swap space; waits to be copied back
    FINISHED_STOPPED = 4  # eos, a stop token id, or a stop string (the engine checks those)
    FINISHED_LENGTH = 5  # max_tokens or max_model_len reached
    FINISHED_ABORTED = 6

    @property
    def is_finished(self) -> bool:
        """True for the FINISHED_* states."""
        return self >= RequestStatus.FINISHED_STOPPED


@dataclass(slots=True)
class SamplingParams:
    """What the client asked for. Stop strings stay with the engine (they need detokenizing)."""

    max_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # A set: the scheduler tests every sampled token against it (O(1) whatever its size).
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 means off
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0  # EOS and stop token ids are masked until this many tokens exist
    logprobs: int | None = None  # top alternatives returned with each token's logprob

    def __post_init__(self) -> None:
        self.stop_token_ids = frozenset(self.stop_token_ids)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0 or (self.logprobs is not None and self.logprobs < 0):
            raise ValueError(f"min_tokens and logprobs must be >= 0, got {self.min_tokens}, {self.logprobs}")

    def to_options(self, eos_token_ids: frozenset[int] = frozenset()) -> SamplingOptions:
        """The part of the parameters the worker needs to sample a token."""
        min_tokens_stop_ids: tuple[int, ...] = ()
        if self.min_tokens:
            masked = self.stop_token_ids if self.ignore_eos else self.stop_token_ids | eos_token_ids
            min_tokens_stop_ids = tuple(sorted(masked))
        return SamplingOptions(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=tuple(sorted(self.logit_bias.items())), min_tokens=self.min_tokens,
            min_tokens_stop_ids=min_tokens_stop_ids, logprobs=self.logprobs,
        )


@dataclass(slots=True, eq=False)  # an entity: two requests are the same only if identical
class Request:
    """One request's tokens and progress.

    `num_computed_tokens` counts tokens whose K/V are in the cache (or are being computed by the
    step just scheduled); the tokens after it are what the request still has to compute.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0  # seconds on the scheduler's clock; orders requests with priority
    priority: int = 0  # lower runs first; waiting ages it (see request_queue.py)
    cache_salt: str = ""  # prefix-cache blocks are shared only between equal salts
    tenant: str = ""  # fair share is between tenants (fair_share.py); "" is the shared default
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # The thrash guard: after being preempted for priority, the request is not preempted for
    # priority again before this step (set when it resumes; see scheduler.py).
    priority_guard_until_step: int = 0
    preempted_for_priority: bool = False  # its last preemption was for priority
    sequence_number: int = 0  # order of add_request: the FCFS tie-break, set by the scheduler
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    # Chained hashes of the request's full blocks so far (see block_hash.py), grown on demand.
    block_hashes: list[bytes] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def sampling_options(self) -> SamplingOptions:
        """What the worker samples this request's tokens with (min_tokens masks its EOS too)."""
        return self.sampling_params.to_options(self.eos_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then outputs, as a new list."""
        return self.prompt_token_ids + self.output_token_ids
