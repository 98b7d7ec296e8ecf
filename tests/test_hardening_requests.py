"""Issue 13, request side: bounds checked before tokenizing (1, 2, 6), stop strings matched in time
independent of their number (1), Tokenize counting as Generate does (9), and a character cut at
the end emitted as U+FFFD (10). No model: a tiny byte-level tokenizer (tests/hardening_support.py)."""

from __future__ import annotations

import random

import pytest

from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.config import RequestLimits
from scheduler_svc.detokenizer import IncrementalDetokenizer, StopStringMatcher
from scheduler_svc.proto_convert import InvalidArgument, ModelLimits, parse_generate_request
from scheduler_svc.server import GenerationService
from scheduler_svc.tokenizer import ModelTokenizer
from tests.hardening_support import BOS, tiny_tokenizer, write_tiny_model_dir

LIMITS = ModelLimits(vocab_size=1058, max_model_len=4096, kv_capacity_tokens=8192)
BOUNDS = RequestLimits()


class NoTokenizing:
    """A tokenizer that fails the test if asked to do any work."""

    def encode(self, *args, **kwargs):
        raise AssertionError("tokenized a request that its size alone rules out")

    encode_chat = render_chat = encode


def rejection(request: pb.GenerateRequest, tokenizer=None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as error:
        parse_generate_request(request, tokenizer or NoTokenizing(), LIMITS)
    return error.value


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> ModelTokenizer:
    return ModelTokenizer(write_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


# 1: stop lists are bounded, by count and by length, with the field named.

def test_too_many_stop_strings_are_refused_naming_the_field():
    request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=[f"s{i}" for i in range(17)]))
    assert str(rejection(request)) == "sampling.stop: at most 16 stop strings, got 17"


def test_a_stop_string_too_long_is_refused_naming_it():
    stop = ["ok", "x" * (BOUNDS.max_stop_string_chars + 1)]
    error = rejection(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=stop)))
    assert str(error).startswith("sampling.stop[1]: at most 256 characters")


def test_too_many_stop_token_ids_are_refused_naming_the_field():
    sampling = pb.SamplingParams(stop_token_ids=range(BOUNDS.max_stop_token_ids + 1))
    assert str(rejection(pb.GenerateRequest(prompt="hi", sampling=sampling))).startswith("sampling.stop_token_ids:")


def test_stop_lists_at_the_bounds_are_accepted(tokenizer):
    sampling = pb.SamplingParams(stop=["y" * 256] * 16, stop_token_ids=range(256), max_tokens=4)
    parsed = parse_generate_request(pb.GenerateRequest(prompt="hi", sampling=sampling), tokenizer, LIMITS)
    assert len(parsed.sampling_params.stop) == 16
    assert 255 in parsed.sampling_params.stop_token_ids and len(parsed.sampling_params.stop_token_ids) == 256


# 2: sizes are checked before any tokenizing or chat rendering.

