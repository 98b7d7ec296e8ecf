"""Typed messages between the scheduler and its workers (ZeroMQ, msgpack via msgspec).

Never pickle: a socket that unpickles runs whatever a peer sends it.

The scheduler sends a request's full data once (`NewRequest`) and per-step diffs after that
(`CachedRequest`): the worker keeps each request's token ids and block table, appends the tokens
it samples itself, and asserts that its `num_computed_tokens` agrees with the scheduler's. A request
resumed after a preemption is sent again as a `NewRequest` carrying its prompt and the outputs
generated so far: from token 0 after a recompute-preemption, or with `num_computed_tokens` set and
its blocks copied back from the worker's CPU swap space (`StepPlan.swap_in`) after a swap.

Wire layout: every frame is one msgpack-encoded tagged struct (`{"type": ..., ...}` as an array).
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 3


class SamplingOptions(msgspec.Struct, frozen=True, array_like=True):
    """What the worker needs to sample one request's next token."""

    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 means no limit
    seed: int | None = None  # per-request seed: same seed, same output
    min_p: float = 0.0  # [0, 1]; 0 means off
    presence_penalty: float = 0.0  # over generated tokens
    frequency_penalty: float = 0.0  # over generated tokens, per occurrence
    repetition_penalty: float = 1.0  # over prompt and generated tokens; 1 means off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the raw logits
    min_tokens: int = 0  # `min_tokens_stop_ids` are masked until this many tokens are generated
    min_tokens_stop_ids: tuple[int, ...] = ()  # EOS (unless ignore_eos) and the stop token ids
    logprobs: int | None = None  # top alternatives to return with each token's logprob; None: none


class NewRequest(msgspec.Struct, array_like=True):
    """A request the worker has not seen (or must rebuild after a preemption)."""

    req_id: str
    token_ids: list[int]  # prompt, plus outputs already generated when resuming
    block_ids: list[int]  # the request's whole block table
    num_computed_tokens: int  # tokens whose K/V are already in the cache (prefix hits)
    num_new_tokens: int  # tokens to compute in this step, starting at num_computed_tokens
    sampling: SamplingOptions
    # Leading token_ids that are the prompt (penalties tell it from the output); None: all of them.
    num_prompt_tokens: int | None = None


class CachedRequest(msgspec.Struct, array_like=True):
    """A running request: only what changed since the previous step."""

    req_id: str
    new_block_ids: list[int]  # appended to the worker's block table for this request
    num_computed_tokens: int  # the scheduler's count before this step (the worker checks it)
    num_new_tokens: int


class TokenMask(msgspec.Struct, array_like=True):
    """The tokens one request may sample in this step (structured output, see structured_output.py).

    `allowed` packs one bit per token id, little-endian: token t is allowed iff bit t % 8 of byte
    t // 8 is set. Token ids past the last bit are not allowed.
    """

    req_id: str
    allowed: bytes


class StepPlan(msgspec.Struct, tag="plan", array_like=True):
    """One iteration: every token to compute, in batch order new_requests then cached_requests.

    A request is sampled at the end of the step iff num_computed_tokens + num_new_tokens equals
    its known token count (a partial prefill chunk samples nothing).
    """

    step_id: int
    new_requests: list[NewRequest]
    cached_requests: list[CachedRequest]
    finished_req_ids: list[str]  # finished, aborted or preempted: the worker drops their state
    # (device block, CPU swap block) pairs. The worker copies swap_out before swap_in and both
    # before the forward pass, so a block swapped out may be reused by this very step.
    swap_out: list[tuple[int, int]] = msgspec.field(default_factory=list)
    swap_in: list[tuple[int, int]] = msgspec.field(default_factory=list)
    # Only for the constrained requests that sample in this step; the others sample freely.
    token_masks: list[TokenMask] = msgspec.field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.new_requests) + sum(
            r.num_new_tokens for r in self.cached_requests
        )


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    reason: str = ""


class Reregister(msgspec.Struct, tag="reregister", array_like=True):
    """To a worker heartbeating at a scheduler that never saw its hello (the scheduler restarted):
    drop every request and send `WorkerHello` again."""

    reason: str = ""


class WorkerHello(msgspec.Struct, tag="hello", array_like=True):
    """A worker's registration: the scheduler sizes its block pool from this."""

    protocol_version: int
    rank: int
    world_size: int
    pid: int
    num_kv_blocks: int
    block_size: int
    model_fingerprint: str  # identifies weights + config; all ranks and the tokenizer must agree
    max_model_len: int
    vocab_size: int
    device: str  # e.g. "cpu", "cuda:0"
    dtype: str  # e.g. "float32", "bfloat16"
    num_swap_blocks: int = 0  # CPU swap space, in blocks (0: preemption is by recompute only)
    kv_bytes_per_block: int = 0  # one block across every layer, K and V
    swap_bytes_per_s: float = 0.0  # measured device -> CPU -> device copy rate, one direction
    kv_cache_dtype: str = ""  # the KV pool's element type, e.g. "float32", "int8" ("": not told)


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Log-probabilities of one sampled token and of the most likely alternatives (fp32, from
    the raw logits). Only these cross the socket, never a vocab-sized row."""

    sampled: float
    top_token_ids: list[int]  # most likely first
    top_logprobs: list[float]


class StepResult(msgspec.Struct, tag="result", array_like=True):
    """Sampled tokens of one step, parallel lists in batch order."""

    step_id: int
    rank: int
    req_ids: list[str]
    token_ids: list[int]
    execute_time_s: float  # worker time spent on this plan (input prep + forward + sampling)
    # Parallel to token_ids (None where a request asked for none); empty when no request did.
    logprobs: list[TokenLogprobs | None] = msgspec.field(default_factory=list)


class Heartbeat(msgspec.Struct, tag="heartbeat", array_like=True):
    rank: int
    pid: int


class WorkerError(msgspec.Struct, tag="error", array_like=True):
    """A worker could not execute a plan; it stays up but the step failed."""

    rank: int
    step_id: int
    message: str


SchedulerToWorker = StepPlan | Shutdown | Reregister
WorkerToScheduler = WorkerHello | StepResult | Heartbeat | WorkerError

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(SchedulerToWorker)
_to_scheduler = msgspec.msgpack.Decoder(WorkerToScheduler)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_for_worker(frame: bytes) -> StepPlan | Shutdown | Reregister:
    return _to_worker.decode(frame)


def decode_for_scheduler(frame: bytes) -> WorkerHello | StepResult | Heartbeat | WorkerError:
    return _to_scheduler.decode(frame)
