"""GenerateRequest.n without a model: per-sample seeds, the split, merging the streams, and the
new fields' way through proto_convert and the scheduler<->worker protocol."""

from __future__ import annotations

import asyncio

import pytest

from omnibus.v1 import generation_pb2 as pb
from scheduler_svc import protocol
from scheduler_svc.engine import EngineError, ErrorKind, RequestStream, StreamEvent
from scheduler_svc.parallel_samples import merged_events, sample_seed, split_samples
from scheduler_svc.proto_convert import InvalidArgument, ModelLimits, ParsedRequest, _sampling_params, generate_response
from scheduler_svc.protocol import NewRequest, SamplingOptions, StepPlan, StepResult, TokenLogprobs
from scheduler_svc.request import RequestStatus, SamplingParams

LIMITS = ModelLimits(vocab_size=100, max_model_len=64, kv_capacity_tokens=1024)


def test_sample_seeds_are_distinct_and_sample_zero_keeps_the_seed():
    assert sample_seed(1234, 0) == 1234
    seeds = {sample_seed(seed, index) for seed in range(50) for index in range(1, 50)}
    assert len(seeds) == 49 * 50  # no two (seed, index) pairs collide
    assert all(0 <= s < 2**64 for s in seeds)
    assert sample_seed(5, 1) != sample_seed(6, 0)  # not seed + index


def test_split_gives_each_sample_its_seed_and_nothing_else_changes():
    parsed = ParsedRequest("r", [1, 2, 3], SamplingParams(max_tokens=4, temperature=1.0, seed=9), priority=2,
                           cache_salt="s", n=3)
    samples = split_samples(parsed)
    assert [s.sampling_params.seed for s in samples] == [9, sample_seed(9, 1), sample_seed(9, 2)]
    assert all(s.n == 1 and s.prompt_token_ids == [1, 2, 3] and (s.priority, s.cache_salt) == (2, "s")
               for s in samples)
    unseeded = split_samples(ParsedRequest("r", [1], SamplingParams(max_tokens=1), n=2))
    assert [s.sampling_params.seed for s in unseeded] == [None, None]
    one = ParsedRequest("r", [1], SamplingParams(max_tokens=1))
    assert split_samples(one) == [one]


def _stream(name: str) -> RequestStream:
    return RequestStream(name, name, 1, 0, detokenizer=None)


def test_merged_events_interleave_until_every_sample_finished():
    async def run():
        streams = [_stream("a"), _stream("b")]
        streams[1].push(StreamEvent([5], "x"))
        streams[0].push(StreamEvent([6], "y", RequestStatus.FINISHED_LENGTH))
        streams[1].push(StreamEvent([7], "z", RequestStatus.FINISHED_STOPPED))
        return [(i, e.token_ids) async for i, e in merged_events(streams)]

    got = asyncio.run(run())
    assert sorted(got) == [(0, [6]), (1, [5]), (1, [7])]
    assert [t for i, t in got if i == 1] == [[5], [7]]  # in order within a sample


def test_an_error_on_one_sample_ends_the_merge():
    async def run():
        streams = [_stream("a"), _stream("b")]
        streams[0].push(StreamEvent([1], "t"))
        streams[1].push(EngineError(ErrorKind.INTERNAL, "boom"))
        return [(i, e) async for i, e in merged_events(streams)]

    with pytest.raises(EngineError, match="boom"):
        asyncio.run(run())


@pytest.mark.parametrize("fields, name", [
    ({"min_p": -0.1}, "sampling.min_p"),
    ({"min_p": float("nan")}, "sampling.min_p"),
    ({"presence_penalty": 2.01}, "sampling.presence_penalty"),
    ({"frequency_penalty": float("inf")}, "sampling.frequency_penalty"),
    ({"repetition_penalty": -1.0}, "sampling.repetition_penalty"),
    ({"logit_bias": {100: 1.0}}, "sampling.logit_bias"),  # not below the vocabulary size
    ({"logit_bias": {3: float("nan")}}, "sampling.logit_bias"),
    ({"min_tokens": 5}, "sampling.min_tokens"),  # more than max_tokens
    ({"logprobs": 21}, "sampling.logprobs"),
])
def test_bad_sampling_values_name_their_field(fields, name):
    with pytest.raises(InvalidArgument) as caught:
        _sampling_params(pb.SamplingParams(max_tokens=4, **fields), 3, LIMITS)
    assert caught.value.field == name


def test_sampling_values_reach_the_options_the_worker_gets():
    sampling = pb.SamplingParams(max_tokens=8, min_p=0.1, presence_penalty=-0.5, frequency_penalty=1.5,
                                 repetition_penalty=1.3, logit_bias={7: -2.0, 3: 4.0}, min_tokens=2, logprobs=0,
                                 stop_token_ids=[9])
    params = _sampling_params(sampling, 3, LIMITS)
    options = params.to_options(eos_token_ids=frozenset({2}))
    assert options.min_p == pytest.approx(0.1) and options.presence_penalty == -0.5
    assert (options.frequency_penalty, options.repetition_penalty) == (1.5, pytest.approx(1.3))
    assert options.logit_bias == ((3, 4.0), (7, -2.0))
    assert (options.min_tokens, options.min_tokens_stop_ids, options.logprobs) == (2, (2, 9), 0)
    ignoring_eos = _sampling_params(pb.SamplingParams(max_tokens=8, min_tokens=2, ignore_eos=True), 3, LIMITS)
    assert ignoring_eos.to_options(frozenset({2})).min_tokens_stop_ids == ()
    plain = _sampling_params(pb.SamplingParams(max_tokens=8), 3, LIMITS).to_options(frozenset({2}))
    assert plain == SamplingOptions()  # the defaults: nothing on


def test_the_new_fields_cross_the_socket():
    options = SamplingOptions(0.7, 0.9, 40, 123, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.25,
                              repetition_penalty=1.2, logit_bias=((3, 1.5),), min_tokens=4,
                              min_tokens_stop_ids=(2, 9), logprobs=5)
    plan = StepPlan(1, [NewRequest("a", [1, 2, 3, 4], [0], 0, 4, options, num_prompt_tokens=3)], [], [])
    assert protocol.decode_for_worker(protocol.encode(plan)) == plan
    result = StepResult(1, 0, ["a", "b"], [5, 6], 0.01, logprobs=[TokenLogprobs(-0.5, [5, 8], [-0.5, -1.0]), None])
    assert protocol.decode_for_scheduler(protocol.encode(result)) == result


def test_generate_response_carries_index_and_named_logprobs():
    entry = TokenLogprobs(-0.25, [5, 8], [-0.25, -1.5])
    response = generate_response("r", [5], "x", None, None, index=2, logprobs=[entry], token_text=lambda t: f"<{t}>")
    assert response.index == 2
    [lp] = response.logprobs
    assert (lp.sampled.token_id, lp.sampled.logprob, lp.sampled.token) == (5, -0.25, "<5>")
    assert [(t.token_id, t.logprob, t.token) for t in lp.top] == [(5, -0.25, "<5>"), (8, -1.5, "<8>")]
    assert len(generate_response("r", [5], "x", None, None).logprobs) == 0
