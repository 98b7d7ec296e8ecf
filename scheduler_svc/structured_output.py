"""Structured outputs: a JSON schema, regular expression or grammar that every generated token keeps.

llguidance (Rust; no torch, so it lives here in the scheduler, which owns each request's tokens)
compiles the constraint against the model's tokenizer while the request is validated, so a
malformed one is `INVALID_ARGUMENT` naming its field before the request is queued. Each running
constrained request has a matcher. When a plan is built, every constrained request that samples in
it gets the bitmask of the tokens its matcher allows, sent with the plan (`protocol.TokenMask`);
the worker sets the other logits to -inf before sampling, and the sampled token advances the
matcher. The engine runs one step at a time (a step is planned only once the previous one's tokens
are in, and a request whose last token is still pending is never scheduled), so the mask of step N
has seen every token sampled before it. A request finishes when its matcher is stopped: the output
is complete and only EOS could follow.

Cost is bounded twice: the constraint text by `MAX_CONSTRAINT_CHARS`, and compiling and every
step's mask by llguidance's parser limits (lexer fuel, Earley items, grammar size), which make a
constraint that would exceed them an error instead of a stall.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask, fill_next_token_bitmask_par

from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.proto_convert import InvalidArgument
from scheduler_svc.protocol import StepPlan, TokenMask
from scheduler_svc.request import Request
from scheduler_svc.tokenizer import ModelTokenizer

logger = logging.getLogger(__name__)

MAX_CONSTRAINT_CHARS = 64 * 1024
# JSON as writers print it (", " and ": "), with no other whitespace: a model free to add
# whitespace can emit it until max_tokens and never close the object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_MAX_ERROR_CHARS = 500
_ANY_OBJECT = {"type": "object"}


@dataclass(slots=True, frozen=True)
class Constraint:
    """A compiled constraint: a matcher in its start state, copied for each request using it."""

    field: str  # the request field it came from, e.g. "sampling.json_schema"
    start: llguidance.LLMatcher
    vocab_size: int  # bits in each of its masks

    def new_matcher(self) -> llguidance.LLMatcher:
        return self.start.deep_copy()


class GrammarCompiler:
    """Compiles the `structured` constraint of SamplingParams; safe to call from several threads.

    llguidance's view of the tokenizer takes ~0.3 s to build, so it is built on first use.
    """

    def __init__(self, tokenizer: ModelTokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        # Bits past the tokenizer's own ids (a model's padded vocabulary) are never allowed.
        self._vocab_size = max(vocab_size, tokenizer.vocab_size)
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def compile(self, sampling: pb.SamplingParams) -> Constraint | None:
        """The request's constraint, or None without one. Raises InvalidArgument naming the field."""
        kind = sampling.WhichOneof("structured")
        if kind is None or (kind == "json_object" and not sampling.json_object):
            return None
        field = f"sampling.{kind}"
        try:
            grammar = _grammar(kind, getattr(sampling, kind), field)
        except InvalidArgument:
            raise
        except ValueError as error:  # llguidance's own complaints (a GBNF it cannot convert, say)
            raise InvalidArgument(field, _short(str(error))) from None
        matcher = llguidance.LLMatcher(self.ll_tokenizer(), grammar, log_level=0, limits=self._limits)
        # The first mask also builds the lexer's first states, which may hit a limit too.
        first_mask = b"" if matcher.is_error() else matcher.compute_bitmask()
        if matcher.is_error():
            raise InvalidArgument(field, _short(matcher.get_error()))
        if _allowed_ids(first_mask) <= self._tokenizer.eos_token_ids:  # nothing to generate
            raise InvalidArgument(field, "matches only the empty output")
        return Constraint(field, matcher, self.ll_tokenizer().vocab_size)

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.tokenizer.to_str(), n_vocab=self._vocab_size,
                    eos_token=sorted(self._tokenizer.eos_token_ids),
                )
            return self._ll_tokenizer


