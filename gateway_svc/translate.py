"""OpenAI request bodies -> GenerateRequest, and GenerateResponse streams -> OpenAI's pieces."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway_svc import structured_output
from gateway_svc.schemas import ChatCompletionRequest, CompletionRequest, GenerateBody
from omnibus.v1 import generation_pb2 as pb

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
# OpenAI's newer name for the system role; chat templates know only "system".
_ROLE_ALIASES = {"developer": "system"}


def completion_request(body: CompletionRequest, request_id: str) -> pb.GenerateRequest:
    request = _request(body, body.max_tokens, request_id)
    if body.logprobs is not None:
        request.sampling.logprobs = body.logprobs
    if isinstance(body.prompt, str):
        request.prompt = body.prompt
    else:
        request.prompt_token_ids.extend(body.prompt)
    return request


def chat_request(body: ChatCompletionRequest, request_id: str) -> pb.GenerateRequest:
    request = _request(body, body.max_new_tokens, request_id)
    if body.logprobs:
        request.sampling.logprobs = body.top_logprobs or 0
    for message in body.messages:
        request.messages.add(role=_ROLE_ALIASES.get(message.role, message.role), content=message.content)
    return request


def chat_renames(body: ChatCompletionRequest) -> dict[str, str]:
    """Server field names to the chat parameter the client actually sent."""
    renames = {"sampling.logprobs": "top_logprobs"}
    if body.max_completion_tokens is not None:
        renames["sampling.max_tokens"] = "max_completion_tokens"
    return renames


def _request(body: GenerateBody, max_tokens: int | None, request_id: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        sampling=_sampling(body, max_tokens),
        priority=body.priority,
        cache_salt=body.cache_salt,
        tenant=body.user or "",  # OpenAI's end-user id: fair share is between users
        n=body.n or 1,
    )


def _sampling(body: GenerateBody, max_tokens: int | None) -> pb.SamplingParams:
    sampling = pb.SamplingParams(stop=body.stop, stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
                                 logit_bias={int(t): b for t, b in (body.logit_bias or {}).items()})
    for name, value in (("max_tokens", max_tokens), ("temperature", body.temperature), ("top_p", body.top_p),
                        ("top_k", body.top_k), ("seed", body.seed), ("min_p", body.min_p),
                        ("presence_penalty", body.presence_penalty), ("frequency_penalty", body.frequency_penalty),
                        ("repetition_penalty", body.repetition_penalty), ("min_tokens", body.min_tokens)):
        if value is not None:  # unset fields keep the server's defaults
            setattr(sampling, name, value)
    structured_output.apply(body, sampling)
    return sampling


def finish_reason(response: pb.GenerateResponse) -> str | None:
    """OpenAI's finish_reason of a response: None while the stream goes on."""
    if response.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        return None
    return FINISH_REASONS.get(response.finish_reason, "stop")


def usage(message: pb.Usage) -> dict:
    return {
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "total_tokens": message.prompt_tokens + message.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": message.cached_prompt_tokens},
    }


@dataclass(slots=True)
class Generation:
    """One generation collected from its response stream."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprobs] = field(default_factory=list)  # per token, when asked for
    finish_reason: str | None = None  # None until the last response
    usage: pb.Usage | None = None

    def add(self, response: pb.GenerateResponse) -> None:
        self.text.append(response.text)
        self.token_ids.extend(response.token_ids)
        self.logprobs.extend(response.logprobs)
        reason = finish_reason(response)
        if reason is not None:
            self.finish_reason, self.usage = reason, response.usage


@dataclass(slots=True)
class Generations:
    """The n generations of one request (GenerateRequest.n), collected by response index."""

    n: int = 1
    choices: dict[int, Generation] = field(default_factory=dict)

    def add(self, response: pb.GenerateResponse) -> None:
        self.choices.setdefault(response.index, Generation()).add(response)

    @property
    def finished(self) -> bool:
        return len(self.choices) == self.n and all(g.finish_reason is not None for g in self.choices.values())

    def in_order(self) -> list[Generation]:
        return [self.choices[i] for i in sorted(self.choices)]

    def usage(self) -> pb.Usage:
        return total_usage([g.usage for g in self.in_order()])


def total_usage(per_sample: list[pb.Usage]) -> pb.Usage:
    """One request's usage over its samples: the prompt (computed once, with the first sample's
    cache hits) and every sample's completion tokens."""
    first = per_sample[0]
    return pb.Usage(prompt_tokens=first.prompt_tokens, cached_prompt_tokens=first.cached_prompt_tokens,
                    completion_tokens=sum(u.completion_tokens for u in per_sample))
