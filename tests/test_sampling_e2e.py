"""Logprobs, penalties, logit bias and n on the real default model, through gRPC and the official
`openai` client, against transformers: its fp32 log_softmax, and generate(repetition_penalty)."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.tokenizer import ChatTurn, ModelTokenizer
from tests.gateway_harness import MODEL
from tests.server_harness import collect_tokens, greedy_request

# One torch thread for transformers here: spinning OpenMP workers beside the worker process make
# every op cost a time slice on a small shared machine.
pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_torch_thread")]

LOGPROB_TOLERANCE = 1e-3
NEAR_TIE = 1e-3
NUM_TOP = 5
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers."]


@pytest.fixture(name="server")
def _server(shared_server):
    return shared_server


@pytest.fixture(name="client")
def _client(shared_openai_client):
    return shared_openai_client


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    tokenizer = ModelTokenizer(model_dir)
    return [tokenizer.encode_chat([ChatTurn("user", q)]) for q in QUESTIONS]


def reference_logprobs(hf_model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """fp32 log_softmax of transformers' logits for each generated token's step: [len(generated), V]."""
    with torch.inference_mode():
        logits = hf_model(torch.tensor([prompt + generated])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)].log_softmax(-1)


def assert_logprobs_match(reference: torch.Tensor, generated: list[int], sampled: list[float],
                          top: list[list[tuple[int, float]]], label: str) -> None:
    assert len(sampled) == len(top) == len(generated), label
    for step, token in enumerate(generated):
        want = float(reference[step, token])
        assert abs(sampled[step] - want) < LOGPROB_TOLERANCE, f"{label} step {step}: {sampled[step]} vs {want}"
        values, _ = reference[step].topk(NUM_TOP)
        assert len(top[step]) == NUM_TOP, label
        for rank, (top_id, top_logprob) in enumerate(top[step]):
            # Each alternative's own reference logprob, and the reference's value at that rank
            # (so a near-tie may swap two ids, never skip a token).
            assert abs(top_logprob - float(reference[step, top_id])) < LOGPROB_TOLERANCE, label
            assert abs(top_logprob - float(values[rank])) < LOGPROB_TOLERANCE, label
        # Greedy: the sampled token is the top one.
        assert abs(top[step][0][1] - sampled[step]) < LOGPROB_TOLERANCE, label


def test_greedy_logprobs_over_grpc_equal_transformers_log_softmax(server, hf_default_model, prompts):
    stub = server.stub()
    for index, prompt in enumerate(prompts):
        responses = list(stub.Generate(greedy_request(prompt, max_tokens=6, logprobs=NUM_TOP), timeout=300))
        generated = [t for r in responses for t in r.token_ids]
        entries = [e for r in responses for e in r.logprobs]
        assert [e.sampled.token_id for e in entries] == generated
        assert all(e.sampled.token for e in entries)
        assert_logprobs_match(reference_logprobs(hf_default_model, prompt, generated), generated,
                              [e.sampled.logprob for e in entries],
                              [[(t.token_id, t.logprob) for t in e.top] for e in entries], f"prompt {index}")


def test_no_logprobs_unless_asked(server, prompts):
    responses = list(server.stub().Generate(greedy_request(prompts[0], max_tokens=3), timeout=300))
    assert all(len(r.logprobs) == 0 for r in responses)


def test_logprobs_through_the_openai_client(client, hf_default_model, prompts):
    prompt = prompts[1]
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=NUM_TOP,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
    [choice] = completion.choices
    generated = choice.token_ids
    reference = reference_logprobs(hf_default_model, prompt, generated)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.text_offset) == len(generated)
    assert "".join(lp.tokens) == choice.text
    sampled = lp.token_logprobs
    # A completions top_logprobs dict is keyed by text; check values against the reference's top values.
    for step, alternatives in enumerate(lp.top_logprobs):
        values = sorted(alternatives.values(), reverse=True)[:NUM_TOP]
        torch.testing.assert_close(torch.tensor(values), reference[step].topk(NUM_TOP).values,
                                   atol=LOGPROB_TOLERANCE, rtol=0)
        assert abs(sampled[step] - float(reference[step, generated[step]])) < LOGPROB_TOLERANCE

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=NUM_TOP, extra_body={"ignore_eos": True, "return_token_ids": True})
    [choice] = chat.choices
    generated = choice.token_ids
    reference = reference_logprobs(hf_default_model, prompts[0], generated)
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for step, token in enumerate(content):
        assert abs(token.logprob - float(reference[step, generated[step]])) < LOGPROB_TOLERANCE
        assert token.bytes == list(token.token.encode("utf-8"))
        torch.testing.assert_close(torch.tensor([t.logprob for t in token.top_logprobs]),
                                   reference[step].topk(NUM_TOP).values, atol=LOGPROB_TOLERANCE, rtol=0)

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=NUM_TOP, stream=True, extra_body={"ignore_eos": True})
    streamed = [t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_greedy_repetition_penalty_equals_transformers_generate(server, model_dir, hf_default_model, prompts):
    from transformers import GenerationConfig

    num_new = 16
    config = GenerationConfig(max_new_tokens=num_new, do_sample=False, repetition_penalty=1.3, eos_token_id=None,
                              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    stub = server.stub()
    for index, prompt in enumerate(prompts[:2]):
        input_ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf_default_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                            generation_config=config)
        expected = out.sequences[0, len(prompt):].tolist()
        top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values  # scores after the penalty
        gaps = (top2[:, 0] - top2[:, 1]).tolist()
        ours, _, _ = collect_tokens(stub, greedy_request(prompt, max_tokens=num_new, repetition_penalty=1.3))
        assert len(ours) == num_new
        for step, (got, want) in enumerate(zip(ours, expected)):
            if got != want:
                assert gaps[step] < NEAR_TIE, f"prompt {index} step {step}: {got} vs transformers' {want}"
                break
        if index == 0:
            plain, _, _ = collect_tokens(stub, greedy_request(prompt, max_tokens=num_new))
            assert plain != ours, "the penalty changed nothing: the test proves nothing"


def test_logit_bias_and_min_tokens_reach_the_sampler(server, prompts, model_dir):
    stub = server.stub()
    forced, _, _ = collect_tokens(stub, greedy_request(prompts[0], max_tokens=4, logit_bias={1234: 100.0}))
    assert forced == [1234] * 4
    eos = sorted(ModelTokenizer(model_dir).eos_token_ids)
    # EOS made the certain choice, then held back for 5 tokens by min_tokens.
    request = pb.GenerateRequest(prompt_token_ids=prompts[0], sampling=pb.SamplingParams(
        max_tokens=10, min_tokens=5, logit_bias={eos[0]: 100.0}))
    tokens, _, last = collect_tokens(stub, request)
    assert len(tokens) == 6 and tokens[-1] == eos[0] and eos[0] not in tokens[:5]
    assert last.finish_reason == pb.FINISH_REASON_STOP


def test_min_tokens_holds_back_stop_strings(server, prompts, model_dir):
    """vLLM's rule: a stop string ending within the first min_tokens tokens does not end the output."""
    stub = server.stub()
    piece = ModelTokenizer(model_dir).tokenizer.decode([1234])  # " redu"; forced by the bias below

    def run(min_tokens: int):
        return collect_tokens(stub, pb.GenerateRequest(prompt_token_ids=prompts[0], sampling=pb.SamplingParams(
            max_tokens=8, min_tokens=min_tokens, logit_bias={1234: 100.0}, stop=[piece])))

    tokens, text, last = run(0)
    assert tokens == [1234] and text == "" and last.finish_reason == pb.FINISH_REASON_STOP
    tokens, text, last = run(3)
    assert tokens == [1234] * 3 and text == piece * 2 and last.finish_reason == pb.FINISH_REASON_STOP