@pytest.mark.parametrize("request_, field", [
    (pb.GenerateRequest(prompt="x" * (BOUNDS.max_input_chars + 1)), "prompt"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")] * (BOUNDS.max_chat_messages + 1)),
     "messages"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x" * BOUNDS.max_input_chars)]), "messages"),
    (pb.GenerateRequest(prompt_token_ids=[7] * LIMITS.max_model_len), "prompt_token_ids"),
], ids=["long prompt", "many messages", "long messages", "many prompt ids"])
def test_oversized_input_is_refused_before_tokenizing(request_, field):
    assert rejection(request_).field == field


def test_input_at_the_bound_is_tokenized(tokenizer):
    limits = ModelLimits(1058, max_model_len=1 << 20, kv_capacity_tokens=1 << 21)
    parsed = parse_generate_request(pb.GenerateRequest(prompt="ab" * (BOUNDS.max_input_chars // 2)), tokenizer, limits)
    assert len(parsed.prompt_token_ids) == BOUNDS.max_input_chars // 2  # "ab" is one merged token


async def test_tokenize_input_is_capped(tmp_path):
    service = GenerationService(ModelTokenizer(write_tiny_model_dir(tmp_path)), "tiny")
    try:
        with pytest.raises(AbortCalled) as error:
            await service.Tokenize(pb.TokenizeRequest(text="x" * (BOUNDS.max_input_chars + 1)), AbortingContext())
        assert error.value.details.startswith("text: at most")
        with pytest.raises(AbortCalled) as error:
            many = [pb.ChatMessage(role="user", content="x")] * (BOUNDS.max_chat_messages + 1)
            await service.Tokenize(pb.TokenizeRequest(messages=many), AbortingContext())
        assert error.value.details.startswith("messages: at most")
    finally:
        service.close()


# 6: priorities are bounded so that aging keeps every wait finite.

@pytest.mark.parametrize("priority", [-(2**31), 2**31 - 1, -101, 101])
def test_priority_outside_the_bound_is_refused(priority):
    error = rejection(pb.GenerateRequest(prompt="hi", priority=priority))
    assert str(error) == f"priority: must be in [-100, 100], got {priority}"


@pytest.mark.parametrize("priority", [-100, 0, 100])
def test_priority_inside_the_bound_is_kept(tokenizer, priority):
    parsed = parse_generate_request(pb.GenerateRequest(prompt="hi", priority=priority), tokenizer, LIMITS)
    assert parsed.priority == priority


def test_bounds_are_checked_at_construction():
    with pytest.raises(ValueError, match="max_stop_strings"):
        RequestLimits(max_stop_strings=0)
    with pytest.raises(ValueError, match="max_abs_priority"):
        RequestLimits(max_abs_priority=-1)


# 1: the automaton finds what a naive scan finds, for any number of stop strings.

def naive_first_stop(text: str, stop: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def naive_partial(text: str, stop: list[str]) -> int:
    return max((n for n in range(1, len(text) + 1) if any(s.startswith(text[-n:]) and s != text[-n:] for s in stop)),
               default=0)


def test_stop_matcher_agrees_with_a_naive_scan():
    rng = random.Random(1313)
    for _ in range(3000):
        stop = ["".join(rng.choices("abc", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 6))]
        text = "".join(rng.choices("abcd", k=rng.randint(0, 24)))
        matcher, fed, found = StopStringMatcher(stop), "", None
        while len(fed) < len(text) and found is None:
            piece = text[len(fed):len(fed) + rng.randint(1, 4)]
            start = matcher.feed(piece)
            found = None if start is None else len(fed) + start
            fed += piece
        assert found == naive_first_stop(fed, stop), (stop, fed)
        if found is None:
            assert matcher.partial_len == naive_partial(fed, stop), (stop, fed)


def test_streamed_stop_strings_match_the_naive_truncation(tokenizer):
    rng = random.Random(7)
    words = ["ab", "cd", " e", "日本", "é", "x"]
    for _ in range(300):
        text = "".join(rng.choices(words, k=rng.randint(1, 12)))
        stop = ["".join(rng.choices(words, k=rng.randint(1, 2))) for _ in range(rng.randint(1, 4))]
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer.tokenizer, [], stop)
        pieces, stopped = [], False
        for token_id in ids:
            chunk = detok.add_tokens([token_id])
            pieces.append(chunk.text)
            if chunk.stopped:
                stopped = True
                break
        if not stopped:
            pieces.append(detok.flush())
        cut = naive_first_stop(text, stop)
        assert "".join(pieces) == (text if cut is None else text[:cut]), (text, stop)
        assert stopped == (cut is not None)


# 9: Tokenize defaults to Generate's special tokens (a tokenizer that adds BOS).

async def test_tokenize_counts_the_bos_that_generate_adds(tmp_path):
    text = "hello world"
    reference = tiny_tokenizer(add_bos=True)  # Hugging Face tokenizers, not our code
    expected = reference.encode(text).ids
    assert expected[0] == reference.token_to_id(BOS)
    service = GenerationService(ModelTokenizer(write_tiny_model_dir(tmp_path, add_bos=True)), "tiny")
    try:
        tokenized = await service.Tokenize(pb.TokenizeRequest(text=text), None)
        generated = parse_generate_request(pb.GenerateRequest(prompt=text), service.tokenizer, LIMITS)
        assert list(tokenized.token_ids) == generated.prompt_token_ids == expected
        assert tokenized.count == len(expected)
        plain = await service.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=False), None)
        assert list(plain.token_ids) == expected[1:]
    finally:
        service.close()


# 10: a character cut at the end is emitted as U+FFFD, as Hugging Face's decode does.

@pytest.mark.parametrize("stop", [[], ["zz"]], ids=["no stop strings", "with stop strings"])
def test_flush_emits_a_cut_character_as_replacement(tokenizer, stop):
    ids = tokenizer.encode("ab日本", add_special_tokens=False)[:-1]  # 本 loses its last byte
    expected = tokenizer.tokenizer.decode(ids)
    assert expected.endswith("\ufffd")
    detok = IncrementalDetokenizer(tokenizer.tokenizer, tokenizer.encode("say:"), stop)
    pieces = [detok.add_tokens([token_id]).text for token_id in ids]
    assert all("\ufffd" not in piece for piece in pieces), pieces
    assert "".join(pieces) + detok.flush() == expected


def test_flush_of_whole_characters_adds_nothing(tokenizer):
    ids = tokenizer.encode("ab日本", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer.tokenizer, [], [])
    text = "".join(detok.add_tokens([token_id]).text for token_id in ids)
    assert (text, detok.flush()) == ("ab日本", "")


class AbortCalled(Exception):
    def __init__(self, code, details):
        super().__init__(details)
        self.code, self.details = code, details


class AbortingContext:
    """The part of a grpc.aio context that Tokenize uses: abort raises, as grpc's does."""

    async def abort(self, code, details):
        raise AbortCalled(code, details)
