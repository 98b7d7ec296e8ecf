"""The gateway's sampling controls without a model: OpenAI bodies -> GenerateRequest, and the
OpenAI shapes of logprobs and of n choices, whole and streamed."""

from __future__ import annotations

import asyncio
import json

import grpc

from gateway_svc.responses import ChatFormat, CompletionFormat
from gateway_svc.schemas import ChatCompletionRequest, CompletionRequest
from gateway_svc.streaming import sse_events
from gateway_svc.translate import Generations, chat_request, completion_request
from omnibus.v1 import generation_pb2 as pb


def _logprobs(token_id: int, token: str, logprob: float, top: list[tuple[int, str, float]]) -> pb.TokenLogprobs:
    entry = pb.TokenLogprobs(sampled=pb.TokenLogprob(token_id=token_id, token=token, logprob=logprob))
    for top_id, top_token, top_logprob in top:
        entry.top.add(token_id=top_id, token=top_token, logprob=top_logprob)
    return entry


def test_completion_body_maps_every_sampling_control():
    body = CompletionRequest(prompt="Hi", n=3, seed=5, presence_penalty=0.5, frequency_penalty=-0.25,
                             logit_bias={"17": -100, "4": 2.5}, logprobs=2, top_k=10, min_p=0.05,
                             repetition_penalty=1.3, min_tokens=4)
    body.check()
    request = completion_request(body, "req")
    s = request.sampling
    assert request.n == 3 and s.seed == 5 and s.logprobs == 2 and s.top_k == 10 and s.min_tokens == 4
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -0.25)
    assert abs(s.min_p - 0.05) < 1e-7 and abs(s.repetition_penalty - 1.3) < 1e-6
    assert dict(s.logit_bias) == {17: -100.0, 4: 2.5}
    plain = completion_request(CompletionRequest(prompt="Hi"), "req")
    assert plain.n == 1 and not any(plain.sampling.HasField(f) for f in (
        "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs"))


def test_chat_logprobs_and_top_logprobs():
    messages = [{"role": "user", "content": "Hi"}]
    assert chat_request(ChatCompletionRequest(messages=messages, logprobs=True, top_logprobs=4), "r").sampling.logprobs == 4
    assert chat_request(ChatCompletionRequest(messages=messages, logprobs=True), "r").sampling.logprobs == 0
    assert not chat_request(ChatCompletionRequest(messages=messages), "r").sampling.HasField("logprobs")


def _generations() -> Generations:
    generations = Generations(2)
    first = _logprobs(5, "Hel", -0.5, [(5, "Hel", -0.5), (6, "He", -1.25)])
    generations.add(pb.GenerateResponse(index=1, token_ids=[5], text="Hel", logprobs=[first]))
    generations.add(pb.GenerateResponse(index=0, token_ids=[7], text="A", logprobs=[_logprobs(7, "A", -0.1, [(7, "A", -0.1)])],
                                        finish_reason=pb.FINISH_REASON_LENGTH,
                                        usage=pb.Usage(prompt_tokens=9, completion_tokens=1, cached_prompt_tokens=0)))
    generations.add(pb.GenerateResponse(index=1, token_ids=[8], text="lo", logprobs=[_logprobs(8, "lo", -2.0, [(9, "p", -1.0)])],
                                        finish_reason=pb.FINISH_REASON_STOP,
                                        usage=pb.Usage(prompt_tokens=9, completion_tokens=2, cached_prompt_tokens=0)))
    assert generations.finished
    return generations


def test_completions_logprobs_and_choices_have_openais_shape():
    body = CompletionFormat("cmpl-1", "m", 0, n=2, logprobs=True).full(_generations())
    assert [c["index"] for c in body["choices"]] == [0, 1]
    second = body["choices"][1]
    assert (second["text"], second["finish_reason"]) == ("Hello", "stop")
    assert second["logprobs"] == {
        "tokens": ["Hel", "lo"], "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"Hel": -0.5, "He": -1.25}, {"p": -1.0, "lo": -2.0}],  # the sampled token too
        "text_offset": [0, 3],
    }
    assert body["usage"]["prompt_tokens"] == 9 and body["usage"]["completion_tokens"] == 3
    assert CompletionFormat("cmpl-1", "m", 0, n=2).full(_generations())["choices"][0]["logprobs"] is None


def test_chat_logprobs_have_openais_shape():
    body = ChatFormat("chatcmpl-1", "m", 0, n=2, logprobs=True).full(_generations())
    content = body["choices"][1]["logprobs"]["content"]
    assert content[0] == {"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108], "top_logprobs": [
        {"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108]}, {"token": "He", "logprob": -1.25, "bytes": [72, 101]}]}
    assert body["choices"][1]["logprobs"]["refusal"] is None


class FakeCall:
    def __init__(self, responses: list[pb.GenerateResponse]):
        self.responses = list(responses)

    async def read(self):
        return self.responses.pop(0) if self.responses else grpc.aio.EOF

    def cancel(self) -> bool:
        return True


def test_a_stream_of_n_choices_names_each_and_totals_the_usage():
    responses = [pb.GenerateResponse(index=i, token_ids=[5], text="x", logprobs=[_logprobs(5, "x", -1.0, [])],
                                     finish_reason=pb.FINISH_REASON_LENGTH,
                                     usage=pb.Usage(prompt_tokens=4, completion_tokens=1, cached_prompt_tokens=2 * i))
                 for i in range(2)]
    fmt = ChatFormat("chatcmpl-1", "m", 0, n=2, logprobs=True)

    async def run() -> list[str]:
        return [event async for event in sse_events(FakeCall(responses[1:]), responses[0], fmt, True)]

    events = asyncio.run(run())
    assert events[-1] == "data: [DONE]\n\n"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    openings = [p["choices"][0]["index"] for p in payloads[:2]]
    assert openings == [0, 1] and all(p["choices"][0]["delta"]["role"] == "assistant" for p in payloads[:2])
    deltas = [p["choices"][0] for p in payloads if p["choices"] and p["choices"][0]["delta"].get("content")]
    assert [(d["index"], d["logprobs"]["content"][0]["logprob"]) for d in deltas] == [(0, -1.0), (1, -1.0)]
    finishes = [p["choices"][0]["index"] for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
    assert finishes == [0, 1]
    assert payloads[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                                     "prompt_tokens_details": {"cached_tokens": 0}}