def _samples(stub, request) -> tuple[dict[int, list[int]], dict[int, pb.Usage]]:
    tokens: dict[int, list[int]] = {}
    usage: dict[int, pb.Usage] = {}
    for response in stub.Generate(request, timeout=300):
        tokens.setdefault(response.index, []).extend(response.token_ids)
        if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            usage[response.index] = response.usage
    return tokens, usage


def test_n_seeded_samples_are_reproducible_and_share_the_prompt(server, prompts, model_dir):
    stub = server.stub()
    # A prompt no other test sent, so no cache hit comes from elsewhere: 2 full blocks + 8 tokens.
    prompt = ModelTokenizer(model_dir).encode("Once upon a time in a quiet village " * 5)[:40]
    sampling = pb.SamplingParams(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
    request = pb.GenerateRequest(request_id="n-samples", prompt_token_ids=prompt, sampling=sampling, n=3)
    first, usage = _samples(stub, request)
    assert sorted(first) == [0, 1, 2] and all(len(t) == 8 for t in first.values())
    assert len({tuple(t) for t in first.values()}) > 1, "each sample must draw from its own generator"
    # The prompt's full blocks computed once: the other samples found them in the cache...
    assert usage[0].cached_prompt_tokens == 0
    assert usage[1].cached_prompt_tokens == usage[2].cached_prompt_tokens == 32
    # ... in the very step that computes them: 40 prompt tokens, then 8 (the partial block) twice.
    req_ids = server.call(lambda app: {r.req_id for r in app.engine.request_records
                                       if r.client_request_id == "n-samples"})
    [admitted] = server.call(lambda app: [r for r in app.engine.scheduler.records if req_ids & set(r.new_req_ids)])
    assert set(admitted.new_req_ids) >= req_ids
    assert sorted(admitted.num_scheduled_tokens[r] for r in req_ids) == [8, 8, 40]
    again, _ = _samples(stub, request)
    assert again == first
    single, _ = _samples(stub, pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling))
    assert single[0] == first[0]  # sample 0 is the request with n = 1