def _grammar(kind: str, value: str | bool, field: str) -> str:
    """llguidance's grammar for one constraint; its validity is checked when a matcher is built."""
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=JSON_OPTIONS)
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_CONSTRAINT_CHARS:
        raise InvalidArgument(field, f"at most {MAX_CONSTRAINT_CHARS} characters, got {len(value)}")
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(_json_schema(value, field), defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    return llguidance.grammar_from("grammar", value)  # Lark as it is, GBNF converted to Lark


def _json_schema(text: str, field: str) -> dict:
    # Parsed here so that an error points into the client's text, not llguidance's wrapping of it.
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidArgument(field, f"not valid JSON: {error}") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidArgument(field, f"a JSON Schema is an object or a boolean, got {type(schema).__name__}")
    if schema is False:
        raise InvalidArgument(field, "the schema false matches no value")
    return {} if schema is True else schema  # true: any value, which llguidance takes as {}


def _allowed_ids(mask: bytes) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")).tolist())


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + "..."


class Progress(Enum):
    """Where a constrained output stands after its new tokens."""

    OPEN = "open"  # more tokens may follow
    COMPLETE = "complete"  # the constraint is satisfied and nothing but EOS could follow
    FAILED = "failed"  # the matcher broke (a limit hit mid-output, a forbidden token): see `error`


class StructuredOutputs:
    """The matchers of the unfinished constrained requests, keyed by req_id; the engine owns it.

    A matcher that fails (its per-step limits, a token its mask forbade, an exception from the
    library) fails its own request only: its row is left out of the masks, and `advance` reports
    FAILED with the reason, which the engine turns into that request's error.
    """

    def __init__(self) -> None:
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._errors: dict[str, str] = {}  # req_id -> why its matcher failed
        self._vocab_size = 0  # the widest mask so far (every constraint of a server has one width)
        self._executor: llguidance.LLExecutor | None = None  # threads, started on first use

    def __len__(self) -> int:
        return len(self._matchers)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._matchers

    def add(self, req_id: str, constraint: Constraint) -> None:
        self._matchers[req_id] = constraint.new_matcher()
        self._vocab_size = max(self._vocab_size, constraint.vocab_size)

    def remove(self, req_id: str) -> None:
        self._matchers.pop(req_id, None)
        self._errors.pop(req_id, None)

    def error(self, req_id: str) -> str:
        """Why the request's matcher failed ("" if it has not)."""
        return self._errors.get(req_id, "")

    def attach_masks(self, plan: StepPlan, requests: Mapping[str, Request]) -> None:
        """Set `plan.token_masks` for its constrained requests that sample in this step: those
        whose scheduled tokens, just planned, reach their last known token."""
        if not self._matchers:
            return
        req_ids = [r.req_id for r in plan.new_requests] + [r.req_id for r in plan.cached_requests]
        plan.token_masks = self.token_masks([
            req_id for req_id in req_ids
            if req_id in self._matchers and requests[req_id].num_computed_tokens == requests[req_id].num_tokens
        ])

    def token_masks(self, req_ids: list[str]) -> list[TokenMask]:
        """The tokens each request's matcher allows next, computed in parallel (GIL released).
        Failed matchers get no mask."""
        req_ids = [req_id for req_id in req_ids if req_id not in self._errors]
        if not req_ids:
            return []
        matchers = [self._matchers[req_id] for req_id in req_ids]
        bitmask = allocate_token_bitmask(len(req_ids), self._vocab_size)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        try:
            fill_next_token_bitmask_par(self._executor, [(m, row) for row, m in enumerate(matchers)], bitmask)
        except BaseException as error:  # a Rust panic arrives as a BaseException
            _reraise_control_flow(error)
            self._fill_one_by_one(req_ids, matchers, bitmask)
        words = np.ascontiguousarray(bitmask, dtype="<i4")  # little-endian: bit i is token i
        masks = []
        for row, (req_id, matcher) in enumerate(zip(req_ids, matchers)):
            if matcher.is_error():
                self._fail(req_id, matcher.get_error())
            elif req_id not in self._errors:
                masks.append(TokenMask(req_id, words[row].tobytes()))
        return masks

    def advance(self, req_id: str, token_ids: list[int]) -> Progress:
        """Feed a request's new tokens to its matcher (unconstrained requests are always OPEN)."""
        matcher = self._matchers.get(req_id)
        if matcher is None:
            return Progress.OPEN
        if req_id in self._errors:
            return Progress.FAILED
        if not token_ids:
            return Progress.OPEN
        try:
            consumed = matcher.consume_tokens(token_ids)
        except BaseException as error:
            _reraise_control_flow(error)
            self._fail(req_id, f"{type(error).__name__}: {error}")
            return Progress.FAILED
        if not consumed:
            self._fail(req_id, matcher.get_error() or "a sampled token breaks the constraint")
            return Progress.FAILED
        return Progress.COMPLETE if matcher.is_stopped() else Progress.OPEN

    def _fill_one_by_one(self, req_ids: list[str], matchers: list[llguidance.LLMatcher], bitmask: np.ndarray) -> None:
        for row, (req_id, matcher) in enumerate(zip(req_ids, matchers)):
            try:
                fill_next_token_bitmask(matcher, bitmask, row)
            except BaseException as error:
                _reraise_control_flow(error)
                self._fail(req_id, f"{type(error).__name__}: {error}")

    def _fail(self, req_id: str, reason: str) -> None:
        if req_id not in self._errors:
            self._errors[req_id] = _short(reason)
            logger.error("request %s: structured output failed: %s", req_id, self._errors[req_id])


def _reraise_control_flow(error: BaseException) -> None:
    """Let what is not an error (cancellation, exit, Ctrl-C) through; a library error or a Rust
    panic (pyo3's PanicException derives from BaseException) fails one request instead."""
    if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
        raise error
