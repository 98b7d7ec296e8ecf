"""Conversion between the public protobuf messages and the scheduler's dataclasses.

Parsing validates every field a client controls and raises `InvalidArgument` naming the field, so
the server can answer `INVALID_ARGUMENT` with a message a user can act on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.config import RequestLimits
from scheduler_svc.protocol import TokenLogprobs
from scheduler_svc.request import RequestStatus, SamplingParams
from scheduler_svc.tokenizer import ChatTurn, ModelTokenizer

DEFAULT_MAX_TOKENS = 256


class InvalidArgument(ValueError):
    """A client error in one named field of the request."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(slots=True, frozen=True)
class ModelLimits:
    """What a request is checked against: the model's and the KV pool's sizes, and the bounds."""

    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int  # tokens the whole KV pool holds; one request may not need more
    request: RequestLimits = RequestLimits()


MAX_CACHE_SALT_LENGTH = 256
MAX_PARALLEL_SAMPLES = 64  # GenerateRequest.n
MAX_LOGPROBS = 20  # top alternatives per token, OpenAI's bound
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's bound
MAX_ABS_OPENAI_PENALTY = 2.0  # presence and frequency penalties, OpenAI's bound
MAX_TENANT_LENGTH = 256  # tenants are also kept in the fair-share table while active


@dataclass(slots=True)
class ParsedRequest:
    client_request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0
    cache_salt: str = ""
    tenant: str = ""  # "" is the shared default tenant
    n: int = 1  # independent samples of the prompt


@dataclass(slots=True, frozen=True)
class TokenUsage:
    """Token counts reported with a finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


def parse_generate_request(
    request: pb.GenerateRequest, tokenizer: ModelTokenizer, limits: ModelLimits
) -> ParsedRequest:
    """Validate a GenerateRequest and tokenize its input (slow for long inputs: call it off the
    event loop). Sizes are checked first, so an oversized request costs nothing to refuse."""
    check_generate_request(request, limits)
    prompt_token_ids = _prompt_token_ids(request, tokenizer, limits)
    sampling = _sampling_params(request.sampling, len(prompt_token_ids), limits)
    return ParsedRequest(
        request.request_id, prompt_token_ids, sampling, request.priority, request.cache_salt, request.tenant,
        n=request.n or 1,
    )


def check_generate_request(request: pb.GenerateRequest, limits: ModelLimits) -> None:
    """The checks of a GenerateRequest that need no tokenizing: they read lengths, so their cost is
    bounded by the limits, never by the size of the request."""
    bounds = limits.request
    input_field = _input_field(request)
    if input_field == "prompt":
        _check_chars("prompt", len(request.prompt), bounds)
    elif input_field == "messages":
        _check_messages(request.messages, bounds)
    elif len(request.prompt_token_ids) >= limits.max_model_len:
        raise _no_room("prompt_token_ids", len(request.prompt_token_ids), limits)
    _check_stop_lists(request.sampling, bounds)
    if abs(request.priority) > bounds.max_abs_priority:
        raise InvalidArgument(
            "priority", f"must be in [-{bounds.max_abs_priority}, {bounds.max_abs_priority}], got {request.priority}"
        )
    if len(request.cache_salt) > MAX_CACHE_SALT_LENGTH:
        raise InvalidArgument("cache_salt", f"at most {MAX_CACHE_SALT_LENGTH} characters, got {len(request.cache_salt)}")
    if len(request.tenant) > MAX_TENANT_LENGTH:
        raise InvalidArgument("tenant", f"at most {MAX_TENANT_LENGTH} characters, got {len(request.tenant)}")
    if request.n > MAX_PARALLEL_SAMPLES:
        raise InvalidArgument("n", f"must be in [1, {MAX_PARALLEL_SAMPLES}] (0 means 1), got {request.n}")
    if len(request.sampling.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidArgument("sampling.logit_bias",
                              f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(request.sampling.logit_bias)}")


def check_tokenize_request(request: pb.TokenizeRequest, bounds: RequestLimits) -> None:
    """A TokenizeRequest's input: exactly one of text and messages, within the size bounds."""
    has_text, has_messages = request.HasField("text"), len(request.messages) > 0
    if has_text == has_messages:
        raise InvalidArgument("text", "exactly one of text, messages is required")
    if has_text:
        _check_chars("text", len(request.text), bounds)
    else:
        _check_messages(request.messages, bounds)


def parse_chat_turns(messages) -> list[ChatTurn]:
    turns = []
    for index, message in enumerate(messages):
        if not message.role:
            raise InvalidArgument(f"messages[{index}].role", "must not be empty")
        turns.append(ChatTurn(message.role, message.content))
    return turns