def test_n_through_the_openai_client(client):
    completion = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=4, temperature=1.0,
                                           seed=7, n=3, extra_body={"ignore_eos": True})
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert completion.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=1.0, seed=7, n=2,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    finished = sorted(c.index for chunk in chunks for c in chunk.choices if c.finish_reason)
    assert finished == [0, 1]
    assert chunks[-1].usage.completion_tokens == 8


def test_cancelling_an_n_call_cancels_every_sample(server, prompts):
    request = pb.GenerateRequest(prompt_token_ids=prompts[0], n=3,
                                 sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True))
    call = server.stub().Generate(request, timeout=300)
    next(call)
    assert server.call(lambda app: app.engine.num_active_requests) == 3
    call.cancel()
    deadline = time.monotonic() + 10
    while server.call(lambda app: app.engine.num_active_requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.call(lambda app: app.engine.num_active_requests) == 0


@pytest.mark.parametrize("fields, n, name", [
    ({"min_p": 1.5}, 1, "sampling.min_p"),
    ({"presence_penalty": 2.5}, 1, "sampling.presence_penalty"),
    ({"frequency_penalty": -3.0}, 1, "sampling.frequency_penalty"),
    ({"repetition_penalty": 0.0}, 1, "sampling.repetition_penalty"),
    ({"logit_bias": {10**8: 1.0}}, 1, "sampling.logit_bias"),
    ({"logit_bias": {5: 101.0}}, 1, "sampling.logit_bias"),
    ({"min_tokens": 9}, 1, "sampling.min_tokens"),
    ({"logprobs": 21}, 1, "sampling.logprobs"),
    ({}, 65, "n"),
])
def test_bad_values_are_rejected_naming_the_field(server, prompts, fields, n, name):
    request = pb.GenerateRequest(prompt_token_ids=prompts[0], n=n, sampling=pb.SamplingParams(max_tokens=8, **fields))
    with pytest.raises(grpc.RpcError) as caught:
        list(server.stub().Generate(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{name}: ")
