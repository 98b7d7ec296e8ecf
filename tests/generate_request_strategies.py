"""Hypothesis strategies for `omnibus.v1.GenerateRequest`, for the fuzz tests (tests/test_fuzz_grpc.py).

Every field of the message is drawn, the ones this file does not name too (by their protobuf type,
from the descriptor), so a field added to the proto is fuzzed from the day it lands. Values mix the
ordinary (short unicode text, small numbers), the extreme (NaN, infinities, subnormals, integer
bounds) and the oversized (repeated fields and strings past the server's limits). What would make
a valid request expensive is kept small: `max_tokens` is always set, and to 1-3 unless it is a
value the server must refuse, and prompts that fit are short.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.config import DEFAULT_MAX_REQUEST_BYTES, RequestLimits

INT32 = (-(2**31), 2**31 - 1)
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
VOCAB_SIZE = 49_152  # the default model's; ids at or past it must be refused
LIMITS = RequestLimits()

# Text of every kind: control characters, combining marks, astral planes (no lone surrogates:
# protobuf strings are UTF-8 and the client could not encode them).
TEXT = st.text(max_size=40)
SHORT_TEXT = st.text(max_size=12)
FLOAT32_EDGES = st.sampled_from([0.0, -0.0, 1e-5, 1e-6, 1e-45, 1.0, 2.0, -2.0, 100.0, -100.0, 100.01, 3.4e38])


def floats32() -> st.SearchStrategy[float]:
    """Any float32: NaN, both infinities, subnormals, and the edges of the documented ranges."""
    return st.one_of(st.floats(width=32), FLOAT32_EDGES)


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Mostly small values near zero, then the type's bounds and anything between."""
    small = st.integers(max(low, -3), min(high, 8))
    return st.one_of(small, st.sampled_from(sorted({low, high, low + 1, high - 1})), st.integers(low, high))


def oversized(element: st.SearchStrategy, sizes: list[int]) -> st.SearchStrategy[list]:
    """One element repeated past a limit: cheap to draw, however long."""
    return st.builds(lambda value, size: [value] * size, element, st.sampled_from(sizes))


def some(element: st.SearchStrategy, max_size: int, past_limits: list[int]) -> st.SearchStrategy[list]:
    return st.one_of(st.lists(element, max_size=max_size), oversized(element, past_limits))


def long_text(sizes: list[int]) -> st.SearchStrategy[str]:
    return st.builds(lambda char, size: char * size, st.sampled_from("xé😀\x00"), st.sampled_from(sizes))


VALID_TOKEN_IDS = st.integers(0, VOCAB_SIZE - 1)
TOKEN_IDS = st.one_of(VALID_TOKEN_IDS, st.sampled_from([VOCAB_SIZE - 1, VOCAB_SIZE, UINT32_MAX]))
# Past each bound: the KV pool of the fuzz server (1024 tokens), the model's context, a big list.
PAST_PROMPT_LENGTHS = [1025, 8192, 200_000]
ROLES = st.sampled_from(["system", "user", "assistant"])
ASCII_ID = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


def chat(roles: st.SearchStrategy[str]) -> st.SearchStrategy[pb.ChatMessage]:
    return st.builds(lambda role, content: pb.ChatMessage(role=role, content=content), roles, TEXT)


@dataclass(frozen=True)
class FieldFuzz:
    """How to draw one field: `valid` values the server must serve, `hostile` ones it may refuse."""

    valid: st.SearchStrategy
    hostile: st.SearchStrategy