def _input_field(request: pb.GenerateRequest) -> str:
    given = [name for name, present in (
        ("prompt", request.HasField("prompt")),
        ("prompt_token_ids", len(request.prompt_token_ids) > 0),
        ("messages", len(request.messages) > 0),
    ) if present]
    if len(given) != 1:
        detail = "none was given" if not given else f"got {' and '.join(given)}"
        raise InvalidArgument("prompt", f"exactly one of prompt, prompt_token_ids, messages is required ({detail})")
    return given[0]


def _check_chars(field: str, num_chars: int, bounds: RequestLimits) -> None:
    if num_chars > bounds.max_input_chars:
        raise InvalidArgument(field, f"at most {bounds.max_input_chars} characters, got {num_chars}")


def _check_messages(messages, bounds: RequestLimits) -> None:
    # The count first: summing the lengths walks the list.
    if len(messages) > bounds.max_chat_messages:
        raise InvalidArgument("messages", f"at most {bounds.max_chat_messages} messages, got {len(messages)}")
    num_chars = sum(len(m.role) + len(m.content) for m in messages)
    if num_chars > bounds.max_input_chars:
        raise InvalidArgument("messages", f"at most {bounds.max_input_chars} characters in all, got {num_chars}")


def _check_stop_lists(sampling: pb.SamplingParams, bounds: RequestLimits) -> None:
    # The engine builds its stop-string automaton from these on the event loop, once per request.
    num_stop, num_stop_ids = len(sampling.stop), len(sampling.stop_token_ids)
    if num_stop > bounds.max_stop_strings:
        raise InvalidArgument("sampling.stop", f"at most {bounds.max_stop_strings} stop strings, got {num_stop}")
    for index, stop in enumerate(sampling.stop):
        if len(stop) > bounds.max_stop_string_chars:
            raise InvalidArgument(f"sampling.stop[{index}]",
                                  f"at most {bounds.max_stop_string_chars} characters, got {len(stop)}")
    if num_stop_ids > bounds.max_stop_token_ids:
        raise InvalidArgument("sampling.stop_token_ids", f"at most {bounds.max_stop_token_ids} token ids, got {num_stop_ids}")


def _no_room(field: str, num_tokens: int, limits: ModelLimits) -> InvalidArgument:
    return InvalidArgument(
        field, f"{num_tokens} prompt tokens leave no room in the model's context of {limits.max_model_len}"
    )


def _prompt_token_ids(
    request: pb.GenerateRequest, tokenizer: ModelTokenizer, limits: ModelLimits
) -> list[int]:
    field = _input_field(request)
    if field == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        token_ids = tokenizer.encode(request.prompt)
    elif field == "messages":
        try:
            token_ids = tokenizer.encode_chat(parse_chat_turns(request.messages))
        except ValueError as error:
            if isinstance(error, InvalidArgument):
                raise
            raise InvalidArgument("messages", str(error)) from None
    else:
        token_ids = list(request.prompt_token_ids)
        bad = next((t for t in token_ids if t >= limits.vocab_size), None)
        if bad is not None:
            raise InvalidArgument("prompt_token_ids", f"token id {bad} is not below the vocabulary size {limits.vocab_size}")
    if not token_ids:
        raise InvalidArgument(field, "encodes to no tokens")
    if len(token_ids) >= limits.max_model_len:
        raise _no_room(field, len(token_ids), limits)
    return token_ids


