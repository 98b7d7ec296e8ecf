"""OpenAI request bodies -> GenerateRequest, and GenerateResponse streams -> OpenAI's pieces."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway_svc.schemas import ChatCompletionRequest, CompletionRequest, GenerateBody
from omnibus.v1 import generation_pb2 as pb

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
# OpenAI's newer name for the system role; chat templates know only "system".
_ROLE_ALIASES = {"developer": "system"}


def completion_request(body: CompletionRequest, request_id: str) -> pb.GenerateRequest:
    request = _request(body, body.max_tokens, request_id)
    if isinstance(body.prompt, str):
        request.prompt = body.prompt
    else:
        request.prompt_token_ids.extend(body.prompt)
    return request


def chat_request(body: ChatCompletionRequest, request_id: str) -> pb.GenerateRequest:
    request = _request(body, body.max_new_tokens, request_id)
    for message in body.messages:
        request.messages.add(role=_ROLE_ALIASES.get(message.role, message.role), content=message.content)
    return request


def chat_renames(body: ChatCompletionRequest) -> dict[str, str]:
    """Server field names to the chat parameter the client actually sent."""
    return {"sampling.max_tokens": "max_completion_tokens"} if body.max_completion_tokens is not None else {}


def _request(body: GenerateBody, max_tokens: int | None, request_id: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        sampling=_sampling(body, max_tokens),
        priority=body.priority,
        cache_salt=body.cache_salt,
        tenant=body.user or "",  # OpenAI's end-user id: fair share is between users
    )


def _sampling(body: GenerateBody, max_tokens: int | None) -> pb.SamplingParams:
    sampling = pb.SamplingParams(stop=body.stop, stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos)
    for name, value in (("max_tokens", max_tokens), ("temperature", body.temperature), ("top_p", body.top_p),
                        ("top_k", body.top_k), ("seed", body.seed)):
        if value is not None:  # unset fields keep the server's defaults
            setattr(sampling, name, value)
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
    finish_reason: str | None = None  # None until the last response
    usage: pb.Usage | None = None

    def add(self, response: pb.GenerateResponse) -> None:
        self.text.append(response.text)
        self.token_ids.extend(response.token_ids)
        reason = finish_reason(response)
        if reason is not None:
            self.finish_reason, self.usage = reason, response.usage