def float32(value: float) -> float:
    """The float32 nearest `value` (hypothesis wants bounds a float32 can hold)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def floats_between(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(float32(low), float32(high), width=32)


def bounded_floats(low: float, high: float) -> FieldFuzz:
    return FieldFuzz(floats_between(low, high), floats32())


# Fields whose values this file chooses, by full name; everything else is drawn by type.
NAMED: dict[str, FieldFuzz] = {
    "omnibus.v1.GenerateRequest.request_id": FieldFuzz(ASCII_ID, st.one_of(TEXT, long_text([257]))),
    "omnibus.v1.GenerateRequest.prompt": FieldFuzz(
        st.text(min_size=1, max_size=200),
        st.one_of(st.just(""), long_text([LIMITS.max_input_chars + 1, DEFAULT_MAX_REQUEST_BYTES + 1]))),
    "omnibus.v1.GenerateRequest.prompt_token_ids": FieldFuzz(
        st.lists(VALID_TOKEN_IDS, min_size=1, max_size=24), some(TOKEN_IDS, 24, PAST_PROMPT_LENGTHS)),
    "omnibus.v1.GenerateRequest.messages": FieldFuzz(
        st.lists(chat(ROLES), min_size=1, max_size=4),
        some(chat(st.one_of(ROLES, SHORT_TEXT)), 4, [LIMITS.max_chat_messages + 1])),
    "omnibus.v1.GenerateRequest.priority": FieldFuzz(st.integers(-100, 100), integers(*INT32)),
    "omnibus.v1.GenerateRequest.cache_salt": FieldFuzz(SHORT_TEXT, long_text([257])),
    "omnibus.v1.GenerateRequest.tenant": FieldFuzz(SHORT_TEXT, long_text([257])),
    "omnibus.v1.GenerateRequest.n": FieldFuzz(st.integers(1, 3), st.sampled_from([0, 1000, 2**31, UINT32_MAX])),
    "omnibus.v1.SamplingParams.max_tokens": FieldFuzz(
        st.integers(1, 3), st.sampled_from([0, 1024, 8192, 2**31, UINT32_MAX])),
    "omnibus.v1.SamplingParams.temperature": FieldFuzz(
        st.one_of(floats_between(0, 2), st.sampled_from([0.0, 1e-5, 1e-6])), floats32()),
    "omnibus.v1.SamplingParams.top_p": FieldFuzz(floats_between(1e-6, 1), floats32()),
    "omnibus.v1.SamplingParams.top_k": FieldFuzz(st.integers(0, VOCAB_SIZE + 1), integers(*INT32)),
    "omnibus.v1.SamplingParams.seed": FieldFuzz(integers(0, UINT64_MAX), integers(0, UINT64_MAX)),
    "omnibus.v1.SamplingParams.min_p": bounded_floats(0, 1),
    "omnibus.v1.SamplingParams.presence_penalty": bounded_floats(-2, 2),
    "omnibus.v1.SamplingParams.frequency_penalty": bounded_floats(-2, 2),
    "omnibus.v1.SamplingParams.repetition_penalty": bounded_floats(0.01, 10),
    "omnibus.v1.SamplingParams.logit_bias": FieldFuzz(
        st.dictionaries(VALID_TOKEN_IDS, floats_between(-100, 100), max_size=4),
        st.dictionaries(TOKEN_IDS, floats32(), max_size=4)),
    # At most the smallest max_tokens: more is refused, rightly.
    "omnibus.v1.SamplingParams.min_tokens": FieldFuzz(st.integers(0, 1), integers(0, UINT32_MAX)),
    "omnibus.v1.SamplingParams.logprobs": FieldFuzz(st.integers(0, 20), integers(0, UINT32_MAX)),
    "omnibus.v1.SamplingParams.stop": FieldFuzz(
        st.lists(SHORT_TEXT, max_size=4),
        st.one_of(oversized(SHORT_TEXT, [LIMITS.max_stop_strings + 1]),
                  st.lists(long_text([LIMITS.max_stop_string_chars + 1]), min_size=1, max_size=1))),
    "omnibus.v1.SamplingParams.stop_token_ids": FieldFuzz(
        st.lists(VALID_TOKEN_IDS, max_size=5), some(TOKEN_IDS, 5, [LIMITS.max_stop_token_ids + 1])),
    "omnibus.v1.SamplingParams.json_schema": FieldFuzz(
        st.sampled_from(['{"type": "integer"}', '{"type": "string", "maxLength": 3}', "{}", '{"type": "object"}']),
        st.one_of(TEXT, st.sampled_from(["[]", "{", '{"type": "no such type"}']))),
    "omnibus.v1.SamplingParams.regex": FieldFuzz(
        st.sampled_from(["[a-z]{1,3}", ".*", "(yes|no)", "[0-9]+"]), st.one_of(TEXT, st.sampled_from(["(", "a{99999}"]))),
    "omnibus.v1.SamplingParams.grammar": FieldFuzz(
        st.sampled_from(['start: "yes" | "no"']), st.one_of(TEXT, st.just("start:"))),
}
INPUTS = ("prompt", "prompt_token_ids", "messages")
MAX_TOKENS = "omnibus.v1.SamplingParams.max_tokens"


def _scalar(field: FieldDescriptor, hostile: bool) -> st.SearchStrategy:
    """A field of no named strategy, by type: small values, or anything of the type."""
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return _message(field.message_type, hostile)
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        known = st.sampled_from([v.number for v in field.enum_type.values])
        return st.one_of(known, integers(*INT32)) if hostile else known
    ranges = {
        FieldDescriptor.CPPTYPE_INT32: INT32, FieldDescriptor.CPPTYPE_UINT32: (0, UINT32_MAX),
        FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1), FieldDescriptor.CPPTYPE_UINT64: (0, UINT64_MAX),
    }
    if field.cpp_type in ranges:
        low, high = ranges[field.cpp_type]
        return integers(low, high) if hostile else st.integers(max(low, 0), 3)
    if field.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return floats32() if hostile else floats_between(0, 1)
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if field.cpp_type == FieldDescriptor.CPPTYPE_BYTES:
        return st.binary(max_size=40)
    return st.one_of(TEXT, long_text([257, 100_000])) if hostile else SHORT_TEXT


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _field(field: FieldDescriptor, hostile: bool) -> st.SearchStrategy:
    if field.full_name in NAMED:
        fuzz = NAMED[field.full_name]
        return fuzz.hostile if hostile else fuzz.valid
    if _is_map(field):
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key, hostile), _scalar(value, hostile), max_size=4)
    if field.is_repeated:
        return some(_scalar(field, True), 3, [10_000]) if hostile else st.lists(_scalar(field, False), max_size=3)
    return _scalar(field, hostile)


def _set(message, field: FieldDescriptor, value) -> None:
    if _is_map(field):
        target = getattr(message, field.name)
        for key, item in value.items():
            if field.message_type.fields_by_name["value"].cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        getattr(message, field.name).extend(value)
    elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _fill(draw, message, field: FieldDescriptor, hostile: bool) -> None:
    _set(message, field, draw(_field(field, hostile)))


def _message(descriptor: Descriptor, hostile: bool) -> st.SearchStrategy:
    """A message with some of its fields set: valid values, or (hostile) a valid or hostile one each."""

    @st.composite
    def build(draw):
        message = getattr(pb, descriptor.name)()
        for field in descriptor.fields:
            if field.full_name == MAX_TOKENS:
                _fill(draw, message, field, hostile and draw(st.booleans()))  # never the default of 256
            elif field.name not in INPUTS and draw(st.integers(0, 2)) == 0:
                # A oneof keeps the member set last, so several of one may be drawn.
                _fill(draw, message, field, hostile and draw(st.booleans()))
        return message

    return st.deferred(build)


@dataclass(frozen=True)
class FuzzedRequest:
    kind: str  # "valid" (the server must serve it), "one hostile field" or "anything"
    request: pb.GenerateRequest


@st.composite
def generate_requests(draw) -> FuzzedRequest:
    """A GenerateRequest of one of three kinds, equally often: all valid, one hostile field, or
    anything (several inputs or none included)."""
    kind = draw(st.sampled_from(["valid", "one hostile field", "anything"]))
    request = draw(_message(pb.GenerateRequest.DESCRIPTOR, hostile=kind == "anything"))
    if not request.HasField("sampling"):
        request.sampling.max_tokens = draw(NAMED[MAX_TOKENS].valid)
    inputs = [draw(st.sampled_from(INPUTS))]
    if kind == "anything":
        inputs = draw(st.lists(st.sampled_from(INPUTS), unique=True, max_size=3))
    for name in inputs:
        _fill(draw, request, pb.GenerateRequest.DESCRIPTOR.fields_by_name[name], kind == "anything" and draw(st.booleans()))
    if kind == "one hostile field":
        owner = draw(st.sampled_from([request, request.sampling]))
        names = [f.name for f in owner.DESCRIPTOR.fields if f.name not in INPUTS or f.name == inputs[0]]
        field = owner.DESCRIPTOR.fields_by_name[draw(st.sampled_from(names))]
        owner.ClearField(field.name)
        _fill(draw, owner, field, hostile=True)
    return FuzzedRequest(kind, request)