def _sampling_params(sampling: pb.SamplingParams, num_prompt_tokens: int, limits: ModelLimits) -> SamplingParams:
    room = min(limits.max_model_len, limits.kv_capacity_tokens) - num_prompt_tokens
    if sampling.HasField("max_tokens"):
        max_tokens = sampling.max_tokens
        if max_tokens == 0:
            raise InvalidArgument("sampling.max_tokens", "must be at least 1")
        if num_prompt_tokens + max_tokens > limits.max_model_len:
            raise InvalidArgument(
                "sampling.max_tokens",
                f"{num_prompt_tokens} prompt tokens + {max_tokens} new tokens exceed the model's context of {limits.max_model_len}",
            )
        if num_prompt_tokens + max_tokens > limits.kv_capacity_tokens:
            raise InvalidArgument(
                "sampling.max_tokens",
                f"{num_prompt_tokens} prompt tokens + {max_tokens} new tokens exceed the KV cache's capacity of {limits.kv_capacity_tokens} tokens",
            )
    else:
        if room < 1:
            raise InvalidArgument("prompt", f"{num_prompt_tokens} prompt tokens exceed the KV cache's capacity of {limits.kv_capacity_tokens} tokens")
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    temperature = sampling.temperature if sampling.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument("sampling.temperature", f"must be a finite number >= 0, got {temperature}")
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = sampling.top_k if sampling.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0 (0 = no limit), got {top_k}")
    bad_stop = next((t for t in sampling.stop_token_ids if t >= limits.vocab_size), None)
    if bad_stop is not None:
        raise InvalidArgument("sampling.stop_token_ids", f"token id {bad_stop} is not below the vocabulary size {limits.vocab_size}")
    min_tokens = sampling.min_tokens if sampling.HasField("min_tokens") else 0
    if min_tokens > max_tokens:
        raise InvalidArgument("sampling.min_tokens", f"must not exceed max_tokens ({max_tokens}), got {min_tokens}")
    logprobs = sampling.logprobs if sampling.HasField("logprobs") else None
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise InvalidArgument("sampling.logprobs", f"must be in [0, {MAX_LOGPROBS}], got {logprobs}")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=[s for s in sampling.stop if s],
        # A set: the scheduler checks every sampled token against it.
        stop_token_ids=frozenset(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        min_p=_bounded(sampling, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=_bounded(sampling, "presence_penalty", 0.0, -MAX_ABS_OPENAI_PENALTY, MAX_ABS_OPENAI_PENALTY),
        frequency_penalty=_bounded(sampling, "frequency_penalty", 0.0, -MAX_ABS_OPENAI_PENALTY, MAX_ABS_OPENAI_PENALTY),
        repetition_penalty=_repetition_penalty(sampling),
        logit_bias=_logit_bias(sampling, limits.vocab_size),
        min_tokens=min_tokens,
        logprobs=logprobs,
    )


def _bounded(sampling: pb.SamplingParams, name: str, default: float, low: float, high: float) -> float:
    """An optional float field, checked to be finite and in [low, high]."""
    if not sampling.HasField(name):
        return default
    value = getattr(sampling, name)
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(f"sampling.{name}", f"must be in [{low:g}, {high:g}], got {value}")
    return value


def _repetition_penalty(sampling: pb.SamplingParams) -> float:
    if not sampling.HasField("repetition_penalty"):
        return 1.0
    value = sampling.repetition_penalty
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument("sampling.repetition_penalty", f"must be a finite number > 0 (1 = off), got {value}")
    return value


def _logit_bias(sampling: pb.SamplingParams, vocab_size: int) -> dict[int, float]:
    for token_id, bias in sampling.logit_bias.items():
        if token_id >= vocab_size:
            raise InvalidArgument("sampling.logit_bias",
                                  f"token id {token_id} is not below the vocabulary size {vocab_size}")
        if not (math.isfinite(bias) and abs(bias) <= MAX_ABS_LOGIT_BIAS):
            raise InvalidArgument("sampling.logit_bias", f"bias of token {token_id} must be in "
                                                         f"[-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}], got {bias}")
    return dict(sampling.logit_bias)


def finish_reason(status: RequestStatus | None) -> int:
    if status == RequestStatus.FINISHED_STOPPED:
        return pb.FINISH_REASON_STOP
    if status == RequestStatus.FINISHED_LENGTH:
        return pb.FINISH_REASON_LENGTH
    return pb.FINISH_REASON_UNSPECIFIED


def generate_response(
    request_id: str,
    token_ids: list[int],
    text: str,
    status: RequestStatus | None,
    usage: TokenUsage | None,
    index: int = 0,
    logprobs: list[TokenLogprobs] | None = None,
    token_text: Callable[[int], str] = str,
) -> pb.GenerateResponse:
    """One stream message; `token_text` names a token in its logprobs (the tokenizer's decoding)."""
    response = pb.GenerateResponse(
        request_id=request_id, token_ids=token_ids, text=text, finish_reason=finish_reason(status), index=index
    )
    for token_id, token_logprobs in zip(token_ids, logprobs or ()):
        entry = response.logprobs.add()
        entry.sampled.token_id, entry.sampled.logprob = token_id, token_logprobs.sampled
        entry.sampled.token = token_text(token_id)
        for top_id, top_logprob in zip(token_logprobs.top_token_ids, token_logprobs.top_logprobs):
            entry.top.add(token_id=top_id, logprob=top_logprob, token=token_text(top_id))
    if usage is not None:
        response.usage.prompt_tokens = usage.prompt_tokens
        response.usage.completion_tokens = usage.completion_tokens
        response.usage.cached_prompt_tokens = usage.cached_prompt_tokens
    return response
